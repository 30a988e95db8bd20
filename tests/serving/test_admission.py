"""Admission in front of the server, at the ASGI level (deterministic: the app below answers only when a test opens
its gate): caps, a bounded queue, 429 with Retry-After past it, tenants kept apart, slots freed by failures and
disconnects, and the Prometheus series."""

from __future__ import annotations

import asyncio

import pytest

from hf_vram.serving import AdmissionMiddleware, AdmissionPolicy, ServerMetrics, TenantQuota


class GatedApp:
    """Streams one chunk, then waits for its gate before the last one (a long generation, held open)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def __call__(self, scope, receive, send) -> None:
        self.started += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first token", "more_body": True})
        await self.gate.wait()
        await send({"type": "http.response.body", "body": b" and the rest", "more_body": False})


async def _request(
    app, key: str | None = None, path: str = "/v1/chat/completions", method: str = "POST", body: bytes = b"{}"
) -> dict:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    reply = {"status": None, "headers": {}, "body": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
            reply["headers"] = dict(message["headers"])
        else:
            reply["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return reply


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_overload_admits_to_the_caps_queues_to_the_bound_and_refuses_the_rest_with_retry_after():
    async def run():
        inner, metrics = GatedApp(), ServerMetrics()
        app = AdmissionMiddleware(inner, AdmissionPolicy(max_concurrent=2, max_queued=3), metrics)
        tasks = [asyncio.create_task(_request(app)) for _ in range(20)]
        await _settle()
        refused = [t.result() for t in tasks if t.done()]
        assert inner.started == 2 and len(refused) == 15  # 2 running, 3 waiting, 15 told to come back
        assert all(r["status"] == 429 and r["headers"][b"retry-after"] == b"1" for r in refused)
        assert b"concurrency and queue caps" in refused[0]["body"]
        inner.gate.set()
        done = await asyncio.gather(*tasks)
        served = [r for r in done if r["status"] == 200]
        assert len(served) == 5 and all(r["body"] == b"first token and the rest" for r in served)
        text = (await _request(app, path="/metrics", method="GET"))["body"].decode()
        assert 'hf_vram_requests_total{outcome="rejected",tenant="default"} 15.0' in text
        assert 'hf_vram_requests_total{outcome="completed",tenant="default"} 5.0' in text
        assert 'hf_vram_in_flight{tenant="default"} 0.0' in text and "hf_vram_time_to_first_byte_seconds_count" in text

    asyncio.run(run())


def test_a_tenants_burst_waits_in_its_own_queue_while_another_tenant_runs():
    async def run():
        burst, quiet = GatedApp(), None
        policy = AdmissionPolicy(
            max_concurrent=4,
            max_queued=64,
            tenants={"key-a": TenantQuota("bursty", 2, 30), "key-b": TenantQuota("quiet", 2, 0)},
        )
        app = AdmissionMiddleware(burst, policy, ServerMetrics())
        flood = [asyncio.create_task(_request(app, "key-a")) for _ in range(40)]
        await _settle()
        assert burst.started == 2 and sum(t.done() for t in flood) == 8  # 2 run, 30 wait, 8 refused
        quiet = asyncio.create_task(_request(app, "key-b"))
        await _settle()
        assert burst.started == 3  # the quiet tenant's request started at once, beside the burst
        assert (await _request(app, "nobody"))["status"] == 401
        burst.gate.set()
        assert (await quiet)["status"] == 200
        statuses = [r["status"] for r in await asyncio.gather(*flood)]
        assert statuses.count(200) == 32 and statuses.count(429) == 8

    asyncio.run(run())


def test_a_failed_or_disconnected_request_frees_its_slot_at_once():
    async def run():
        async def broken(scope, receive, send):
            raise ConnectionResetError("client went away")

        app = AdmissionMiddleware(broken, AdmissionPolicy(max_concurrent=1, max_queued=0), ServerMetrics())
        for _ in range(3):  # with a leaked slot the second would get 429
            with pytest.raises(ConnectionResetError):
                await _request(app)
        text = (await _request(app, path="/metrics", method="GET"))["body"].decode()
        assert 'hf_vram_requests_total{outcome="failed",tenant="default"} 3.0' in text

        inner = GatedApp()
        app = AdmissionMiddleware(inner, AdmissionPolicy(max_concurrent=1, max_queued=0), ServerMetrics())
        stream = asyncio.create_task(_request(app))
        await _settle()
        stream.cancel()  # the client disconnects mid-stream
        await asyncio.gather(stream, return_exceptions=True)
        inner.gate.set()
        assert (await _request(app))["status"] == 200

    asyncio.run(run())


def test_admission_by_kv_tokens_waits_for_room_and_refuses_what_never_fits():
    """With the KV budget known (100 tokens here) a request runs only while its tokens fit beside the running ones;
    one larger than the budget, or than its tenant's share, is refused with the numbers; the app sees the body."""

    async def run():
        inner = GatedApp()
        seen = []

        async def app_reading_body(scope, receive, send):
            seen.append((await receive())["body"])
            await inner(scope, receive, send)

        policy = AdmissionPolicy(
            max_concurrent=10,
            max_queued=5,
            kv_tokens=100,
            tenants={"a": TenantQuota("a", 10, 5), "half": TenantQuota("half", 10, 5, kv_share=0.5)},
        )
        sizer = lambda body: body["n"]  # noqa: E731 - the server's sizer counts prompt + max_tokens
        app = AdmissionMiddleware(app_reading_body, policy, ServerMetrics(), sizer=sizer)
        first = asyncio.create_task(_request(app, "a", body=b'{"n": 60}'))
        second = asyncio.create_task(_request(app, "a", body=b'{"n": 60}'))
        small = asyncio.create_task(_request(app, "a", body=b'{"n": 40}'))
        await _settle()
        assert inner.started == 2  # 60 + 40 fit; the second 60 waits for room
        too_big = await _request(app, "a", body=b'{"n": 150}')
        assert too_big["status"] == 400 and b"may need 150 tokens" in too_big["body"] and b"may hold 100" in too_big["body"]
        over_share = await _request(app, "half", body=b'{"n": 60}')
        assert over_share["status"] == 400 and b"may hold 50" in over_share["body"]
        inner.gate.set()
        assert [r["status"] for r in await asyncio.gather(first, second, small)] == [200, 200, 200]
        assert inner.started == 3 and seen.count(b'{"n": 60}') == 2

        # a body the sizer cannot read holds the tenant's whole share while it runs, never nothing
        inner.gate.clear()
        unread = asyncio.create_task(_request(app, "half", body=b"not json"))
        await _settle()
        assert inner.started == 4 and app.slots.tokens["half"] == 50
        text = (await _request(app, path="/metrics", method="GET"))["body"].decode()
        assert 'hf_vram_kv_tokens_held{tenant="half"} 50.0' in text and 'hf_vram_kv_tokens_free{tenant="half"} 0.0' in text
        assert 'hf_vram_kv_tokens_free{tenant="a"} 100.0' in text
        inner.gate.set()
        assert (await unread)["status"] == 200 and app.slots.tokens["half"] == 0
        text = (await _request(app, path="/metrics", method="GET"))["body"].decode()
        assert 'hf_vram_kv_tokens_held{tenant="half"} 0.0' in text and 'hf_vram_kv_tokens_free{tenant="half"} 50.0' in text

    asyncio.run(run())


