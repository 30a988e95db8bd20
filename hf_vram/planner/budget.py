"""The budget planner: the least-loss mix of per-layer schemes (and pruning, and KV dtype) under a byte budget.

1. Bytes: each linear layer's size as float, int8 and int4 (the real layers, built on the meta device), plus
   everything that is not a linear layer (norms, the embedding in int8, biases).
2. Cost: the Fisher-weighted quantization error of each layer and scheme (``sensitivity.py``).
3. Greedy multiple-choice knapsack: start with every layer float; repeatedly take the step (float->int8 or
   int8->int4 on one layer) with the least cost per byte saved, until the model fits.
4. When int4 everywhere does not fit, MLP channels are pruned (Taylor scores, global, so insensitive layers lose
   more) by the smallest ratio, in 5% steps, that fits; the knapsack is then re-run on the pruned sizes.
5. With ``context_tokens`` > 0 one sequence of that many tokens counts against the budget: its KV cache in each
   storage ``planner.kv_dtypes`` allows (the model's dtype; int8, 4x smaller than float32; int4/int2 pages for
   continuous batching) and its prefill's activation peak for each chunk size (one pass, 4096 ... 512 tokens:
   ``estimate.context_bytes``). Each storage's cost is measured like the weights': the calibration loss with
   the K/V read back as that storage holds them (``kvcache.readback.quantized_kv_attention``). Every (storage, chunk)
   pair gets its own knapsack; the plan is the one with the least pruning, then the least estimated loss (weights'
   plus K/V's), then the finer K/V storage, then the larger chunk (chunking changes no token, only speed).
If even int4 everywhere with ``max_mlp_ratio`` of the channels pruned does not fit, a ``ValueError`` names the
smallest size reachable.
"""

from __future__ import annotations

import copy
import functools
import heapq
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hf_vram.config import VramOptimizationConfig
from hf_vram.data import default_calibration_ids
from hf_vram.kvcache.continuous import KV_BITS
from hf_vram.kvcache.kivi import GROUP, WINDOWED_BITS
from hf_vram.kvcache.readback import quantized_kv_attention
from hf_vram.memory.report import memory_report
from hf_vram.planner.estimate import context_bytes
from hf_vram.planner.meta_model import tensor_bytes
from hf_vram.planner.sensitivity import fisher_diagonal, layer_costs
from hf_vram.pruning.scores import compute_scores
from hf_vram.pruning.selection import select
from hf_vram.pruning.sites import check_supported, mlp_sites
from hf_vram.pruning.surgery import applied_plan
from hf_vram.quant.apply import select_layers
from hf_vram.quant.build import linear_shape, make_layer

logger = logging.getLogger("hf_vram")
LEVELS = ("none", "int8", "int4")
RATIO_STEP = 0.05
PREFILL_CHUNKS = (None, 4096, 2048, 1024, 512)  # the chunk sizes the planner weighs (None: the prompt in one pass)


@dataclass
class BudgetPlan:
    """What the planner chose, what it expects, and (after the stages ran) what was measured."""

    budget_bytes: int
    estimated_bytes: int
    layer_schemes: dict[str, str]
    mlp_ratio: float
    kv_dtype: str
    kv_bytes: int
    estimated_loss_increase: float
    calibration_loss: float
    measured_loss_increase: float | None = None
    measured_bytes: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    prefill_chunk: int | None = None
    activation_bytes: int = 0
    kv_loss_increase: float = 0.0
    context_options: dict = field(default_factory=dict)  # what it chose from: K/V [bytes, loss], chunk bytes

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "layer_schemes"}

    def table(self) -> str:
        mib = 2**20
        lines = [
            f"hf_vram plan for a budget of {self.budget_bytes / mib:.1f} MiB",
            "  linear layers: " + ", ".join(f"{n} {s}" for s, n in self.counts.items() if n),
            f"  MLP channels pruned: {self.mlp_ratio:.0%}",
            f"  KV cache: {self.kv_dtype}, {self.kv_bytes / mib:.1f} MiB (loss +{self.kv_loss_increase:.4f})",
            f"  prefill: {f'chunks of {self.prefill_chunk} tokens' if self.prefill_chunk else 'one pass'}, "
            f"activations {self.activation_bytes / mib:.1f} MiB",
            f"  estimated: {self.estimated_bytes / mib:.1f} MiB, loss +{self.estimated_loss_increase:.4f} (Fisher)",
        ]
        if self.measured_bytes is not None:
            lines.append(
                f"  measured:  {self.measured_bytes / mib:.1f} MiB, loss +{self.measured_loss_increase:.4f}"
                f" on the calibration text (from {self.calibration_loss:.4f})"
            )
        return "\n".join(lines)


