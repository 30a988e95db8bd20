"""Register hf_vram with Transformers, once per process (notebook re-runs included).

The registries: the quantization method (config + quantizer, in ``transformers.quantizers.auto``), the attention
functions ``hf_vram`` and ``hf_vram_paged`` that a saved fused or pooled model names in its config (in
``transformers.modeling_utils``), the model type a saved hf_vram checkpoint names (``AutoConfig``; see
``hf_vram.hf.checkpoint_type``) and continuous batching's paged cache. Importing those modules costs seconds (every quantizer, the model-loading machinery, torch's
compiler stack), and ``import hf_vram`` should not pay that: ``install`` registers into each at once when it is
already imported, and otherwise adds a finder to ``sys.meta_path`` that registers right after the module is first
executed. ``from_pretrained`` lives in ``modeling_utils`` and asks the registry only after it has loaded, so a
saved hf_vram model always finds its method and attention.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

from hf_vram.config import QUANT_METHOD, VramOptimizationConfig


def build_quantizer(quantization_config: VramOptimizationConfig, **kwargs):
    """The registry's entry for ``hf_vram``: Transformers calls it as it would a quantizer class. It imports the
    quantizer (and with it the pipeline and every stage) only when ``from_pretrained`` asks for one: by then every
    module they build on has loaded, whereas at registration time Transformers or hf_vram may be mid-import. This
    is the one place hf_vram defers an import of its own code (``tests/test_layers.py``)."""
    quantizer = importlib.import_module("hf_vram.hf.quantizer").HfVramQuantizer
    return quantizer(quantization_config, **kwargs)


def register_quantization_method() -> None:
    """Idempotent, and a re-imported hf_vram (``importlib.reload``) points the entries at its new objects. Runs while
    ``transformers.quantizers`` may still be initialising: it imports nothing of the model stack."""
    quantizer_auto = importlib.import_module("transformers.quantizers.auto")
    quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = VramOptimizationConfig
    quantizer_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = build_quantizer


def register_continuous_batching() -> None:
    """Continuous batching builds its paged cache through hf_vram's subclass (quantized K/V pages for hf_vram models
    that ask for them, Transformers' cache for every other model)."""
    module = sys.modules["transformers.generation.continuous_batching.continuous_api"]
    try:
        continuous = importlib.import_module("hf_vram.kvcache.continuous")
    except ImportError:
        # one of its own imports (an allocator module importing Transformers' package) is what is loading this
        # module: it is half-built; hf_vram.kvcache.continuous installs itself when it is next imported
        return
    if hasattr(continuous, "install"):  # else it is being imported, and installs itself when it is done
        continuous.install(module)


def register_attention() -> None:
    """The attention modules register themselves when imported (a module already being imported, which is how it
    asked for ``modeling_utils`` in the first place, registers itself once it is done)."""
    importlib.import_module("hf_vram.fusion.attention")
    importlib.import_module("hf_vram.kvcache.paged_attention")


def register_checkpoint_type() -> None:
    """``AutoConfig`` maps the model type a saved hf_vram checkpoint names back to its architecture's config."""
    importlib.import_module("hf_vram.hf.checkpoint_type").register()


# module -> what to register once it is loaded
AFTER_IMPORT = {
    "transformers.models.auto.configuration_auto": register_checkpoint_type,
    "transformers.quantizers.auto": register_quantization_method,
    "transformers.modeling_utils": register_attention,
    "transformers.generation.continuous_batching.continuous_api": register_continuous_batching,
}


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs a module's own loader, then the registration waiting for it."""

    def __init__(self, loader: importlib.abc.Loader, action) -> None:
        self.loader = loader
        self.action = action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.action()


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds the waited-for modules like the default finder does, with a loader that registers after each."""

    def __init__(self, pending: dict) -> None:
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        action = self.pending.pop(fullname, None)
        if action is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader, action)
        return spec


def install() -> None:
    """Register into each registry now if it is loaded, else as soon as it is. The finder goes in first: registering
    into one registry can import another's module (the continuous-batching glue imports Transformers' attention
    integrations, which load the quantizer registry), and that one must still be caught."""
    pending = {module: action for module, action in AFTER_IMPORT.items() if module not in sys.modules}
    if pending and not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder(pending))
    for module, action in AFTER_IMPORT.items():
        if module not in pending:
            action()
