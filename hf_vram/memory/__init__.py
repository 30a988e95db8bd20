"""Memory accounting: what a model holds (report) and what a block of code peaks at (tracker)."""
