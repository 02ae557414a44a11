"""vrn-bench: the system block, planning, and tiny end-to-end runs on small
models (unguided, and landmark-guided on torch and onnxruntime) whose reports must have
every section, the landmark stage, and only positive figures."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from vrn.bench.artifacts import landmark_backend
from vrn.bench.plan import BenchSettings, Combo, plan
from vrn.bench.report import (load_json, markdown_report, plot_stages, result_file_name,
                              write_json, write_results_md)
from vrn.bench.runner import run_benchmark
from vrn.bench.source import FrameSource
from vrn.bench.system import machine_name, system_info
from vrn.bench.timing import FRAME_STAGES, time_inference
from vrn.metrics import STAT_KEYS

# A small landmark-guided VRN (32 px crops: quick on a CPU).
GUIDED_CONFIG = dict(features=8, num_stacks=1, hourglass_depth=1, residuals_a=1,
                     residuals_b=1, residuals_b_innermost=1, input_size=32, out_depth=16)


def test_system_block_names_the_machine():
    from vrn.runtime.cpu import cpu_info

    system = system_info()
    assert system["cpu"]["logical_cores"] >= 1
    assert system["cpu"]["model"]
    assert system["libraries"]["torch"] and system["libraries"]["numpy"]
    assert system["cpu"]["bf16"] is cpu_info().bf16  # the runtime's probe decides
    assert set(system["cpu"]["features"]) <= set(cpu_info().flags)
    name = machine_name(system)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), name


def test_plan_puts_the_reference_first_and_says_why_combos_are_skipped():
    settings = BenchSettings(backends=("torch", "onnxruntime", "tensorrt"),
                             precisions=("fp32", "fp16", "bf16", "int8"))
    combos, unavailable = plan(settings, cuda=False, cpu_bf16=False,
                               tensorrt="TensorRT not installed")
    assert combos[0] == Combo("torch", "cpu", "fp32")
    assert Combo("onnxruntime", "cpu", "int8-static") in combos
    assert Combo("onnxruntime", "cpu", "int8-dynamic") in combos
    assert not any(c.device == "cuda" for c in combos)
    skipped = {(u["backend"], u["device"], u["precision"]): u["reason"] for u in unavailable}
    assert "CUDA" in skipped[("torch", "cuda", "fp16")]
    assert "bf16" in skipped[("torch", "cpu", "bf16")]
    assert skipped[("tensorrt", "cuda", "fp16")]  # no CUDA here, or TensorRT missing
    assert all(reason for reason in skipped.values())


def test_plan_offers_cpu_bf16_where_the_probe_finds_it(monkeypatch):
    from vrn.runtime import cpu

    settings = BenchSettings(backends=("torch",), precisions=("fp32", "bf16"))
    for flags, offered in (("avx2 avx512f avx512_bf16", True), ("avx2 fma", False)):
        probe = cpu.parse_cpuinfo(f"model name : test\nflags : {flags}\n")
        monkeypatch.setattr(cpu, "cpu_info", lambda probe=probe: probe)
        combos, unavailable = plan(settings, cuda=False, tensorrt="no")
        assert (Combo("torch", "cpu", "bf16") in combos) is offered
        assert any(u["device"] == "cpu" and u["precision"] == "bf16"
                   for u in unavailable) is not offered


def test_plan_with_cuda_offers_gpu_configurations():
    settings = BenchSettings(backends=("torch", "tensorrt"), precisions=("fp32", "fp16"))
    combos, unavailable = plan(settings, cuda=True, cpu_bf16=True, tensorrt=None)
    assert Combo("torch", "cuda", "fp32") in combos     # the GPU reference
    assert Combo("torch", "cuda", "fp16") in combos
    assert Combo("tensorrt", "cuda", "fp16") in combos


@pytest.mark.parametrize("kwargs", [dict(backends=("tflite",)), dict(precisions=("int4",)),
                                    dict(batches=(0,)), dict(frames=0), dict(model="huge")])
def test_settings_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        BenchSettings(**kwargs)


def test_frame_source_decodes_the_sample_and_names_bad_files(tmp_path):
    frame = FrameSource().read()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(Exception, match="not-an-image.jpg"):
        FrameSource(bad)


def test_frame_source_reads_a_video_and_rewinds(tmp_path, sample_image):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (sample_image.shape[1], sample_image.shape[0]))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for _ in range(3):
        writer.write(sample_image[..., ::-1])
    writer.release()
    source = FrameSource(path)
    assert source.kind == "video"
    frames = [source.read() for _ in range(7)]  # past the end: rewound
    assert all(f.shape == sample_image.shape and f.dtype == np.uint8 for f in frames)
    source.close()


def test_moving_face_video_is_a_readable_clip(tmp_path):
    import cv2

    from vrn.bench.video import moving_face_video

    path = moving_face_video(tmp_path / "clip.avi", frames=4, size=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.avi"]  # no temporary left
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (ok := cap.read())[0]:
        frames.append(ok[1])
    cap.release()
    assert len(frames) == 4 and frames[0].shape == (128, 128, 3)
    assert not np.array_equal(frames[0], frames[3])  # the face moves


def _numbers(value, path="report"):
    """Every number in a nested report, with where it is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def layered_checkpoint(tmp_path_factory):
    """A small VRN whose volume is a gently image-dependent layer (occupied in front,
    empty behind): the output conv's weights are damped and its biases ramp from +3 to
    -3 over depth. Random weights alone give noise volumes with ~10^6 triangles, which
    would make this test slow for no benefit."""
    import torch

    from vrn.model import VRN, VRNConfig, set_bn_mode

    torch.manual_seed(2)
    config = VRNConfig(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1,
                       residuals_b=1, residuals_b_innermost=1, out_depth=16, input_size=192)
    model = set_bn_mode(VRN(config), "instance").eval()
    return _save_layered(model, model.head[-1], tmp_path_factory.mktemp("weights") /
                         "layered.safetensors")


