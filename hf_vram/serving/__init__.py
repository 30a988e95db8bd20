"""Serving: ``hf-vram serve`` runs Transformers' own OpenAI-compatible server with hf_vram registered
(``server``), behind admission, tenant quotas and Prometheus metrics (``admission``)."""

from hf_vram.serving.admission import AdmissionMiddleware, AdmissionPolicy, ServerMetrics, TenantQuota
from hf_vram.serving.loader import apply_kv_overrides
from hf_vram.serving.server import kv_overrides, serve

__all__ = [
    "AdmissionMiddleware",
    "AdmissionPolicy",
    "ServerMetrics",
    "TenantQuota",
    "apply_kv_overrides",
    "kv_overrides",
    "serve",
]
