"""Measurement toolkit: occupancy IoU of volumes, summaries of timings, and one timer
that repeats a call.

Every benchmark, check and report of the package (``vrn-bench``, ``vrn-live``'s
summary, ``benchmarks/``) measures with these, so a threshold or a percentile means the
same everywhere. This module needs only NumPy and the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

OCCUPANCY_LEVEL = 0.5
"""Occupancy above which a voxel is inside the surface (the isosurface level)."""

MIN_IOU = 0.98
"""Least occupancy IoU against the fp32 reference, on every face crop, for a
reduced-precision configuration (bf16, fp16, int8) to count as right."""

PERCENTILES = (50, 90, 99)
STAT_KEYS = ("mean", "p50", "p90", "p99", "min", "max")


def occupancy_iou(reference: np.ndarray, candidate: np.ndarray, *,
                  level: float = OCCUPANCY_LEVEL) -> float:
    """Intersection over union of ``reference > level`` and ``candidate > level``.

    Parameters
    ----------
    reference, candidate : (D, H, W) float ndarray
        Occupancy volumes, or any two arrays of one shape (a batch ``(N, D, H, W)``
        is pooled into one IoU).
    level : float
        Occupancy threshold.

    Returns
    -------
    float
        In [0, 1]; two empty volumes agree perfectly (1.0).

    Examples
    --------
    >>> a = np.zeros((1, 2, 2)); b = a.copy(); a[0, 0] = 1; b[0, 0, 0] = 1
    >>> occupancy_iou(a, b)
    0.5
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"volumes differ in shape: {reference.shape} vs {candidate.shape}")
    a, b = reference > level, candidate > level
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def summarize(samples_ms) -> dict[str, float]:
    """Summarise timings ``samples_ms`` (a 1-D sequence of milliseconds).

    Returns ``{"n", "mean", "p50", "p90", "p99", "min", "max"}`` (``n`` an int, the rest
    floats in milliseconds; :data:`STAT_KEYS` and :data:`PERCENTILES`). Percentiles
    interpolate linearly between samples, as :func:`numpy.percentile` does by default.

    >>> summarize([1.0, 2.0, 3.0])["p50"]
    2.0
    """
    samples = np.asarray(samples_ms, dtype=np.float64).reshape(-1)
    if samples.size == 0:
        raise ValueError("summarize() needs at least one sample")
    if not np.all(np.isfinite(samples)):
        raise ValueError("summarize() got a non-finite timing")
    percentiles = np.percentile(samples, PERCENTILES)
    return {"n": int(samples.size), "mean": float(samples.mean()),
            **{f"p{q}": float(v) for q, v in zip(PERCENTILES, percentiles)},
            "min": float(samples.min()), "max": float(samples.max())}


def ratio(reference_ms: float, candidate_ms: float) -> float:
    """How many times faster ``candidate`` is than ``reference`` (``reference / candidate``)."""
    if not (reference_ms > 0 and candidate_ms > 0):
        raise ValueError(f"ratio() needs positive times, got {reference_ms} and {candidate_ms}")
    return float(reference_ms) / float(candidate_ms)


@dataclass
class Timings:
    """What :func:`repeat` measured: wall and process CPU milliseconds of each timed
    call, and the last call's return value."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    result: object = None

    def summary(self) -> dict[str, float]:
        """:func:`summarize` of :attr:`wall_ms`."""
        return summarize(self.wall_ms)


def repeat(fn: Callable[[], object], *, runs: int, warmup: int = 1, min_runs: int = 1,
           budget_s: float | None = None) -> Timings:
    """Time ``fn()`` again and again.

    ``warmup`` untimed calls first (compilation, caches, autotuning), then ``runs``
    timed ones, or fewer once ``budget_s`` seconds of timed calls are spent and at least
    ``min_runs`` are done. A call on a GPU must synchronise itself to be timed.

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    runs : int
        Most timed calls (at least 1).
    warmup : int
        Untimed calls before them.
    min_runs : int
        Fewest timed calls, whatever the budget.
    budget_s : float, optional
        Stop after the call that brings the timed total to this many seconds.

    Returns
    -------
    Timings
        One wall and one CPU sample per timed call (milliseconds), and the last result.
    """
    if runs < 1 or warmup < 0 or min_runs < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, min_runs >= 1; got {runs}, "
                         f"{warmup}, {min_runs}")
    timings = Timings()
    for _ in range(warmup):
        timings.result = fn()
    spent = 0.0
    while len(timings.wall_ms) < runs:
        if budget_s is not None and spent >= budget_s and len(timings.wall_ms) >= min_runs:
            break
        cpu_start = time.process_time()
        start = time.perf_counter()
        timings.result = fn()
        elapsed = time.perf_counter() - start
        timings.cpu_ms.append((time.process_time() - cpu_start) * 1e3)
        timings.wall_ms.append(elapsed * 1e3)
        spent += elapsed
    return timings
