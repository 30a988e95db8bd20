"""Admission, tenants and metrics in front of Transformers' server: an ASGI middleware, nothing of the server forked.

Under overload a server must answer every request, right or with a clear refusal, and never take more work than its
memory holds. Each generation request (``POST /v1/...``) is admitted only while its tenant and the whole server are
under their concurrency caps and, when the policy knows the KV budget in tokens, while the K/V it may need (prompt
tokens plus ``max_tokens``, counted by the server's ``sizer``) fits what the admitted requests leave of the budget
and of its tenant's share; past that it waits in a bounded queue, and past the queue it gets ``429 Too Many
Requests`` with ``Retry-After`` at once. A request that could never fit gets ``400`` naming the numbers; one the
sizer cannot read is counted at its tenant's whole share (never at nothing). A request holds its slot until its last
body byte is sent, or until the client goes away (a disconnected stream frees its slot at once). An API key
(``Authorization: Bearer KEY``) maps to a tenant with its own caps, so one tenant's burst waits in its own queue
while the others keep their slots; an unknown key gets ``401``.

``GET /metrics`` (Prometheus text): requests by tenant and outcome, in flight and queued by tenant, time to first
byte (the first streamed token) and request time histograms by tenant, and, with a KV budget, the KV tokens each
tenant's admitted requests hold (prompt + max_tokens: what admission reserves for them) and what is left of its
share.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hf_vram.kvcache.continuous import pool_blocks

ANONYMOUS = "default"


@dataclass
class TenantQuota:
    """One tenant's share: requests it may run at once, and how many more may wait."""

    name: str
    max_concurrent: int
    max_queued: int = 0
    kv_share: float = 1.0

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queued < 0 or not 0 < self.kv_share <= 1:
            raise ValueError(
                f"hf-vram serve: tenant {self.name!r} needs max_concurrent >= 1, max_queued >= 0 and 0 < kv_share <= 1 "
                f"(got {self.max_concurrent}, {self.max_queued}, {self.kv_share})."
            )


@dataclass
class AdmissionPolicy:
    """The server's caps, and the tenants by API key (none: every request is the anonymous tenant's)."""

    max_concurrent: int
    max_queued: int = 0
    tenants: dict[str, TenantQuota] = field(default_factory=dict)
    retry_after_s: int = 1
    kv_tokens: int | None = None  # the KV budget in tokens (every layer); None: admission by counts only

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queued < 0:
            raise ValueError(
                f"hf-vram serve: --max-concurrent must be >= 1 and --max-queued >= 0 (got {self.max_concurrent}, "
                f"{self.max_queued})."
            )

    @classmethod
    def from_file(cls, path: str | Path, max_concurrent: int, max_queued: int) -> AdmissionPolicy:
        """A YAML file: ``tenants: [{name, api_key, max_concurrent, max_queued, kv_share}]`` (keys given once
        each; ``kv_share``: the fraction of the KV budget the tenant may hold, 1 by default)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        tenants: dict[str, TenantQuota] = {}
        for entry in data.get("tenants") or []:
            unknown = set(entry) - {"name", "api_key", "max_concurrent", "max_queued", "kv_share"}
            if unknown or "api_key" not in entry or "name" not in entry:
                raise ValueError(
                    f"hf-vram serve: {path}: each tenant needs name, api_key, max_concurrent (and may set "
                    f"max_queued, kv_share); got {sorted(entry)}."
                )
            if entry["api_key"] in tenants:
                raise ValueError(f"hf-vram serve: {path}: the API key of tenant {entry['name']!r} is given twice.")
            tenants[entry["api_key"]] = TenantQuota(
                entry["name"],
                int(entry["max_concurrent"]),
                int(entry.get("max_queued", 0)),
                float(entry.get("kv_share", 1.0)),
            )
        if not tenants:
            raise ValueError(f"hf-vram serve: {path} names no tenants (a list under 'tenants').")
        return cls(max_concurrent, max_queued, tenants)

    def kv_limit(self, tenant: TenantQuota) -> int | None:
        """The KV tokens ``tenant`` may hold at once, or None when admission does not count tokens."""
        return None if self.kv_tokens is None else int(self.kv_tokens * tenant.kv_share)

    def tenant(self, api_key: str | None) -> TenantQuota | None:
        """The tenant of a key; with no tenants configured, the anonymous one with the server's caps."""
        if not self.tenants:
            return TenantQuota(ANONYMOUS, self.max_concurrent, self.max_queued)
        return self.tenants.get(api_key or "")


