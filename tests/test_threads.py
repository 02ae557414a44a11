"""One CPU budget (vrn.runtime.threads): what it sets in torch, OpenCV, our kernels and
ONNX Runtime's session options, and the per-thread kernel count of the pipelined live
loop's mesh stage."""

from __future__ import annotations

import os
import threading

import pytest

from vrn.kernels import _cpu
from vrn.runtime import threads
from vrn.runtime.cpu import physical_cores


@pytest.fixture
def restored():
    """Put torch, OpenCV, the kernels and the module's budget back as they were."""
    import cv2
    import torch

    saved = (torch.get_num_threads(), cv2.getNumThreads(), _cpu._threads, threads._current)
    yield
    torch.set_num_threads(saved[0])
    cv2.setNumThreads(saved[1])
    _cpu.set_threads(saved[2])
    threads._current = saved[3]


def test_default_budget_sizes_every_pool_to_the_cores():
    budget = threads.default_budget(4)
    assert (budget.cores, budget.torch, budget.onnxruntime, budget.kernels) == (4, 4, 4, 4)
    assert budget.kernels_beside_network == 1 and budget.opencv == 4
    assert budget.onnxruntime_spinning is False
    assert threads.default_budget().cores == physical_cores()
    assert budget.replace(opencv=1).opencv == 1 and budget.opencv == 4
    assert set(budget.as_dict()) >= {"torch", "onnxruntime", "kernels", "opencv"}


def test_configure_threads_sets_torch_opencv_and_the_kernels(restored, monkeypatch):
    import cv2
    import torch

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    budget = threads.default_budget(2).replace(torch=1, opencv=2, kernels=3)
    assert threads.configure_threads(budget) is budget
    assert threads.current_budget() is budget
    assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 2
    assert _cpu.cpu_threads() == 3
    # NUMBA_NUM_THREADS, when the environment sets it, wins over the budget.
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    threads.configure_threads(budget)
    assert _cpu._threads is None


def test_onnxruntime_sessions_take_the_budget_and_do_not_spin(restored):
    ort = pytest.importorskip("onnxruntime")
    from vrn.runtime.backends.onnxruntime_backend import session_options

    threads.configure_threads(threads.default_budget(2).replace(onnxruntime=2))
    options = session_options(ort, "cpu")
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(ort, "cpu", threads=1).intra_op_num_threads == 1
    threads.configure_threads(threads.default_budget(2).replace(onnxruntime_spinning=True))
    spinning = session_options(ort, "cpu")
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_kernels_beside_the_network_change_only_the_calling_thread(restored, monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    threads.configure_threads(threads.default_budget(2).replace(kernels=2,
                                                                kernels_beside_network=1))
    seen = {}

    def mesh_stage():
        seen["count"] = threads.kernels_beside_network()
        seen["threads"] = _cpu.cpu_threads()

    worker = threading.Thread(target=mesh_stage)
    worker.start()
    worker.join()
    assert seen == {"count": 1, "threads": 1}
    assert _cpu.cpu_threads() == 2  # this thread keeps the process-wide count


def test_passive_openmp_only_before_torch(monkeypatch):
    import torch  # noqa: F401  (loaded: too late to change its OpenMP)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.prefer_passive_openmp() is False
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert threads.prefer_passive_openmp() is True
