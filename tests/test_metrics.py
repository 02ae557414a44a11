"""vrn.metrics (occupancy IoU, timing summaries, the repeat timer) and the CPU feature
probe of vrn.runtime.cpu."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vrn import metrics
from vrn.metrics import STAT_KEYS, occupancy_iou, ratio, repeat, summarize
from vrn.runtime import cpu


def test_occupancy_iou_on_known_volumes():
    a = np.zeros((2, 4, 4), np.float32)
    b = a.copy()
    a[0, :2] = 1.0   # 8 voxels
    b[0, :1] = 1.0   # 4 of them
    assert occupancy_iou(a, b) == pytest.approx(0.5)
    assert occupancy_iou(a, a) == 1.0
    assert occupancy_iou(a, np.zeros_like(a)) == 0.0
    assert occupancy_iou(np.zeros(3), np.zeros(3)) == 1.0  # both empty: they agree
    assert occupancy_iou(a * 0.4, b * 0.4, level=0.3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        occupancy_iou(a, a[:1])


def test_summarize_gives_mean_percentiles_and_extremes():
    stats = summarize([4.0, 1.0, 3.0, 2.0])
    assert set(stats) == {"n", *STAT_KEYS} and stats["n"] == 4
    assert stats["mean"] == pytest.approx(2.5) and stats["p50"] == pytest.approx(2.5)
    assert stats["min"] == 1.0 and stats["max"] == 4.0
    for q in metrics.PERCENTILES:
        assert stats[f"p{q}"] == pytest.approx(np.percentile([1, 2, 3, 4], q))
    assert summarize(np.arange(101.0))["p90"] == pytest.approx(90.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_summarize_rejects_empty_and_non_finite(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_ratio_is_reference_over_candidate():
    assert ratio(10.0, 4.0) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        ratio(0.0, 1.0)


def test_repeat_warms_up_then_times_every_run():
    calls = []
    timed = repeat(lambda: calls.append(len(calls)) or len(calls), runs=4, warmup=2)
    assert len(calls) == 6 and timed.result == 6
    assert len(timed.wall_ms) == len(timed.cpu_ms) == 4
    assert all(ms >= 0 for ms in timed.wall_ms + timed.cpu_ms)
    assert timed.summary()["n"] == 4


def test_repeat_stops_at_the_budget_after_min_runs():
    timed = repeat(lambda: time.sleep(0.01), runs=100, warmup=0, min_runs=3, budget_s=0.015)
    assert len(timed.wall_ms) == 3          # the budget was spent after two: min_runs
    assert min(timed.wall_ms) >= 10
    timed = repeat(lambda: None, runs=5, warmup=0, budget_s=0.0)
    assert len(timed.wall_ms) == 1          # min_runs defaults to 1
    with pytest.raises(ValueError):
        repeat(lambda: None, runs=0)


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 2
physical id\t: 1
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
"""

ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma f16c
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes asimdhp bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_probe_reads_x86_features_and_physical_cores():
    info = cpu.parse_cpuinfo(X86)
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.physical_cores == 2      # three threads on two (socket, core) pairs
    assert info.avx512f and info.vnni and info.avx512_bf16 and info.amx and info.bf16
    assert info.features == sorted(["avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                    "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])


def test_cpu_probe_without_bf16_or_topology():
    info = cpu.parse_cpuinfo(ZEN3)
    assert info.model == "AMD EPYC 7B13" and info.physical_cores is None
    assert not (info.avx512f or info.vnni or info.bf16 or info.amx)
    arm = cpu.parse_cpuinfo(ARM)
    assert arm.bf16 and not arm.avx512f and {"asimd", "bf16", "i8mm"} <= set(arm.features)
    empty = cpu.parse_cpuinfo("")
    assert empty.flags == frozenset() and empty.model is None and not empty.bf16


def test_cpu_probe_falls_back_without_proc(monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", "/nonexistent/cpuinfo")
    cpu.cpu_info.cache_clear()
    try:
        info = cpu.cpu_info()
        assert info.flags == frozenset() and not info.bf16
        assert cpu.physical_cores() >= 1
    finally:
        cpu.cpu_info.cache_clear()
    assert 1 <= cpu.physical_cores() <= (cpu.affinity_cores() or cpu.physical_cores())
