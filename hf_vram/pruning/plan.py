"""``PruningPlan``: what each layer keeps, in the unpruned model's indices; saved inside the hf_vram config.

The plan is what makes a pruned checkpoint loadable: ``from_pretrained(saved)`` reads it from config.json and
shrinks the meta model to the same shapes before the weights load. Indices always refer to the original model, so
a progressive run (several steps) and a reload from scratch describe the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerHeads:
    """Kept query heads and kept KV heads of one attention layer; every kept KV group keeps as many query heads."""

    q_heads: list[int]
    kv_heads: list[int]


@dataclass
class PruningPlan:
    """Kept heads per attention layer and removed MLP channels per MLP, keyed by layer index (original indices)."""

    heads: dict[int, LayerHeads] = field(default_factory=dict)
    mlp_removed: dict[int, list[int]] = field(default_factory=dict)
    # Original sizes, checked against the model the plan is applied to.
    num_heads: dict[int, int] = field(default_factory=dict)
    num_kv_heads: dict[int, int] = field(default_factory=dict)
    channels: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "heads": {str(i): {"q": h.q_heads, "kv": h.kv_heads} for i, h in sorted(self.heads.items())},
            "mlp_removed": {str(i): list(c) for i, c in sorted(self.mlp_removed.items())},
            "num_heads": {str(i): n for i, n in sorted(self.num_heads.items())},
            "num_kv_heads": {str(i): n for i, n in sorted(self.num_kv_heads.items())},
            "channels": {str(i): n for i, n in sorted(self.channels.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        try:
            return cls(
                heads={int(i): LayerHeads(list(h["q"]), list(h["kv"])) for i, h in data.get("heads", {}).items()},
                mlp_removed={int(i): list(c) for i, c in data.get("mlp_removed", {}).items()},
                num_heads={int(i): int(n) for i, n in data.get("num_heads", {}).items()},
                num_kv_heads={int(i): int(n) for i, n in data.get("num_kv_heads", {}).items()},
                channels={int(i): int(n) for i, n in data.get("channels", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"hf_vram pruning: the saved pruning plan is malformed ({err}); re-run pruning and save again."
            ) from err

    def validate(self) -> None:
        """Check the plan is self-consistent: indices in range, sorted, unique; uniform GQA groups; never empty."""
        for layer, h in self.heads.items():
            n_q, n_kv = self.num_heads.get(layer), self.num_kv_heads.get(layer)
            where = f"hf_vram pruning plan, attention layer {layer}"
            if n_q is None or n_kv is None:
                raise ValueError(f"{where}: original head counts are missing from the plan.")
            _check_indices(where, "query heads", h.q_heads, n_q)
            _check_indices(where, "KV heads", h.kv_heads, n_kv)
            if not h.q_heads:
                raise ValueError(f"{where}: every head would be pruned; keep at least one (pruning.min_heads_per_layer).")
            group = n_q // n_kv
            per_group = {kv: [q for q in h.q_heads if q // group == kv] for kv in h.kv_heads}
            if sum(len(v) for v in per_group.values()) != len(h.q_heads):
                raise ValueError(f"{where}: a kept query head belongs to a pruned KV head.")
            if len({len(v) for v in per_group.values()}) != 1:
                raise ValueError(f"{where}: kept KV groups keep different numbers of query heads, which GQA cannot run.")
        for layer, removed in self.mlp_removed.items():
            n = self.channels.get(layer)
            where = f"hf_vram pruning plan, MLP layer {layer}"
            if n is None:
                raise ValueError(f"{where}: the original channel count is missing from the plan.")
            _check_indices(where, "channels", removed, n)
            if len(removed) >= n:
                raise ValueError(f"{where}: every channel would be pruned; lower pruning.mlp_ratio.")

    def kept_channels(self, layer: int) -> list[int]:
        removed = set(self.mlp_removed.get(layer, ()))
        return [c for c in range(self.channels[layer]) if c not in removed]

    def summary(self) -> dict:
        q_total = sum(self.num_heads.values())
        q_kept = sum(len(self.heads[i].q_heads) if i in self.heads else n for i, n in self.num_heads.items())
        c_total = sum(self.channels.values())
        c_removed = sum(len(r) for r in self.mlp_removed.values())
        return {
            "heads_removed": q_total - q_kept,
            "heads_total": q_total,
            "head_ratio": (q_total - q_kept) / q_total if q_total else 0.0,
            "channels_removed": c_removed,
            "channels_total": c_total,
            "mlp_ratio": c_removed / c_total if c_total else 0.0,
        }


def _check_indices(where: str, what: str, indices: list[int], size: int) -> None:
    if any(not isinstance(i, int) or isinstance(i, bool) for i in indices):
        raise ValueError(f"{where}: {what} must be integers, got {indices!r}.")
    if list(indices) != sorted(set(indices)):
        raise ValueError(f"{where}: {what} must be sorted and unique, got {indices!r}.")
    if indices and (indices[0] < 0 or indices[-1] >= size):
        raise ValueError(f"{where}: {what} index out of range 0..{size - 1}: {indices!r}.")
