"""One CPU budget for the process: the thread pools of PyTorch, ONNX Runtime, our
marching-cubes kernels (Numba, on Python worker threads) and OpenCV, sized together for
this machine's physical cores (:func:`vrn.runtime.cpu.physical_cores`) and set from here.

The stages of a frame run one after another (or, in the pipelined live loop, two at a
time), so every pool may use every core; what costs is a pool that keeps its cores busy
after its work is done. ONNX Runtime's intra-op threads spin for a while after each run
unless told not to, and on a 2-core machine that spinning takes the cores the marching
cubes and the next frame's landmarks need; PyTorch's OpenMP threads do the same unless
``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (:func:`prefer_passive_openmp`).

:func:`configure_threads` applies a :class:`ThreadBudget` (default:
:func:`default_budget`); ONNX Runtime sessions made afterwards take theirs from
:func:`ort_session_options`. The defaults are the best of the options measured side by
side in one run by ``benchmarks/bench_live.py --thread-options`` (see
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from dataclasses import dataclass

from .cpu import physical_cores

__all__ = ["ThreadBudget", "configure_threads", "current_budget", "default_budget",
           "kernels_beside_network", "ort_session_options", "prefer_passive_openmp"]


@dataclass(frozen=True)
class ThreadBudget:
    """Thread counts of each library, for one process.

    Attributes
    ----------
    cores : int
        Physical cores the budget was made for.
    torch : int
        PyTorch intra-op threads (``torch.set_num_threads``).
    onnxruntime : int
        Intra-op threads of each ONNX Runtime CPU session (inter-op: 1, sequential).
    onnxruntime_spinning : bool
        Whether ONNX Runtime's idle intra-op threads spin
        (``session.intra_op.allow_spinning``); inter-op threads never do.
    kernels : int
        Worker threads of the CPU marching-cubes kernels (``vrn.kernels``), the calling
        thread included. ``NUMBA_NUM_THREADS``, when set, wins.
    kernels_beside_network : int
        The same, in the pipelined live loop's mesh stage, which runs while the network
        computes the next frame on its own threads.
    opencv : int
        OpenCV's threads (``cv2.setNumThreads``): decoding, warps, the detector.
    """

    cores: int
    torch: int
    onnxruntime: int
    onnxruntime_spinning: bool
    kernels: int
    kernels_beside_network: int
    opencv: int

    def replace(self, **changes) -> ThreadBudget:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_budget(cores: int | None = None) -> ThreadBudget:
    """The budget for ``cores`` physical cores (default: this machine's): every pool
    sized to the cores, ONNX Runtime not spinning, and the marching cubes on the mesh
    stage's own thread while the network runs beside them (their few milliseconds take
    a fifth of the network's time: the stage keeps up alone, and a second thread would
    only take the network's core)."""
    cores = max(1, int(cores or physical_cores()))
    return ThreadBudget(cores=cores, torch=cores, onnxruntime=cores,
                        onnxruntime_spinning=False, kernels=cores,
                        kernels_beside_network=1, opencv=cores)


_lock = threading.Lock()
_current: ThreadBudget | None = None


def current_budget() -> ThreadBudget:
    """The budget last applied by :func:`configure_threads`, else :func:`default_budget`
    (not applied: the libraries keep their own defaults until someone configures)."""
    return _current or default_budget()


def configure_threads(budget: ThreadBudget | None = None) -> ThreadBudget:
    """Apply ``budget`` (default: :func:`default_budget`) to torch and OpenCV (when they
    are importable), to our kernels, and to the ONNX Runtime sessions made from now on;
    returns it. Calling it again with another budget switches over (sessions already
    made keep their settings)."""
    global _current
    budget = budget or default_budget()
    with _lock:
        _set_torch_threads(budget.torch)
        _set_opencv_threads(budget.opencv)
        from ..kernels import _cpu

        _cpu.set_threads(None if os.environ.get("NUMBA_NUM_THREADS") else budget.kernels)
        _current = budget
    return budget


def kernels_beside_network() -> int:
    """For the calling thread only: run the marching-cubes kernels on the budget's
    ``kernels_beside_network`` threads (the thread itself included), as a thread that
    meshes while the network computes does. Returns that count."""
    from ..kernels import _cpu

    threads = current_budget().kernels_beside_network
    if not os.environ.get("NUMBA_NUM_THREADS"):
        _cpu.set_threads(threads, this_thread=True)
    return threads


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _set_opencv_threads(threads: int) -> None:
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(threads)


def ort_session_options(ort, *, threads: int | None = None,
                        spinning: bool | None = None):
    """``ort.SessionOptions`` for a CPU session under the current budget: ``threads``
    intra-op threads (default: the budget's), one inter-op thread, sequential execution,
    every graph optimisation, and spinning as the budget (or ``spinning``) says."""
    budget = current_budget()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or budget.onnxruntime
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = budget.onnxruntime_spinning if spinning is None else spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it, so that idle
    OpenMP threads (PyTorch's) sleep instead of spinning. It only works before torch is
    imported: returns whether the setting is in force for this process."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
