"""Memory planning: estimate a config's bytes before loading, and choose a config that fits a budget.

- ``estimate`` (``estimate.py``): weights, KV cache and activation bytes from a meta-device model.
- ``plan_budget`` (``budget.py``): per-layer schemes, pruning and KV dtype for ``target_memory``, least loss first,
  from the per-layer sensitivities of ``sensitivity.py``.
"""

from hf_vram.planner.budget import BudgetPlan, plan_budget
from hf_vram.planner.estimate import MemoryEstimate, cache_bytes, estimate, measure_activations

__all__ = ["BudgetPlan", "MemoryEstimate", "cache_bytes", "estimate", "measure_activations", "plan_budget"]
