"""The door from Transformers: the registered quantizer and what save/load write and expect."""
