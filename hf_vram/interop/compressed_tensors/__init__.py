"""compressed-tensors, both ways: export an hf_vram model to it, and take in a model quantized in it.

compressed-tensors is the checkpoint format llm-compressor writes, vLLM serves natively and Transformers loads on
any device. The formats agree where it matters, so the weights cross over exactly, never through float:

* int8 weight-only (per output channel, symmetric): ``pack-quantized`` 8-bit (codes packed four to an int32, the
  format compressed-tensors infers for W8A16), ``weight_scale [N, 1]``.
* W8A8: ``int-quantized``: ``weight`` int8 and ``weight_scale [N, 1]``, activations int8 per token, dynamic.
* int4 group-wise: ``pack-quantized`` 4-bit, ``weight_scale [N, G]``, and for asymmetric groups
  ``weight_zero_point`` packed along the output dimension. hf_vram stores ``(scale, zero = (8 - zp) * scale)`` in
  bfloat16 with an integer ``zp`` (``quant.schemes``): ``zp = 8 - round(zero / scale)`` is recovered exactly, and the
  code ``q`` of hf_vram is compressed-tensors' ``q - 8``.

What has no place in the format is refused by name before anything is written (``checks``); what the format holds
differently is converted (``export``); the model card says what changed (``card``); ``load`` is the way back in.
"""

from hf_vram.interop.compressed_tensors.checks import FORMAT, ExportError
from hf_vram.interop.compressed_tensors.export import ExportReport, export_compressed_tensors
from hf_vram.interop.compressed_tensors.load import (
    ImportedLayer,
    convert_compressed_model,
    load_compressed_tensors,
    read_compressed_layer,
)

__all__ = [
    "FORMAT",
    "ExportError",
    "ExportReport",
    "ImportedLayer",
    "convert_compressed_model",
    "export_compressed_tensors",
    "load_compressed_tensors",
    "read_compressed_layer",
]
