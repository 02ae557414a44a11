"""Summary statistics of repeated timings: mean, percentiles, extremes."""

from __future__ import annotations

import numpy as np

STAT_KEYS = ("mean", "p50", "p90", "p99", "min", "max")


def summarize(samples_ms) -> dict[str, float]:
    """Summarise timings ``samples_ms`` (a 1-D sequence of milliseconds).

    Returns ``{"n", "mean", "p50", "p90", "p99", "min", "max"}`` (``n`` an int, the rest
    floats in milliseconds). Percentiles interpolate linearly between samples, as
    :func:`numpy.percentile` does by default.

    >>> summarize([1.0, 2.0, 3.0])["p50"]
    2.0
    """
    samples = np.asarray(samples_ms, dtype=np.float64).reshape(-1)
    if samples.size == 0:
        raise ValueError("summarize() needs at least one sample")
    if not np.all(np.isfinite(samples)):
        raise ValueError("summarize() got a non-finite timing")
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"n": int(samples.size), "mean": float(samples.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "min": float(samples.min()),
            "max": float(samples.max())}


def ratio(reference_ms: float, candidate_ms: float) -> float:
    """How many times faster ``candidate`` is than ``reference`` (``reference / candidate``)."""
    if not (reference_ms > 0 and candidate_ms > 0):
        raise ValueError(f"ratio() needs positive times, got {reference_ms} and {candidate_ms}")
    return float(reference_ms) / float(candidate_ms)
