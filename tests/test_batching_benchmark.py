"""The batching benchmark's own arithmetic: the budget left free while requests wait, and the round-by-round ratios
``--repeat`` writes beside the table (what BENCHMARKS.md's issue-22 numbers rest on)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def batching(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import batching

    return batching


def test_budget_free_is_weighted_by_time_and_counts_only_while_requests_wait(batching):
    samples = [(0.0, 0.5, 3), (1.0, 0.1, 2), (3.0, 0.0, 0), (4.0, 0.9, 0), (5.0, 0.2, 1)]
    # waiting at 0 (for 1 s, 50% free) and at 1 (for 2 s, 10% free); the last sample has no span after it
    assert batching._unused_while_queued(samples) == pytest.approx((0.5 * 1 + 0.1 * 2) / 3)
    assert batching._unused_while_queued([(0.0, 0.4, 0), (2.0, 0.1, 0)]) == 0.0


def _run(tokens_per_s: float, mean: float, queued: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "mean_concurrent": mean, "queued_concurrent": queued}


def test_rounds_note_pairs_each_round_with_bf16s_same_round(batching):
    bf16 = {"name": "continuous batching, bf16 KV", **_run(70.0, 4.8, 4.8), "repeats": [_run(80.0, 5.0, 5.0)]}
    int4 = {"name": "continuous batching, hf_vram int4 KV", **_run(140.0, 15.6, 16.8), "repeats": [_run(120.0, 16.0, 16.0)]}
    note = batching._rounds_note([bf16, int4], bf16)
    assert "every row ran 2 times" in note
    assert "hf_vram int4 KV: tokens/s 2.00x, 1.50x; mean concurrency 3.25x, 3.20x, while queued 3.50x, 3.20x" in note
    assert "tokens/s 70.0, 80.0, mean concurrency 4.80, 5.00" in note
    assert batching._rounds_note([{**bf16, "repeats": []}, int4], {**bf16, "repeats": []}) == ""