def _save_layered(model, head, path):
    """Damp ``head``'s weights and ramp its biases from +3 to -3 over depth, so the
    volume is a gently image-dependent layer; save ``model`` to ``path``."""
    import torch

    from vrn.model import save_checkpoint

    with torch.no_grad():
        head.weight.mul_(0.05)
        head.bias.copy_(torch.linspace(3.0, -3.0, head.bias.numel()))
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def small_report(layered_checkpoint, tmp_path_factory):
    settings = BenchSettings(backends=("torch", "onnxruntime", "tensorrt"),
                             precisions=("fp32", "fp16", "int8"), batches=(1, 2), frames=2,
                             warmup=1, weights=layered_checkpoint, isosurface_runs=3,
                             isosurface_budget_s=0.1, progress=False,
                             cache_dir=tmp_path_factory.mktemp("cache"))
    return run_benchmark(settings)


def test_small_run_has_every_section(small_report):
    report = small_report
    assert report["schema"] == "vrn-bench/1"
    assert report["model"]["parameters"] > 0 and report["model"]["gmacs_per_image"] > 0
    labels = {(r["backend"], r["device"], r["precision"], r["batch"]) for r in report["runs"]}
    for precision in ("fp32", "int8-dynamic", "int8-static"):
        for batch in (1, 2):
            assert ("onnxruntime", "cpu", precision, batch) in labels
    assert ("torch", "cpu", "fp32", 1) in labels and ("torch", "cpu", "fp32", 2) in labels
    for run in report["runs"]:
        assert set(run["stages"]) == set(FRAME_STAGES) and "landmarks" in FRAME_STAGES
        timings = list(run["stages"].values()) + [run["end_to_end"], run["crop_to_mesh"],
                                                  run["infer_only"]]
        for stats in timings:
            assert set(STAT_KEYS) <= set(stats) and stats["n"] == 2
        assert run["end_to_end"]["mean"] >= run["crop_to_mesh"]["mean"]
        assert run["describe"]
    assert any(u["backend"] == "tensorrt" and u["reason"] for u in report["unavailable"])
    assert {v["precision"] for v in report["validation"]} >= {"fp32", "int8-static"}
    assert all(0 < v["iou_min"] <= v["iou_mean"] <= 1 for v in report["validation"])
    iso = report["references"]["isosurface"]
    assert {iso["ours"], "skimage lewiner", "pymcubes"} <= set(iso["volumes"][0]["implementations"])
    assert [e["volume"] for e in iso["volumes"]][1:] == ["VRN-shaped (synthetic)",
                                                         "face-like (synthetic)"]
    for entry in iso["volumes"]:  # every implementation meshed the same surface (Lewiner's
        # table resolves ambiguous cubes with extra vertices)
        assert len({stats["vertices"] for name, stats in entry["implementations"].items()
                    if name != "skimage lewiner"}) == 1
    names = [g["name"] for g in report["goals"]]
    assert any("ONNX Runtime" in n for n in names)
    assert sum("vs skimage lorensen" in n for n in names) == 3
    assert report["validation_model"] is None  # the measured model's own weights
    assert report["speedups"] and all(s["inference"] > 0 for s in report["speedups"])