class ServerMetrics:
    """The Prometheus series the middleware keeps (a registry of its own: several servers in one process stay
    apart). ``pool``: where the K/V pool's ``(held, free)`` blocks come from: this process's continuous-batching
    caches, or, where the model runs in a process of its own, what that process publishes
    (``hf_vram.serving.loader.PoolFile``)."""

    def __init__(self, pool: Callable[[], tuple[int, int]] | None = None) -> None:
        pool = pool or pool_blocks
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hf_vram_requests", "Generation requests by outcome", ["tenant", "outcome"], registry=self.registry
        )
        self.in_flight = Gauge("hf_vram_in_flight", "Requests running", ["tenant"], registry=self.registry)
        self.queued = Gauge("hf_vram_queued", "Requests waiting for a slot", ["tenant"], registry=self.registry)
        self.first_byte = Histogram(
            "hf_vram_time_to_first_byte_seconds",
            "From admission to the first body byte (the first token of a stream)",
            ["tenant"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "hf_vram_request_seconds", "From arrival to the last body byte", ["tenant"], registry=self.registry
        )
        self.kv_held = Gauge(
            "hf_vram_kv_tokens_held", "KV tokens reserved by admitted requests", ["tenant"], registry=self.registry
        )
        self.kv_free = Gauge("hf_vram_kv_tokens_free", "KV tokens left of the tenant's share", ["tenant"], registry=self.registry)
        held = Gauge(
            "hf_vram_kv_pool_blocks_held",
            "KV pool blocks running requests hold (pages and windows), read from the continuous-batching cache",
            registry=self.registry,
        )
        free = Gauge("hf_vram_kv_pool_blocks_free", "KV pool blocks free", registry=self.registry)
        held.set_function(lambda: pool()[0])
        free.set_function(lambda: pool()[1])

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Slots:
    """Running and waiting counts, for the server and each tenant; one condition wakes waiters when a slot frees."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.running: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.tokens: dict[str, int] = {}  # KV tokens the running requests of each tenant may hold
        self.changed = asyncio.Condition()

    def _can_run(self, tenant: TenantQuota, need: int) -> bool:
        limit = self.policy.kv_limit(tenant)
        fits = limit is None or (
            sum(self.tokens.values()) + need <= self.policy.kv_tokens and self.tokens.get(tenant.name, 0) + need <= limit
        )
        return (
            fits
            and sum(self.running.values()) < self.policy.max_concurrent
            and self.running.get(tenant.name, 0) < tenant.max_concurrent
        )

    def _can_wait(self, tenant: TenantQuota) -> bool:
        return sum(self.waiting.values()) < self.policy.max_queued and self.waiting.get(tenant.name, 0) < tenant.max_queued

    async def acquire(self, tenant: TenantQuota, need: int = 0) -> bool:
        """Take a slot and ``need`` KV tokens, waiting in the queue if there is room there; False when neither
        has room."""
        async with self.changed:
            if not self._can_run(tenant, need):
                if not self._can_wait(tenant):
                    return False
                self.waiting[tenant.name] = self.waiting.get(tenant.name, 0) + 1
                try:
                    await self.changed.wait_for(lambda: self._can_run(tenant, need))
                finally:
                    self.waiting[tenant.name] -= 1
            self.running[tenant.name] = self.running.get(tenant.name, 0) + 1
            self.tokens[tenant.name] = self.tokens.get(tenant.name, 0) + need
            return True

    async def release(self, tenant: TenantQuota, need: int = 0) -> None:
        async with self.changed:
            self.running[tenant.name] -= 1
            self.tokens[tenant.name] -= need
            self.changed.notify_all()


def _api_key(scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            text = value.decode("latin-1")
            return text[7:].strip() if text.lower().startswith("bearer ") else text.strip()
    return None


async def _json_reply(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "hf_vram_admission", "code": status}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AdmissionMiddleware:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app, policy: AdmissionPolicy, metrics: ServerMetrics, sizer: Callable[[dict], int] | None = None) -> None:
        self.app = app
        self.policy = policy
        self.metrics = metrics
        self.sizer = sizer  # request body -> KV tokens it may hold (prompt + max new tokens)
        self.slots = _Slots(policy)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            body = self.metrics.text()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            return await send({"type": "http.response.body", "body": body, "more_body": False})
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        return await self._admitted(scope, receive, send)

    async def _size(self, receive, tenant: TenantQuota) -> tuple[int, Callable]:
        """The request's KV tokens (0 when admission does not count tokens; the tenant's whole share when the sizer
        cannot read the body, so an unreadable request never slips past the budget), and a ``receive`` that replays
        the body already read."""
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message.get("type") == "http.request" and message.get("more_body", False)
        need, limit = 0, self.policy.kv_limit(tenant)
        if self.sizer is not None and limit is not None:
            try:
                need = int(self.sizer(json.loads(b"".join(m.get("body", b"") for m in messages) or b"{}")))
            except (ValueError, TypeError, KeyError, AttributeError):
                need = limit
        pending = list(messages)

        async def replay():
            return pending.pop(0) if pending else await receive()

        return need, replay

    async def _admitted(self, scope, receive, send) -> None:
        arrived = time.perf_counter()
        tenant = self.policy.tenant(_api_key(scope))
        if tenant is None:
            self.metrics.requests.labels("unknown", "unauthorized").inc()
            return await _json_reply(send, 401, "hf-vram serve: unknown API key; use a key from the tenants file.")
        need, receive = await self._size(receive, tenant)
        limit = self.policy.kv_limit(tenant)
        if limit is not None and need > limit:
            self.metrics.requests.labels(tenant.name, "too_large").inc()
            message = (
                f"hf-vram serve: this request may need {need} tokens of KV cache (prompt + max_tokens), and tenant "
                f"{tenant.name!r} may hold {limit}; lower max_tokens or shorten the prompt."
            )
            return await _json_reply(send, 400, message)
        self.metrics.queued.labels(tenant.name).inc()
        try:
            admitted = await self.slots.acquire(tenant, need)
        finally:
            self.metrics.queued.labels(tenant.name).dec()
        if not admitted:
            self.metrics.requests.labels(tenant.name, "rejected").inc()
            retry = [(b"retry-after", str(self.policy.retry_after_s).encode())]
            message = f"hf-vram serve: tenant {tenant.name!r} is at its concurrency and queue caps; retry shortly."
            return await _json_reply(send, 429, message, retry)
        self.metrics.requests.labels(tenant.name, "admitted").inc()
        self.metrics.in_flight.labels(tenant.name).inc()
        self._kv_gauges(tenant)
        started, first = time.perf_counter(), []

        async def timed_send(message) -> None:
            if message["type"] == "http.response.body" and not first and message.get("body"):
                first.append(time.perf_counter())
                self.metrics.first_byte.labels(tenant.name).observe(first[0] - started)
            await send(message)

        outcome = "failed"
        try:
            await self.app(scope, receive, timed_send)
            outcome = "completed"
        finally:  # finished, failed, or the client went away: the slot frees at once
            self.metrics.requests.labels(tenant.name, outcome).inc()
            self.metrics.in_flight.labels(tenant.name).dec()
            self.metrics.duration.labels(tenant.name).observe(time.perf_counter() - arrived)
            await self.slots.release(tenant, need)
            self._kv_gauges(tenant)

    def _kv_gauges(self, tenant: TenantQuota) -> None:
        limit = self.policy.kv_limit(tenant)
        if limit is not None:
            held = self.slots.tokens.get(tenant.name, 0)
            self.metrics.kv_held.labels(tenant.name).set(held)
            self.metrics.kv_free.labels(tenant.name).set(limit - held)