def _layer_bytes(in_features: int, out_features: int, bias: bool, elt: int, section, scheme: str) -> int:
    """Bytes of one linear layer of this shape under ``scheme`` (the real layer class, built on the meta device)."""
    if scheme == "none":
        return (in_features * out_features + (out_features if bias else 0)) * elt
    with torch.device("meta"):
        layer = make_layer(nn.Linear(in_features, out_features, bias=bias), section, "meta", scheme)
    return tensor_bytes(layer)


def _shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int, bool, int]]:

    out = {}
    for name in names:
        module = model.get_submodule(name)
        in_f, out_f, _ = linear_shape(module)
        out[name] = (in_f, out_f, getattr(module, "bias", None) is not None, module.weight.element_size())
    return out


def _pruned_shapes(model: nn.Module, shapes: dict, plan) -> dict[str, tuple[int, int, bool, int]]:
    """The linear shapes after a pruning plan's MLP cuts (exact: the plan is what will be applied)."""
    shapes = dict(shapes)
    for site in mlp_sites(model):
        kept = len(plan.kept_channels(site.layer))
        for name in site.up_names:
            if name in shapes:
                in_f, _, bias, elt = shapes[name]
                shapes[name] = (in_f, kept * (2 if site.halves else 1), bias, elt)
        if site.down_name in shapes:
            _, out_f, bias, elt = shapes[site.down_name]
            shapes[site.down_name] = (kept, out_f, bias, elt)
    return shapes


def _knapsack(costs, sizes, fixed: int, budget: int) -> tuple[dict[str, str], int] | None:
    """Greedy least-cost-per-byte descent from all-float; None when int4 everywhere does not fit."""
    level = dict.fromkeys(costs, 0)
    total = fixed + sum(sizes[n]["none"] for n in costs)
    heap = []

    def push(name: str) -> None:
        cur = level[name]
        if cur + 1 < len(LEVELS):
            a, b = LEVELS[cur], LEVELS[cur + 1]
            saved = sizes[name][a] - sizes[name][b]
            rise = max(costs[name][b] - costs[name][a], 0.0)
            heapq.heappush(heap, (rise / max(saved, 1), name))

    for name in costs:
        push(name)
    while total > budget and heap:
        _, name = heapq.heappop(heap)
        a, b = LEVELS[level[name]], LEVELS[level[name] + 1]
        total -= sizes[name][a] - sizes[name][b]
        level[name] += 1
        push(name)
    if total > budget:
        return None
    return {n: LEVELS[i] for n, i in level.items()}, total