def test_small_run_figures_are_positive_numbers(small_report):
    checked = 0
    for where, value in _numbers({k: small_report[k] for k in
                                  ("runs", "references", "speedups", "model", "prepare_s")}):
        assert math.isfinite(value), where
        assert value > 0 or where.endswith("missed_detections"), where
        checked += 1
    assert checked > 200
    for goal in small_report["goals"]:
        assert goal["value"] is None or goal["value"] > 0


def test_reports_render_and_round_trip(small_report, tmp_path):
    text = markdown_report(small_report)
    for section in ("Per-stage latency", "Distributions", "Against PyTorch eager fp32",
                    "Occupancy IoU", "Isosurface", "Goals", "Not measured"):
        assert section in text
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    path = write_json(small_report, results / result_file_name(small_report))
    assert load_json(path) == json.loads(json.dumps(small_report))
    pytest.importorskip("matplotlib")
    png = plot_stages(small_report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (results / "other-tool.json").write_text(json.dumps({"timings": [1.0]}))
    md = write_results_md(tmp_path / "benchmarks")
    generated = md.read_text()
    assert small_report["machine"] in generated and "do not edit by hand" in generated
    assert "`other-tool.json`" in generated  # listed, not read
    assert (results / path.with_suffix(".png").name).is_file()


def test_load_json_rejects_other_files(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json"):
        load_json(other)


def test_cli_writes_json_markdown_and_plot(layered_checkpoint, tmp_path, capsys):
    import importlib.util

    from vrn.cli.bench import main

    out = tmp_path / "results"
    plot = ["--plot", str(tmp_path / "plot.png")] if importlib.util.find_spec("matplotlib") \
        else []
    code = main(["--backends", "torch", "--precisions", "fp32", "--frames", "1",
                 "--warmup", "0", "--weights", str(layered_checkpoint), "--no-progress",
                 "--json", f"{out}/", "--markdown", str(tmp_path / "report.md"),
                 "--cache-dir", str(tmp_path / "cache"), *plot])
    assert code == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1 and load_json(files[0])["runs"]
    assert "Per-stage latency" in (tmp_path / "report.md").read_text()
    assert not plot or (tmp_path / "plot.png").is_file()
    assert main(["--results-md", str(tmp_path)]) == 0
    assert files[0].stem in (tmp_path / "RESULTS.md").read_text()
    assert "wrote" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    from vrn.cli.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["--backends", "nonesuch"])
    assert exc.value.code == 2
    assert "nonesuch" in capsys.readouterr().err


# ------------------------------------------------------------------ landmark-guided

@pytest.fixture(scope="module")
def guided_checkpoint(tmp_path_factory):
    """A small landmark-guided VRN with a gently image-dependent layer for a volume (as
    ``layered_checkpoint``) and non-zero guidance, so the landmarks shape the volume."""
    from conftest import guided_model

    model = guided_model(GUIDED_CONFIG, guidance_scale=0.1)
    return _save_layered(model, model.vrn.head[-1],
                         tmp_path_factory.mktemp("guided") / "guided.safetensors")


@pytest.fixture(scope="module")
def guided_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("guided-cache")


@pytest.fixture(scope="module")
def guided_report(guided_checkpoint, guided_cache):
    settings = BenchSettings(backends=("torch", "onnxruntime"), precisions=("fp32", "int8"),
                             batches=(1, 2), frames=2, warmup=1, weights=guided_checkpoint,
                             isosurface_runs=3, isosurface_budget_s=0.1, progress=False,
                             cache_dir=guided_cache)
    return run_benchmark(settings)


def test_guided_run_times_the_landmark_stage_on_each_backend(guided_report):
    report = guided_report
    assert report["model"]["architecture"] == "VRNLandmarkGuided"
    assert report["model"]["gmacs_per_image"] > 0  # counted with landmarks fed in
    labels = {(r["backend"], r["precision"], r["batch"]) for r in report["runs"]}
    assert {("torch", "fp32", 1), ("torch", "fp32", 2), ("onnxruntime", "fp32", 1),
            ("onnxruntime", "int8-static", 2)} <= labels
    for run in report["runs"]:
        assert list(run["stages"]) == list(FRAME_STAGES)
        landmarks = run["stages"]["landmarks"]
        assert landmarks["n"] == 2 and landmarks["mean"] > 0
        assert run["end_to_end"]["mean"] > landmarks["mean"] + run["crop_to_mesh"]["mean"]
        # The landmark stage runs where the pipeline runs it.
        expected = "ONNX Runtime" if run["backend"] == "onnxruntime" else "PyTorch"
        assert expected in run["landmark_stage"]
        assert run["mesh"]["faces"] > 0 and run["infer_only"]["mean"] > 0
    assert {v["precision"] for v in report["validation"]} == {"fp32", "int8-dynamic",
                                                              "int8-static"}
    fp32 = next(v for v in report["validation"] if v["precision"] == "fp32")
    assert fp32["passed"] and fp32["iou_min"] > 0.99  # the same graph as torch, on ONNX
    assert all(0 < v["iou_min"] <= 1 for v in report["validation"])
    assert report["settings"]["validation_crops"] == ["astronaut.jpg#0"]


def test_guided_report_lists_the_landmark_stage(guided_report, tmp_path):
    text = markdown_report(guided_report)
    header = next(line for line in text.splitlines() if line.startswith("| configuration |"))
    assert "| detect | landmarks | crop |" in header
    assert "Landmarks: 68 per face" in text
    pytest.importorskip("matplotlib")
    png = plot_stages(guided_report, tmp_path / "guided.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_from_before_the_landmark_stage_still_render(small_report, tmp_path):
    """Result files written before the ``landmarks`` stage existed lack it: the table
    and plot leave it out rather than fail."""
    old = json.loads(json.dumps(small_report))
    for run in old["runs"]:
        del run["stages"]["landmarks"]
        run.pop("landmark_stage")
    text = markdown_report(old)
    header = next(line for line in text.splitlines() if line.startswith("| configuration |"))
    assert "| detect | crop |" in header and "landmarks" not in header
    pytest.importorskip("matplotlib")
    assert plot_stages(old, tmp_path / "old.png").is_file()


def test_landmark_backend_follows_the_pipeline(tmp_path):
    class Fake:
        def __init__(self, name, path=None):
            self.name, self.path = name, path

    assert landmark_backend(Fake("onnxruntime")) == ("onnxruntime", None)
    assert landmark_backend(Fake("torch")) == ("torch", None)
    engine = tmp_path / "vrn.engine"
    assert landmark_backend(Fake("tensorrt", engine)) == ("torch", None)
    (tmp_path / "landmarks.engine").write_bytes(b"")
    assert landmark_backend(Fake("tensorrt", engine)) == ("tensorrt",
                                                          tmp_path / "landmarks.engine")


def test_time_inference_passes_the_landmarks():
    seen = []

    class Recorder:
        def infer(self, batch, landmarks=None):
            seen.append((batch.shape, None if landmarks is None else landmarks.shape))

    batch, landmarks = np.zeros((2, 3, 8, 8), np.float32), np.zeros((2, 68, 3), np.float32)
    samples = time_inference({"a": Recorder()}, {"a": (batch, landmarks)}, frames=2, warmup=1)
    assert len(samples["a"]) == 2
    assert seen == [((2, 3, 8, 8), (2, 68, 3))] * 3


def test_int8_keeps_the_guidance_float(guided_checkpoint, guided_cache, tmp_path):
    """int8 of a guided graph: the nodes fed by the landmarks alone stay float, and the
    static recipe insists on calibration landmarks."""
    import onnx

    from vrn.bench.quantize import guidance_nodes, quantize_int8
    from vrn.model import load_model
    from vrn.runtime.backends.onnxruntime_backend import cached_onnx

    fp32 = cached_onnx(load_model(guided_checkpoint), guided_cache)
    names = guidance_nodes(fp32)
    graph = onnx.load(str(fp32)).graph
    assert 0 < len(names) < len(graph.node)
    by_name = {n.name: n for n in graph.node}
    assert any(by_name[n].op_type == "Exp" for n in names)  # the heatmaps' Gaussians
    assert not any(by_name[n].op_type == "InstanceNormalization" for n in names)
    crops = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="calibration landmarks"):
        quantize_int8(fp32, tmp_path / "q.onnx", recipe="int8-static", calibration=crops)
    with pytest.raises(ValueError, match=r"\(2, 68, 3\)"):
        quantize_int8(fp32, tmp_path / "q.onnx", recipe="int8-static", calibration=crops,
                      calibration_landmarks=np.zeros((2, 68, 2), np.float32))


def test_vrn_shaped_volume_is_a_face_slab_in_the_front_of_the_depth():
    from vrn.bench.isosurface import face_like_volume, vrn_shaped_volume

    volume = vrn_shaped_volume((100, 96, 96))
    assert volume.shape == (100, 96, 96) and volume.dtype == np.float32
    assert 0 <= volume.min() and volume.max() <= 1
    inside = volume > 0.5
    planes = np.flatnonzero(inside.any(axis=(1, 2)))
    assert planes.min() > 40 and planes.max() < 100   # the front part of the depth only
    depth_per_column = inside.sum(axis=0)
    assert 15 <= depth_per_column.max() <= 25          # a slab about 0.2 D deep
    assert inside[:, 48, 48].any() and not inside[:, 2, 2].any()   # a face, not a wall
    assert face_like_volume((100, 96, 96)).shape == (100, 96, 96)


def test_full_model_runs_are_validated_on_the_trained_default():
    from types import SimpleNamespace

    from vrn.bench.runner import _validation_model
    from vrn.model import load_model, random_model

    crops = SimpleNamespace(calibration=np.zeros((1, 3, 192, 192), np.float32),
                            calibration_landmarks=np.zeros((1, 68, 3), np.float32))
    full = BenchSettings(model="full")
    default = load_model(None)
    factory, described = _validation_model(random_model(), full, crops)
    if not default.info.trained:
        assert factory is None  # no trained default shipped: nothing better to check on
        return
    assert factory.model.info.trained and described["trained"]
    assert described["architecture"] == default.info.architecture
    # The default model, or given weights, are checked on themselves.
    assert _validation_model(default, BenchSettings(), crops) == (None, None)
    assert _validation_model(random_model(), BenchSettings(weights="w.safetensors"),
                             crops) == (None, None)



def test_live_and_marching_cubes_files_get_their_sections(small_report, tmp_path):
    from vrn.bench.script_results import LIVE_SCHEMA, MARCHING_CUBES_SCHEMA

    stages = {s: {"p50": 1.5, "p90": 2.0} for s in ("landmarks", "crop", "infer",
                                                      "isosurface", "colour")}
    live = {"schema": LIVE_SCHEMA, "machine": "test-2core",
            "clip": {"frames": 60, "size": 512, "rounds": 2},
            "system": {"date": "2026-12-02T00:00:00+00:00", "threads": {"torch": 2}},
            "results": [{"name": "onnxruntime pipelined", "backend": "onnxruntime x",
                         "pipelined": True, "fps": 31.25, "fps_rounds": [31.0, 31.5],
                         "latency_ms": {"p50": 80.0, "p90": 95.0}, "stages_ms": stages,
                         "load_average": [[[0.2, 0.3, 0.4], [0.6, 0.3, 0.4]]]}]}
    timing = {"median_ms": 4.0, "min_ms": 3.5, "cpu_ms": 6.0, "faces": 200764,
              "ratio_to_ours": 1.0}
    cubes = {"schema": MARCHING_CUBES_SCHEMA, "machine": "test-2core",
             "date": "2026-12-02T00:00:00+00:00",
             "volumes": {"VRN-shaped": {"timings": {
                 "vrn (numba cpu)": timing,
                 "skimage lorensen": {**timing, "median_ms": 64.0, "ratio_to_ours": 16.0}}}},
             "goal": {"name": "ours vs skimage lorensen", "target": 8.0, "value": 16.0,
                      "met": True},
             "unavailable": {}, "system": {"load_average": [0.5, 0.5, 0.5]},
             "settings": {"repeats": 9}}
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    write_json(small_report, results / result_file_name(small_report))
    (results / "2026-12-02-test-2core-live.json").write_text(json.dumps(live))
    (results / "2026-12-02-test-2core-marching-cubes.json").write_text(json.dumps(cubes))
    (results / "2026-12-01-old-live.json").write_text(json.dumps({"results": []}))
    text = write_results_md(tmp_path / "benchmarks").read_text()
    assert "## vrn-live --headless: test-2core, 2026-12-02" in text
    assert "| onnxruntime pipelined | 31.2 | 31.0 / 31.5 | 80.0 | 95.0 |" in text
    assert "## Marching cubes: test-2core, 2026-12-02" in text
    assert "| VRN-shaped | skimage lorensen | 64.0 |" in text and "16.0x, met" in text
    assert "`2026-12-01-old-live.json`" in text  # an older layout: listed, not read


def test_int8_calibration_crops_are_not_the_validation_crops():
    from vrn.bench.validation import CALIBRATION_TURNS, calibration_crops, face_crops
    from vrn.image_io import sample_image_path

    crops, landmarks, _ = face_crops([sample_image_path()], size=64)
    calibration, points = calibration_crops([sample_image_path()], size=64)
    assert len(calibration) == len(points) == 1 + len(CALIBRATION_TURNS)
    assert calibration.shape[1:] == crops.shape[1:] and points.shape[1:] == (68, 3)
    for crop in calibration:  # mirrored (and turned): never a validation crop
        assert np.abs(crop - crops[0]).mean() > 0.02
