"""Matmul kernels for hf_vram's quantized formats, apart from the modules that call them.

``dispatch`` picks one by device and batch size; ``reference`` is the plain-torch definition every fast path is
tested against; ``cpu`` wraps torch's packed CPU kernels; ``triton_matmul`` holds the CUDA kernels.
This package imports nothing else of hf_vram's.
"""