def plan_budget(model: nn.Module, config: VramOptimizationConfig, calibration_ids: torch.Tensor | None = None) -> BudgetPlan:
    """Choose the plan for ``config.planner.target_memory`` on a float model in memory; writes it into ``config``."""
    planner, section = config.planner, copy.deepcopy(config.quantization)
    if config.fusion.enabled and config.fusion.projections:
        raise ValueError(
            "hf_vram planner: target_memory plans per-layer schemes on the unfused layers; set "
            "fusion.projections: false (fused norms and attention are fine)."
        )
    if config.pruning.enabled:
        raise ValueError("hf_vram planner: target_memory chooses the pruning itself; remove the pruning section.")
    if section.scheme in ("none", "w8a8"):
        section.scheme = "int8"
    section.quantize_embeddings = True
    section.layer_schemes = None
    if calibration_ids is None:
        calibration_ids = default_calibration_ids(model, planner.calibration_samples, planner.calibration_length)
    targets = select_layers(model, section)
    names = list(targets.linears)
    shapes = _shapes(model, names)
    embedding = model.get_input_embeddings()
    # int8 rows, float32 scales and their bfloat16 kernel copy (``Int8RowsMixin``) in place of the float rows
    emb_saving = embedding.weight.numel() * (embedding.weight.element_size() - 1) - embedding.num_embeddings * 6
    fixed = tensor_bytes(model) - sum(_layer_bytes(*shapes[n][:3], shapes[n][3], section, "none") for n in names)
    fixed -= max(emb_saving, 0)
    budget = planner.target_memory
    if fixed >= budget:  # before any calibration pass: no choice of the planner's changes these bytes
        raise ValueError(
            f"hf_vram planner: nothing fits target_memory={budget / 2**20:.1f} MiB: what no plan changes (the int8 "
            f"embedding, norms, the layers it does not quantize) alone needs {fixed / 2**20:.1f} MiB. Raise "
            "target_memory."
        )
    fisher, base_loss = fisher_diagonal(model, names, calibration_ids)
    tokens_per_batch = calibration_ids[:2].numel()  # the squared gradient of a batch mean is ~F / tokens
    costs = {n: {k: v * tokens_per_batch for k, v in c.items()} for n, c in layer_costs(model, fisher, section).items()}
    try:
        check_supported(model, False, True)
        channel_scores = compute_scores(model, "taylor", calibration_ids, heads=False, channels=True)
    except NotImplementedError:
        channel_scores = None  # an architecture pruning does not know: quantization only
    ratios = [round(k * RATIO_STEP, 2) for k in range(int(round(planner.max_mlp_ratio / RATIO_STEP)) + 1)]
    if channel_scores is None:
        ratios = [0.0]

    @functools.cache
    def options(ratio: float):
        plan = select(applied_plan(model), channel_scores, 0.0, ratio, 1) if ratio else None
        cut = _pruned_shapes(model, shapes, plan) if plan else shapes
        sizes = {n: {s: _layer_bytes(*cut[n][:3], cut[n][3], section, s) for s in LEVELS} for n in names}
        return sizes, plan

    def search(extra: int):
        """The least-pruned plan that fits beside ``extra`` bytes: (schemes, total, ratio, pruning plan) or None."""
        for ratio in ratios:
            sizes, plan = options(ratio)
            found = _knapsack(costs, sizes, fixed + extra, budget)
            if found is not None:
                return found[0], found[1], ratio, plan
        return None

    context = _context_options(model, config, calibration_ids, base_loss)
    best, best_key = None, None
    for rank, (kv_name, kv_bytes, kv_loss) in enumerate(context.kv):
        for chunk, activations in context.activations.items():
            found = search(kv_bytes + activations)
            if found is None:
                continue
            schemes, _, ratio, _ = found
            loss = sum(costs[n][s] for n, s in schemes.items()) + kv_loss
            key = (ratio, loss, rank, -(chunk or math.inf))
            if best_key is None or key < best_key:
                best, best_key = (found, (kv_name, kv_bytes, kv_loss), (chunk, activations)), key
    if best is None:
        sizes, _ = options(ratios[-1])
        kv_name, kv_bytes, _ = min(context.kv, key=lambda kv: kv[1])
        chunk, activations = min(context.activations.items(), key=lambda item: item[1])
        smallest = fixed + kv_bytes + activations + sum(sizes[n]["int4"] for n in names)
        raise ValueError(
            f"hf_vram planner: nothing fits target_memory={budget / 2**20:.1f} MiB: the smallest plan (int4 "
            f"everywhere, {ratios[-1]:.0%} of MLP channels pruned, {kv_name} K/V, prefill "
            f"{f'chunks of {chunk}' if chunk else 'in one pass'}) needs {smallest / 2**20:.1f} MiB. Raise "
            "target_memory, lower planner.context_tokens, allow smaller K/V (planner.kv_dtypes) or more pruning "
            "(planner.max_mlp_ratio)."
        )
    (schemes, total, ratio, pruning_plan), kv, prefill = best
    options = {}
    if planner.context_tokens:
        options = {
            "kv": {name: [size, loss] for name, size, loss in context.kv},
            "prefill_activations": {str(c or "one pass"): size for c, size in context.activations.items()},
        }
    return _write(config, section, schemes, ratio, pruning_plan, (kv, prefill, options), total, budget, best_key[1], base_loss)


@dataclass
class _ContextOptions:
    """What one sequence of ``context_tokens`` may cost: per K/V storage (name, bytes, measured loss increase), in
    the order of ``planner.kv_dtypes``, and the prefill's activation bytes per chunk size."""

    kv: list[tuple[str, int, float]]
    activations: dict[int | None, int]