def test_health_and_models_pass_untouched_and_bad_policies_name_the_fix(tmp_path):
    async def run():
        inner = GatedApp()
        inner.gate.set()
        app = AdmissionMiddleware(inner, AdmissionPolicy(max_concurrent=1), ServerMetrics())
        assert (await _request(app, path="/health", method="GET"))["status"] == 200

    asyncio.run(run())
    with pytest.raises(ValueError, match="max-concurrent must be >= 1"):
        AdmissionPolicy(max_concurrent=0)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - {name: a, api_key: k, max_concurrent: 2}\n  - {name: b, api_key: k, max_concurrent: 1}\n")
    with pytest.raises(ValueError, match="given twice"):
        AdmissionPolicy.from_file(tenants, 4, 8)
    tenants.write_text("tenants:\n  - {name: a, key: k}\n")
    with pytest.raises(ValueError, match="each tenant needs name, api_key"):
        AdmissionPolicy.from_file(tenants, 4, 8)
    tenants.write_text("tenants:\n  - {name: a, api_key: k, max_concurrent: 2, max_queued: 5}\n")
    policy = AdmissionPolicy.from_file(tenants, 4, 8)
    assert policy.tenant("k") == TenantQuota("a", 2, 5) and policy.tenant("other") is None


def test_steady_memory_caps_the_kernel_caches_unless_the_user_set_them():
    from hf_vram.serving.steady_memory import IDEEP_CACHE, ONEDNN_CACHE, steady_memory

    env: dict[str, str] = {}
    applied = steady_memory(env)
    assert env[ONEDNN_CACHE] == env[IDEEP_CACHE] == "16" and applied[:2] == [f"{ONEDNN_CACHE}=16", f"{IDEEP_CACHE}=16"]
    assert any("M_MMAP_THRESHOLD" in a for a in applied)  # glibc, as on every machine of this project
    mine = {ONEDNN_CACHE: "1024", IDEEP_CACHE: "1024", "MALLOC_MMAP_THRESHOLD_": "0"}
    assert steady_memory(mine) == [] and mine[ONEDNN_CACHE] == mine[IDEEP_CACHE] == "1024"


_SHAPES = """
import sys, torch
from hf_vram.serving.steady_memory import steady_memory
if sys.argv[1] == "steady":
    steady_memory()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
w = torch.randn(1536, 576, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(1, 576, dtype=torch.bfloat16), w)
start = rss()
for rows in range(2, 402):  # a continuous-batching server's steps: a new number of tokens nearly every step
    torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), w)
print(rss() - start)
"""


def test_steady_memory_keeps_a_server_from_growing_with_every_new_batch_shape():
    """400 bfloat16 linears of distinct row counts in a fresh process whose environment sets no cache size: with
    ``steady_memory`` applied first, the kernel caches stay small (on the AVX-512 Xeon: RSS +36 MiB; +295 as torch
    leaves it, +203 with oneDNN's cache alone held; where torch caches no kernels, all stay small)."""
    import os
    import subprocess
    import sys

    from hf_vram.serving.steady_memory import IDEEP_CACHE, ONEDNN_CACHE

    env = {k: v for k, v in os.environ.items() if k not in (IDEEP_CACHE, ONEDNN_CACHE)}
    out = subprocess.run(
        [sys.executable, "-c", _SHAPES, "steady"], capture_output=True, text=True, timeout=300, check=True, env=env
    )
    assert int(out.stdout.split()[-1]) <= 100, out.stdout
