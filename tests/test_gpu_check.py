"""``benchmarks/gpu_check.py`` before any GPU host sees it, and the installs
that host will use.

- Finding 1: the whole script runs end to end under the Numba CUDA simulator, in a
  subprocess (so ``NUMBA_ENABLE_CUDASIM`` stays there): the kernels on tiny volumes, the
  torch-CUDA, TensorRT and ONNX Runtime GPU checks skipped, the live loop on a short
  video; it must exit 0 with every check passed or skipped.
- Finding 9: its TensorRT check runs ``vrn-export --fp16 --engine yes`` itself, so it
  checks the engine users get (batch range, tuning, fp16 gate); here on the TensorRT
  stand-in.
- Findings 3 and 4: the ``gpu`` extra leaves exactly one ONNX Runtime package on every
  platform (``onnxruntime-gpu`` on x86-64, the CPU build on aarch64, where PyPI has no
  GPU wheel), none is in the base dependencies, and ``make setup`` picks the extra by
  the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_plane_weights
from fakes.tensorrt import FakeBuild, clear_tensorrt_caches, install_fake_gpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_under_the_simulator(tmp_path):
    """Finding 1: an import or plumbing error in the GPU check shows here, not on the
    GPU host. Default weights, results in a temporary folder."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = list(tmp_path.glob("gpu_check-*-simulator.json"))
    assert len(files) == 1, done.stdout
    saved = json.loads(files[0].read_text())
    statuses = {name: check["status"] for name, check in saved["checks"].items()}
    assert statuses == {"cpu_reference": "pass", "marching_cubes": "pass",
                        "torch_fp16_vs_cpu_fp32": "skip", "zero_copy_pipeline": "skip",
                        "tensorrt": "skip", "onnxruntime_gpu": "skip",
                        "live_headless": "pass"}, done.stdout
    kernels = saved["checks"]["marching_cubes"]
    assert kernels["simulator"] and all(kernels["comparisons"].values())
    assert {"face-like/float32", "face-like/float16", "face-like/uint8", "model-0/float32",
            "batch-of-2"} <= set(kernels["comparisons"])
    assert kernels["timing"]["face-like"]["threads"] == 32
    assert saved["system"]["simulator"] is True
    assert saved["checks"]["live_headless"]["detail"].startswith("onnxruntime")


def test_surface_window_holds_the_surface():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check_kernels import surface_window

    from vrn.kernels import marching_cubes

    volume = np.zeros((40, 12, 50), np.float32)
    volume[:23] = 1.0  # a wall between depths 22 and 23
    window = surface_window(volume, (2, 3, 32))
    assert window.shape == (2, 3, 32) and window.flags.c_contiguous
    assert len(marching_cubes(window)[1]) > 0


@pytest.fixture
def stand_in_gpu(monkeypatch):
    from vrn.export.engine_file import GpuInfo

    build = install_fake_gpu(monkeypatch, FakeBuild(), GpuInfo("NVIDIA H200", "9.0"))
    yield build
    clear_tensorrt_caches()


def test_gpu_check_tensorrt_checks_the_engine_vrn_export_writes(tmp_path, stand_in_gpu):
    """Finding 9: the TensorRT check builds its engine with ``vrn-export --fp16 --engine
    yes`` (batch 1 to 4, tuned for 1) and reports that export's fp16 gate; a failed gate
    fails the check, yet the engine (kept with --accept-parity) is still measured."""
    gpu_check = load_gpu_check()
    ctx = gpu_check.Context(str(make_plane_weights(tmp_path)), tmp_path / "scratch")
    ctx.scratch.mkdir()
    result = gpu_check.check_tensorrt(ctx)
    assert result["status"] == "pass", result["detail"]
    assert result["export_gate"]["passed"] and not result["export_gate"]["accepted"]
    assert result["engine_batch"] == {"min": 1, "opt": 1, "max": 4}
    assert "fp16 gate passed" in result["detail"] and result["plain"]["iou_min"] > 0.99
    assert (ctx.scratch / "export" / "vrn.fp16.engine").is_file()
    assert "vrn-export: done" in (ctx.scratch / "vrn-export.log").read_text()

    stand_in_gpu.fp16_noise = 0.3  # an engine far off fp32
    failing = gpu_check.Context(ctx.weights, tmp_path / "again")
    failing.scratch.mkdir()
    result = gpu_check.check_tensorrt(failing)
    assert result["status"] == "fail" and "fp16 gate FAILED" in result["detail"]
    assert result["export_gate"]["accepted"] and "plain" in result


def test_gpu_extra_installs_exactly_one_onnxruntime():
    """Findings 3 and 4: no ONNX Runtime in the base dependencies; ``cpu`` is the CPU
    build; ``gpu`` is numba-cuda plus onnxruntime-gpu on x86-64 (its CUDA provider and
    the CPU one) and the CPU build on aarch64 (no onnxruntime-gpu wheel there: Jetson
    gets NVIDIA's, docs/deploy.md); no other extra names either package."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs, machine, extra):
        env = {"platform_machine": machine, "extra": extra, "sys_platform": "linux"}
        found = set()
        for spec in specs:
            req = requirements.Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                found.add(req.name)
        return found

    ort = {"onnxruntime", "onnxruntime-gpu"}
    extras = project["optional-dependencies"]
    for machine in ("x86_64", "AMD64", "aarch64"):
        assert not names(project["dependencies"], machine, "") & ort
        gpu = names(extras["gpu"], machine, "gpu")
        want = "onnxruntime" if machine == "aarch64" else "onnxruntime-gpu"
        assert gpu & ort == {want} and "numba-cuda" in gpu, (machine, gpu)
        assert names(extras["cpu"], machine, "cpu") & ort == {"onnxruntime"}
        for name, specs in extras.items():
            if name not in ("cpu", "gpu"):
                assert not names(specs, machine, name) & ort, name


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_installs_the_onnxruntime_of_the_machine(tmp_path):
    """``make setup`` installs ``.[dev,cpu]`` without an NVIDIA driver (this machine, CI)
    and ``.[dev,gpu]`` with one: never both ONNX Runtime packages."""
    plain_path = "/usr/local/bin:/usr/bin:/bin"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvidia-smi").chmod(0o755)

    def dry_run(path):
        env = dict(os.environ, PATH=path)
        done = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if "install -q -e" in line]

    if shutil.which("nvidia-smi", path=plain_path) is None:
        assert dry_run(plain_path) == [f"{tmp_path / 'venv'}/bin/python -m pip install -q -e "
                                       '".[dev,cpu]"']
    assert dry_run(f"{fake}:{plain_path}")[0].endswith('".[dev,gpu]"')
