"""Package attributes imported on first use (PEP 562), so that importing a package costs only what it needs."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def lazy_getattr(package: str, sources: dict[str, str]):
    """A module ``__getattr__`` resolving ``name`` from the module ``sources[name]`` (absolute, or relative to
    ``package`` when it starts with a dot) and caching it in the package's namespace. A subpackage or submodule
    of ``package`` (``hf_vram.planner``) resolves too, as it would after an eager import of the package."""

    def __getattr__(name: str):
        if name not in sources:
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source = sources[name]
        module = importlib.import_module(source if not source.startswith(".") else package + source)
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
