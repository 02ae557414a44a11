"""Benchmarks: ``vrn-bench``'s run (:mod:`.runner`) and its parts: what to measure
(:mod:`.plan`), the model (:mod:`.models`), the frames (:mod:`.source`), the backends
and their cached files (:mod:`.artifacts`), the timers (:mod:`.timing`), the IoU check
of reduced precisions (:mod:`.validation`), int8 quantisation for the CPU
(:mod:`.quantize`), speed-ups and goals (:mod:`.goals`), the system block
(:mod:`.system`) and the reports (:mod:`.report`). Statistics, IoU and the repeat timer
are :mod:`vrn.metrics`'."""

from .system import machine_name, system_info

__all__ = ["BenchSettings", "machine_name", "run_benchmark", "system_info"]


def __getattr__(name):
    if name in ("BenchSettings", "run_benchmark"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'vrn.bench' has no attribute {name!r}")