def _context_options(model: nn.Module, config: VramOptimizationConfig, ids: torch.Tensor, base_loss: float) -> _ContextOptions:
    tokens = config.planner.context_tokens
    if not tokens:
        return _ContextOptions([("float", 0, 0.0)], {None: 0})
    short = [n for n in config.planner.kv_dtypes if KV_BITS.get(n) in WINDOWED_BITS and ids.shape[1] < 2 * GROUP]
    if short:
        raise ValueError(
            f"hf_vram planner: the cost of {'/'.join(short)} K/V is measured on the calibration windows, and windows "
            f"of {ids.shape[1]} tokens fit in the {GROUP}-token window those pages keep before a group is quantized "
            f"(nothing would be measured); use windows of at least {2 * GROUP} tokens (planner.calibration_length) or drop "
            f"{'/'.join(short)} from planner.kv_dtypes."
        )
    chunks = [c for c in PREFILL_CHUNKS if c is None or c < tokens]
    activations, kv_bytes = context_bytes(model, config, tokens, chunks, config.planner.kv_dtypes)
    kv = []
    for name in config.planner.kv_dtypes:
        loss = 0.0
        if name in KV_BITS:
            with quantized_kv_attention(model, KV_BITS[name]):
                loss = max(calibration_loss(model, ids) - base_loss, 0.0)
        kv.append((name, kv_bytes[name], loss))
    return _ContextOptions(kv, activations)


def _write(config, section, schemes, ratio, pruning_plan, context, total, budget, est_loss, base_loss) -> BudgetPlan:
    """Put the chosen plan into the config (the plan the pipeline carries out and the model saves): the sections
    the planner resolved, the per-layer schemes, the pruning plan in its state, the K/V storage and prefill chunk."""
    (kv_name, kv_bytes, kv_loss), (chunk, activations), options = context
    config.quantization = section
    config.state.layer_schemes = schemes
    if pruning_plan is not None:
        config.pruning.enabled = True
        config.pruning.mlp_ratio = ratio
        config.pruning.method = "taylor"
        config.state.pruning_plan = pruning_plan.to_dict()  # exactly the channels the sizes were computed for
    if kv_name in KV_BITS:
        config.kv_cache = config.kv_cache.storing(kv_name)
    if chunk is not None:
        config.kv_cache.prefill_chunk = chunk
    counts = {s: sum(1 for v in schemes.values() if v == s) for s in ("none", "int8", "int4")}
    plan = BudgetPlan(
        budget, total, schemes, ratio, kv_name, kv_bytes, est_loss, base_loss, counts=counts,
        prefill_chunk=chunk, activation_bytes=activations, kv_loss_increase=kv_loss, context_options=options,
    )  # fmt: skip
    config.state.budget = plan.as_dict()
    logger.info("%s", plan.table())
    return plan


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 2) -> float:
    device = next(model.parameters()).device
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in calibration_ids.split(batch_size)]
    return sum(losses) / len(losses)


def measure_plan(
    model: nn.Module, config: VramOptimizationConfig, plan: BudgetPlan, calibration_ids: torch.Tensor | None = None
) -> BudgetPlan:
    """After the stages ran: the real bytes and loss of the plan; prints the plan; refuses a plan over budget."""
    if calibration_ids is None:
        calibration_ids = default_calibration_ids(model, config.planner.calibration_samples, config.planner.calibration_length)
    plan.measured_bytes = memory_report(model).total + plan.kv_bytes + plan.activation_bytes  # K/V, prefill: estimated
    plan.measured_loss_increase = calibration_loss(model, calibration_ids) - plan.calibration_loss
    config.state.budget = plan.as_dict()
    print(plan.table())
    if plan.measured_bytes > plan.budget_bytes:
        raise RuntimeError(
            f"hf_vram planner: the applied plan holds {plan.measured_bytes / 2**20:.2f} MiB, over the "
            f"{plan.budget_bytes / 2**20:.2f} MiB budget (estimated {plan.estimated_bytes / 2**20:.2f}); this is a "
            "planner bug, please report it; meanwhile lower target_memory slightly."
        )
    return plan
