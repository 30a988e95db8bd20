"""Turn importance scores into a ``PruningPlan`` that grouped-query attention can still run.

A GQA layer with ``a`` kept KV groups must keep the same number ``b`` of query heads in each, so a layer can only
lose heads in two kinds of moves: drop its weakest whole KV group (``b`` heads), or drop the weakest query head of
every kept group (``a`` heads). A greedy pass over all layers repeatedly takes the move with the lowest score lost
per head removed, never going below the per-layer floor and never past the target, until the target count is
reached. Multi-head models (GPT-2, OPT, BERT) are the case ``b = 1``: each move drops one head.
MLP channels have no structure to respect: each layer loses its lowest-scoring channels, ``mlp_ratio`` of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hf_vram.pruning.plan import LayerHeads, PruningPlan
from hf_vram.pruning.scores import Scores


@dataclass
class _LayerState:
    layer: int
    group: int  # query heads per KV head in the original model
    kept: dict[int, list[int]]  # kept KV head -> its kept query heads (original indices)
    score: dict[int, float]  # original query head -> score

    def heads(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def moves(self, floor: int) -> list[tuple[float, int, str]]:
        """(cost per head, heads removed, kind) for each legal move of this layer."""
        a = len(self.kept)
        b = len(next(iter(self.kept.values())))
        out = []
        if a > 1 and (a - 1) * b >= floor:
            cost = min(sum(self.score[q] for q in qs) for qs in self.kept.values())
            out.append((cost / b, b, "group"))
        if b > 1 and a * (b - 1) >= floor:
            cost = sum(min(self.score[q] for q in qs) for qs in self.kept.values())
            out.append((cost / a, a, "head"))
        return out

    def apply(self, kind: str) -> None:
        if kind == "group":
            weakest = min(self.kept, key=lambda kv: sum(self.score[q] for q in self.kept[kv]))
            del self.kept[weakest]
        else:
            for _kv, qs in self.kept.items():
                qs.remove(min(qs, key=lambda q: self.score[q]))

    def as_heads(self) -> LayerHeads:
        return LayerHeads(sorted(q for qs in self.kept.values() for q in qs), sorted(self.kept))


def _layer_states(plan: PruningPlan, scores: Scores) -> dict[int, _LayerState]:
    states = {}
    for layer, local_scores in scores.heads.items():
        n_q, n_kv = plan.num_heads[layer], plan.num_kv_heads[layer]
        group = n_q // n_kv
        current = plan.heads.get(layer, LayerHeads(list(range(n_q)), list(range(n_kv))))
        score = {q: float(s) for q, s in zip(current.q_heads, local_scores.tolist(), strict=True)}
        kept = {kv: [q for q in current.q_heads if q // group == kv] for kv in current.kv_heads}
        states[layer] = _LayerState(layer, group, kept, score)
    return states


def _greedy(states: list[_LayerState], to_remove: int, floor: int) -> int:
    removed = 0
    while removed < to_remove:
        options = [(cost, n, kind, s) for s in states for cost, n, kind in s.moves(floor) if n <= to_remove - removed]
        if not options:
            break
        cost, n, kind, state = min(options, key=lambda o: (o[0], o[3].layer))
        state.apply(kind)
        removed += n
    return removed


def _check_layers(ratios: dict, known: set[int], what: str) -> dict[int, float]:
    out = {}
    for key, ratio in ratios.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            layer = None
        if layer not in known:
            raise ValueError(
                f"hf_vram pruning: {what} names layer {key!r}, which this model does not have; layers are 0..{max(known)}."
            )
        out[layer] = ratio
    return out


def select(
    plan: PruningPlan, scores: Scores, head_ratio: float | dict, mlp_ratio: float | dict, min_heads_per_layer: int
) -> PruningPlan:
    """A new plan reaching ``head_ratio``/``mlp_ratio`` of the original counts, on top of ``plan``."""
    new = copy.deepcopy(plan)
    states = _layer_states(plan, scores)
    if states and isinstance(head_ratio, dict):
        for layer, ratio in _check_layers(head_ratio, set(states), "pruning.head_ratio").items():
            s = states[layer]
            target = round(ratio * plan.num_heads[layer]) - (plan.num_heads[layer] - s.heads())
            _greedy([s], max(target, 0), min_heads_per_layer)
    elif states and head_ratio > 0:
        total = sum(plan.num_heads[layer] for layer in states)
        already = sum(plan.num_heads[layer] - s.heads() for layer, s in states.items())
        _greedy(list(states.values()), max(round(head_ratio * total) - already, 0), min_heads_per_layer)
    for layer, s in states.items():
        if s.heads() < plan.num_heads[layer]:
            new.heads[layer] = s.as_heads()
    if scores.channels:
        ratios = (
            _check_layers(mlp_ratio, set(scores.channels), "pruning.mlp_ratio")
            if isinstance(mlp_ratio, dict)
            else dict.fromkeys(scores.channels, mlp_ratio)
        )
        for layer, ratio in ratios.items():
            kept = plan.kept_channels(layer)
            target = round(ratio * plan.channels[layer]) - (plan.channels[layer] - len(kept))
            target = min(target, len(kept) - 1)
            if target <= 0:
                continue
            order = torch.argsort(scores.channels[layer], stable=True)[:target].tolist()
            drop = {kept[i] for i in order}
            new.mlp_removed[layer] = sorted(set(plan.mlp_removed.get(layer, [])) | drop)
    new.validate()
    return new
