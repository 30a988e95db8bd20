"""What an hf_vram model writes beside its weights, and how it writes them.

``save_pretrained`` of a model optimized by hf_vram (through either door) is wrapped so that it
* writes into a temporary sibling folder and moves it into place only when complete, so an interrupted save
  leaves the previous checkpoint loadable, and
* adds ``hf_vram_manifest.json`` (size and hash of every weight file, checked before a load), and
* adds a ``README.md`` model card: the hf_vram config, the memory table, and the ``import hf_vram`` requirement
  (Transformers itself has no way to import a plugin, and without it the load is wrong: see the card text).
``push_to_hub`` calls ``save_pretrained`` internally, so it uploads exactly this folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path

from hf_vram.hf.checkpoint_type import guard_saved_config
from hf_vram.hf.integrity import write_manifest
from hf_vram.memory.report import memory_report

CARD_MARKER = "<!-- written by hf_vram -->"


def model_card(model) -> str:
    config = model.config.quantization_config
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    base = getattr(model.config, "_name_or_path", "") or "unknown"
    return f"""---
library_name: transformers
tags: [hf_vram, quantized]
---
{CARD_MARKER}
# {arch} optimized with hf_vram

Base model: `{base}`. This checkpoint was written by [hf_vram](https://pypi.org/project/hf-vram/) and
**needs `import hf_vram` before loading**:

```python
import hf_vram  # registers the `hf_vram` quantization method with Transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")
```

Without `import hf_vram`, `AutoModelForCausalLM` (and `transformers serve`, pipelines) refuse this checkpoint: its
config names the model type "hf_vram (pip install hf-vram, then import hf_vram before from_pretrained)". Loading
it through an architecture class directly (`LlamaForCausalLM.from_pretrained`) without hf_vram only warns, and
returns randomly initialised layers that must not be used.

## hf_vram config

```yaml
{config.to_yaml().rstrip()}
```

## Memory (parameters and buffers)

```
{memory_report(model).table()}
```

## Measured quality and speed

{_quality_table(model)}
"""


def _quality_table(model) -> str:
    """The measurements recorded on the model (``hf-vram optimize`` records them), as a markdown table."""
    rows = getattr(model, "hf_vram_measurements", None)
    if not rows:
        return (
            "Not measured for this checkpoint. `hf-vram optimize --model <base folder> --config <yaml> --save <dir>` "
            "measures memory, perplexity and decode speed against the float model and records them here."
        )
    base = rows[0]
    lines = ["| config | weights MiB | x float | perplexity | vs float | greedy tok/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['tok/s']:.2f}" if r.get("tok/s") else "-"
        lines.append(
            f"| {r['config']} | {r['MiB']:.1f} | {r['MiB'] / base['MiB']:.3f} | {r['ppl']:.3f} | "
            f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {speed} |"
        )
    notes = {f"{k}: {v}" for r in rows for k, v in r.items() if k in ("text", "threads")}
    return "\n".join(lines) + ("\n\nMeasured on " + "; ".join(sorted(notes)) + "." if notes else "")


def _atomic_save(model, save_directory, *args, **kwargs):
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.saving-"))
    try:
        result = type(model).save_pretrained(model, tmp, *args, **kwargs)
        guard_saved_config(tmp)
        write_manifest(tmp)
        card = tmp / "README.md"
        if not card.exists():
            card.write_text(model_card(model))
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def install_save_hooks(model) -> None:
    """Wrap this model's ``save_pretrained`` (instance-level, once; ``copy.deepcopy`` rebinds it to the copy)."""
    if getattr(model.save_pretrained, "_hf_vram_wrapped", False):
        return

    def save_pretrained(self, save_directory, *args, **kwargs):
        return _atomic_save(self, save_directory, *args, **kwargs)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # push_to_hub replaces README.md with a generic card after save_pretrained: put ours back before upload.
        (Path(working_dir) / "README.md").write_text(model_card(self))
        return type(self)._upload_modified_files(self, working_dir, *args, **kwargs)

    save_pretrained._hf_vram_wrapped = True
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model._upload_modified_files = types.MethodType(_upload_modified_files, model)
