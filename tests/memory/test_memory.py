"""memory_report counts storages once and by kind; the peak tracker sees allocations and frees."""

from __future__ import annotations

import torch

import hf_vram
from tests.tiny_models import build_tiny, sample_ids


def test_report_counts_tied_storage_once():
    model = build_tiny("llama")  # tied embeddings
    report = hf_vram.memory_report(model)
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() de-duplicates
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert report.total == expected
    assert report.by_kind["embeddings"] == model.model.embed_tokens.weight.numel() * 4
    assert report.by_kind["norms"] > 0 and report.by_kind["float weights"] > 0
    assert "total" in report.table()


def test_report_after_int8_shrinks_and_splits_kinds():
    model = build_tiny("llama")
    before = hf_vram.memory_report(model).total
    hf_vram.optimize(model, {"quantization": {"scheme": "int8", "quantize_embeddings": True}})
    report = hf_vram.memory_report(model)
    assert report.by_kind["quantized weights"] > 0 and report.by_kind["scales"] > 0
    assert report.by_kind["float weights"] == 0 and report.by_kind["embeddings"] == 0
    assert report.total < 0.3 * before
    assert report.by_dtype["int8"] == report.by_kind["quantized weights"]


def test_peak_tracker_sees_transient_allocations():
    with hf_vram.track_peak_memory() as peak:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(2000, dtype=torch.float32)  # 8000 B
        del a, b
        c = torch.empty(500, dtype=torch.float32)  # 2000 B, kept
    assert peak.peak_bytes == 12000
    assert peak.retained_bytes == 2000
    del c


def test_peak_tracker_counts_views_once_and_a_forward():
    with hf_vram.track_peak_memory() as peak:
        x = torch.ones(256, 256)
        views = [x[i] for i in range(10)]
        del views
    assert peak.peak_bytes == 256 * 256 * 4
    model = build_tiny("llama")
    ids = sample_ids(1, 64)
    with torch.inference_mode(), hf_vram.track_peak_memory() as small:
        model(ids[:, :16])
    with torch.inference_mode(), hf_vram.track_peak_memory() as large:
        model(ids)
    assert 0 < small.peak_bytes < large.peak_bytes


def test_report_counts_fbgemm_packed_weights():
    int8 = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8"}})
    w8a8 = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "w8a8"}})
    w8a8(sample_ids())  # packed for FBGEMM: the qweight buffers are now empty, the codes live in the packed weight
    a, b = hf_vram.memory_report(int8), hf_vram.memory_report(w8a8)
    assert b.by_kind["quantized weights"] >= a.by_kind["quantized weights"]
    assert abs(b.total - a.total) / a.total < 0.1
