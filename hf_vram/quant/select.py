"""Which modules the quantization stage converts, and what ``modules_to_not_convert`` matched.

Transformers' own helper matches a pattern only as a prefix, an anchored regex or a suffix, so ``"mlp"`` silently
matches nothing. Here a pattern matches a module when it equals its name, is a dotted suffix of it, or fully
matches it as a regex; a pattern that matches no module at all is an error, and the matches are reported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger("hf_vram")

LINEAR_TYPES = (nn.Linear, Conv1D)


def pattern_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def matches_any(patterns: list[str], name: str) -> bool:
    """True when ``name`` or one of its parent modules matches a pattern (skipping a block skips its layers)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(pattern_matches(p, prefix) for p in patterns for prefix in prefixes)


@dataclass
class QuantTargets:
    """The plan of the quantization stage for one model."""

    linears: list[str] = field(default_factory=list)
    embedding: str | None = None
    head: str | None = None
    head_tied: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why
    pattern_matches: dict[str, list[str]] = field(default_factory=dict)


def _embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    inp = out = None
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        inp = names.get(id(emb)) if emb is not None else None
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        out = names.get(id(head)) if head is not None else None
    return inp, out


def _is_tied(model: nn.Module, inp: str | None, out: str | None) -> bool:
    if inp is None or out is None:
        return False
    try:
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    except (AttributeError, ValueError):
        tied = {}
    a, b = f"{out}.weight", f"{inp}.weight"
    if tied.get(a) == b or tied.get(b) == a:
        return True
    head, emb = model.get_submodule(out), model.get_submodule(inp)
    hw, ew = getattr(head, "weight", None), getattr(emb, "weight", None)
    return hw is not None and hw is ew


def _known_scaled(embedding: nn.Embedding) -> bool:
    """A Transformers scaled word embedding: a lookup times the constant ``scalar_embed_scale`` (Gemma)."""
    return isinstance(getattr(embedding, "scalar_embed_scale", None), (int, float))


def select_targets(model: nn.Module, patterns: list[str] | None, quantize_embeddings: bool) -> QuantTargets:
    """Decide what to convert. Raises ``ValueError`` for a skip pattern that matches no module."""
    plan = QuantTargets()
    inp, out = _embedding_names(model)
    user = list(patterns or [])
    all_names = [n for n, _ in model.named_modules() if n]
    for p in user:
        hits = [n for n in all_names if pattern_matches(p, n)]
        if not hits:
            sample = ", ".join(all_names[:8])
            raise ValueError(
                f"hf_vram: modules_to_not_convert pattern {p!r} matches no module of this model; use an exact name, "
                f"a dotted suffix (e.g. 'down_proj') or a regex. Module names look like: {sample}, ..."
            )
        plan.pattern_matches[p] = hits
    plan.head_tied = _is_tied(model, inp, out)
    if quantize_embeddings and inp is not None and not matches_any(user, inp):
        module = model.get_submodule(inp)
        if type(module) is nn.Embedding or (isinstance(module, nn.Embedding) and _known_scaled(module)):
            plan.embedding = inp
        else:
            plan.skipped[inp] = f"embedding of type {type(module).__name__} is not supported"
    for name, module in model.named_modules():
        if not name or not (isinstance(module, LINEAR_TYPES) or name in (inp, out)):
            continue
        if matches_any(user, name):
            plan.skipped[name] = "modules_to_not_convert"
            continue
        if name == inp:
            continue
        if name == out:
            if not quantize_embeddings:
                plan.skipped[name] = "output head (set quantization.quantize_embeddings to convert it)"
            elif plan.head_tied and plan.embedding is None:
                plan.skipped[name] = "tied to an embedding that is not converted"
            elif plan.head_tied:
                plan.head = name
            elif isinstance(module, nn.Linear):
                plan.linears.append(name)
            else:
                plan.skipped[name] = f"output head of type {type(module).__name__} is not supported"
            continue
        plan.linears.append(name)
    for name, why in plan.skipped.items():
        logger.info("hf_vram: not quantizing %s (%s)", name, why)
    return plan
