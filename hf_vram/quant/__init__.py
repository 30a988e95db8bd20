"""Quantization: low-bit linear layers and the int8 embedding, the math of each scheme, and how layers are chosen,
built, calibrated (AWQ, GPTQ, block by block) and swapped in.

- ``schemes``: the saved formats and their math (int8 per channel, int4 group-wise, W8A8).
- ``linear``, ``embedding``: the modules (``saved_tensors``/``row_slice`` expose the saved layout).
- ``build``: make and install a layer (every door goes through it); ``select``: which modules to convert.
- ``apply``: the pipeline's stage, the ``from_pretrained`` skeleton and its undoing (``dequantize``).
- ``sequential``, ``awq``, ``gptq``: calibrated quantization; ``state``, ``placeholder``: layer plumbing.
"""
