"""Benchmarks: ``vrn-bench``'s measurements (:mod:`.runner`), the system block
(:mod:`.system`), summary statistics (:mod:`.stats`), int8 quantisation for the CPU
(:mod:`.quantize`), the IoU check of reduced precisions (:mod:`.validation`) and the
reports (:mod:`.report`)."""

from .stats import STAT_KEYS, ratio, summarize
from .system import machine_name, system_info

__all__ = ["STAT_KEYS", "BenchSettings", "machine_name", "ratio", "run_benchmark",
           "summarize", "system_info"]


def __getattr__(name):
    if name in ("BenchSettings", "run_benchmark"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'vrn.bench' has no attribute {name!r}")
