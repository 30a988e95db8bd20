"""Registration with Transformers: the quantization method and attention functions, cheap and re-import safe."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from transformers.quantizers import auto as quantizer_auto

import hf_vram
from hf_vram import VramOptimizationConfig


def test_registered_and_reimport_safe():
    assert quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_vram"] is VramOptimizationConfig
    importlib.reload(importlib.import_module("hf_vram.hf.registration")).install()
    importlib.reload(hf_vram)  # a notebook re-running `import hf_vram` must not hit the duplicate check
    assert "hf_vram" in quantizer_auto.AUTO_QUANTIZER_MAPPING


IMPORT_PROBE = """
import sys, time
t = time.perf_counter()
import hf_vram
seconds = time.perf_counter() - t
heavy = [m for m in ("transformers.quantizers.auto", "transformers.modeling_utils", "peft", "bitsandbytes",
                     "transformers.trainer", "torch._inductor.compile_fx") if m in sys.modules]
from transformers import AutoModelForCausalLM, AttentionInterface
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
registered = "hf_vram" in AUTO_QUANTIZER_MAPPING and {"hf_vram", "hf_vram_paged"} <= set(AttentionInterface._global_mapping)
lazy = hf_vram.DistillationCallback.__module__
print("RESULT", heavy, registered, lazy, "peft" in sys.modules)
"""


def test_import_is_quiet_light_and_registers_when_transformers_needs_it():
    """`import hf_vram` prints nothing, loads no quantizer registry, model code, Trainer, PEFT or bitsandbytes; the
    registries get hf_vram's entries the moment Transformers imports them; the recovery names load on first use."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "RESULT [] True hf_vram.recovery.distillation True"
    quiet = subprocess.run(
        [sys.executable, "-c", "import hf_vram"],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
