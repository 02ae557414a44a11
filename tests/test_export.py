"""vrn.export, vrn.deploy and vrn-export: ONNX export (running and instance batch norm,
every model variant, dynamic batch), fp16 conversion (the Resize-output trap), parity
through the runtime's backends, engine files and their checks, the exporter's atomic
writes, and the command line.

TensorRT is not installed here: its code is tested through its pure parts (inspector
JSON parsing, version handling) and a stand-in ``tensorrt`` module whose "engines"
compute with ONNX Runtime, run by the real TensorRT backend over NumPy "device" buffers
(:class:`fakes.tensorrt.HostBuffers`); building and running real engines needs a GPU host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import make_plane_weights
from vrn.cli.export import main as export_main
from vrn.deploy import exporter, parity
from vrn.deploy.exporter import ExportError, Exporter
from vrn.errors import BackendUnavailableError, EngineError
from vrn.export import engine_file, fp16, onnx_export, tensorrt_build, tensorrt_lib
from vrn.export.engine_file import EngineMetadata, GpuInfo, check_engine, write_engine
from vrn.export.onnx_export import ChannelAffine, export_onnx, fold_batch_norms
from vrn.model import (NUM_LANDMARKS, VRN, BatchNorm2d, VRNConfig, VRNGuided, VRNMultitask,
                       load_model, random_model, save_checkpoint, set_bn_mode)
from vrn.runtime.backends import cuda_arrays, tensorrt_backend
from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from vrn.runtime.backends.tensorrt_backend import TensorRTBackend
from vrn.runtime.backends.torch_backend import TorchBackend
from vrn.runtime.pipeline import default_landmark_stage, sample_face_crops

from fakes.tensorrt import (FakeBuild, GraphHostBuffers, fake_tensorrt,
                           install_fake_gpu)

SMALL = VRNConfig(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
                  residuals_b_innermost=1, out_depth=8, input_size=32)


def with_running_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a model realistic running statistics (random init has mean 0, var 1, which
    makes the running-mode output near constant): a few training-mode passes."""
    set_bn_mode(model, "running")
    generator = torch.Generator().manual_seed(seed)
    channels = 3
    size = model.config.input_size
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(4, channels, size, size, generator=generator))
    return model.eval()


def run_onnx(path, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image})[0]


def torch_volume(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image)).numpy()


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A small instance-mode VRN checkpoint (seeded random weights)."""
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_checkpoint(random_model(seed=3, config=SMALL), path)
    return path


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory, small_weights):
    """The real fp32 export of ``small_weights`` (batch 1..3) and its result."""
    model = load_model(small_weights)
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    result = export_onnx(model, path, max_batch=3, metadata={"note": "test"})
    return model, result


@pytest.fixture
def fast_export(monkeypatch, small_onnx):
    """Make the exporter's ONNX step copy the module's real export of ``small_weights``
    instead of tracing again (the exporter logic around it runs unchanged)."""
    _, result = small_onnx

    def fake_export(model, path, *, metadata=None, **kwargs):
        proto = onnx.load(str(result.path))
        if metadata:
            helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
        onnx_export.save_onnx(proto, path)
        return dataclasses.replace(result, path=path)

    monkeypatch.setattr(exporter, "export_onnx", fake_export)
    return result


# --- batch-norm folding and the ONNX graph ---------------------------------------------

def test_fold_batch_norms_keeps_running_mode_output():
    torch.manual_seed(0)
    model = with_running_statistics(VRN(SMALL))
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(image)
    folded, n_folded, n_affine = fold_batch_norms(__import__("copy").deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    n_batch_norms = sum(isinstance(m, BatchNorm2d) for m in model.modules())
    assert n_folded + n_affine == n_batch_norms
    # Each residual's bn1 follows an addition or pooling: nothing to fold it into.
    assert n_affine == sum(isinstance(m, ChannelAffine) for m in folded.modules()) > 0
    with torch.no_grad():
        got = folded(image)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)


def test_running_mode_export_is_folded_and_matches(tmp_path):
    """VRN-Multitask in running mode: batch norms folded, the landmark head (which does
    not reach the volume) left out, dynamic batch."""
    torch.manual_seed(1)
    model = with_running_statistics(VRNMultitask(SMALL))
    result = export_onnx(model, tmp_path / "running.onnx", max_batch=3)
    counts = result.op_counts
    assert "BatchNormalization" not in counts and "InstanceNormalization" not in counts
    head_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.landmark_head.modules())
    all_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert counts["Conv"] == all_convs - head_convs
    assert counts["Mul"] == result.affine_batch_norms > 0
    assert result.folded_batch_norms > 0
    proto = onnx.load(str(result.path))
    assert [v.name for v in proto.graph.input] == ["image"]
    assert [v.name for v in proto.graph.output] == ["volume"]
    for batch in (1, 3):  # the batch dimension is dynamic
        image = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
        got = run_onnx(result.path, image)
        assert got.shape == (batch, 8, 32, 32)
        assert np.abs(got - torch_volume(model, image)).max() < 1e-4
    assert model.bn_mode == "running"  # the caller's model is untouched
    assert any(isinstance(m, BatchNorm2d) for m in model.modules())


def test_instance_mode_export(small_onnx):
    model, result = small_onnx
    proto = onnx.load(str(result.path))
    counts = result.op_counts
    assert counts["InstanceNormalization"] == sum(isinstance(m, BatchNorm2d)
                                                  for m in model.modules())
    assert counts["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert "BatchNormalization" not in counts and "Mul" not in counts
    assert [d.dim_param or d.dim_value for d in
            proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    assert result.input_shape == ["batch", 3, 32, 32]
    assert result.output_shape == ["batch", 8, 32, 32]
    # one self-contained file: no external data, nothing beside it
    assert all(init.data_location != TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert sorted(p.name for p in result.path.parent.iterdir()) == [result.path.name]
    assert {p.key: p.value for p in proto.metadata_props}["note"] == "test"
    assert not any(n.metadata_props for n in proto.graph.node)  # no source paths
    image = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    assert np.abs(run_onnx(result.path, image) - torch_volume(model, image)).max() < 1e-4


def test_guided_exports_one_volume_graph(tmp_path):
    torch.manual_seed(2)
    config = dataclasses.replace(SMALL, in_channels=3 + NUM_LANDMARKS)
    model = with_running_statistics(VRNGuided(config))
    result = export_onnx(model, tmp_path / "guided.onnx", max_batch=2)
    proto = onnx.load(str(result.path))
    assert [v.name for v in proto.graph.input] == ["image"]
    assert [v.name for v in proto.graph.output] == ["volume"]
    assert result.input_shape == ["batch", 3, 32, 32]  # the heatmaps are made inside
    assert result.op_counts["Conv"] == sum(isinstance(m, torch.nn.Conv2d)
                                           for m in model.modules())
    image = np.random.default_rng(5).random((2, 3, 32, 32), dtype=np.float32)
    assert np.abs(run_onnx(result.path, image) - torch_volume(model, image)).max() < 1e-4


def test_check_graph_rejects_unexpected_ops_and_counts(small_onnx):
    model, result = small_onnx
    proto = onnx.load(str(result.path))
    expected = {"Conv": result.op_counts["Conv"],
                "InstanceNormalization": result.op_counts["InstanceNormalization"],
                "Mul": 0, "BatchNormalization": 0}
    args = dict(channels=3, size=32, out_depth=8)
    assert onnx_export.check_graph(proto, expected=expected, **args) == result.op_counts
    with pytest.raises(ValueError, match="Conv nodes"):
        onnx_export.check_graph(proto, expected={**expected, "Conv": 1}, **args)
    with pytest.raises(ValueError, match="shape"):
        onnx_export.check_graph(proto, expected=expected, channels=3, size=32, out_depth=9)
    proto.graph.node.append(helper.make_node("Transpose", ["volume"], ["stray"]))
    with pytest.raises(ValueError, match="unexpected ops"):
        onnx_export.check_graph(proto, expected=expected, **args)


def test_save_onnx_refuses_over_2gb(monkeypatch, small_onnx, tmp_path):
    _, result = small_onnx
    proto = onnx.load(str(result.path))
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 1000)
    with pytest.raises(ValueError, match="2 GiB"):
        onnx_export.save_onnx(proto, tmp_path / "big.onnx")
    assert not list(tmp_path.iterdir())


# --- fp16 -------------------------------------------------------------------------------

def resize_last_graph() -> onnx.ModelProto:
    """Conv -> bilinear Resize as the graph's last node: the fp16 trap."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="linear")]
    graph = helper.make_graph(
        nodes, "resize_last",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_fp16_output_stays_float32_when_the_last_node_is_a_resize():
    model = resize_last_graph()
    # Nodes reading the graph input stay fp32: put a Relu first so that the Conv and
    # the Resize run in fp16 and the Resize produces the graph output.
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["x_relu"]))
    model.graph.node[1].input[0] = "x_relu"
    half, summary = fp16.convert_to_fp16(model)
    producer = {out: node for node in half.graph.node for out in node.output}
    assert producer["y"].op_type == "Cast"  # a final cast back to float32
    assert producer[producer["y"].input[0]].op_type == "Resize"
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    scales = {init.name: init for init in half.graph.initializer}["scales"]
    assert scales.data_type == TensorProto.FLOAT  # Resize's scales must stay float32
    assert {init.name: init for init in half.graph.initializer}["w"].data_type == \
        TensorProto.FLOAT16
    fp16.check_io_float32(half)
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(half.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float)"
    got = session.run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, run_onnx_proto(model, x), atol=1e-2)


def run_onnx_proto(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_check_io_float32_catches_an_fp16_output():
    """What onnxconverter-common's keep_io_types leaves for a final Resize: the output
    tensor produced in fp16. The check must refuse it."""
    model = resize_last_graph()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["x_relu"]))
    model.graph.node[1].input[0] = "x_relu"
    half, _ = fp16.convert_to_fp16(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(half)
    final_cast = bad.graph.node.pop()
    for node in bad.graph.node:
        node.output[:] = ["y" if name == final_cast.input[0] else name for name in node.output]
    with pytest.raises(ValueError, match="inconsistent"):
        fp16.check_io_float32(bad)
    bad.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ValueError, match="FLOAT16"):
        fp16.check_io_float32(bad)


def test_fp16_export_of_the_network(small_onnx, tmp_path):
    model, result = small_onnx
    dst = tmp_path / "small.fp16.onnx"
    summary = fp16.export_fp16(result.path, dst)
    half = onnx.load(str(dst))
    assert fp16.graph_precision(half) == "fp16"
    assert fp16.graph_precision(onnx.load(str(result.path))) == "fp32"
    assert summary.fp32_ops == {"InstanceNormalization": 22, "Conv": 1}  # + the input conv
    assert summary.fp16_nodes > 0 and summary.initializers_converted > 0
    assert {p.key: p.value for p in half.metadata_props}["precision"] == "fp16"
    inputs = parity.parity_inputs(3, 32, faces=sample_face_crops)
    report = parity.check_parity(TorchBackend(model), OnnxRuntimeBackend(dst), inputs,
                                 name="fp16", precision="fp16", max_batch=3)
    assert report.sane and report.min_iou > 0.99
    assert report.rows[-1].label == "batch of 3"
    assert run_onnx(dst, inputs[0].image).dtype == np.float32


def test_fp16_refuses_weights_beyond_float16():
    model = resize_last_graph()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["x_relu"]))
    model.graph.node[1].input[0] = "x_relu"
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((4, 3, 3, 3), 1e6, np.float32), "w"))
    with pytest.raises(ValueError, match="float16 range"):
        fp16.convert_to_fp16(model)


# --- parity -----------------------------------------------------------------------------

def test_compare_figures():
    reference = np.zeros((1, 2, 4, 4), np.float32)
    reference[0, 0] = 0.9  # 16 occupied voxels
    candidate = reference.copy()
    candidate[0, 0, 0, :2] = 0.4  # two voxels flip
    candidate[0, 1, 0, 0] = 0.1
    row = parity.compare(reference, candidate, "x")
    assert row.iou == pytest.approx(14 / 16)
    assert row.max_abs == pytest.approx(0.5)
    assert row.mean_abs == pytest.approx((2 * 0.5 + 0.1) / 32)
    with pytest.raises(ValueError, match="shape"):
        parity.compare(reference, candidate[:, :1], "x")
    candidate[0, 1, 1, 1] = np.nan
    assert parity.compare(reference, candidate, "x").max_abs == float("inf")


def test_parity_report_targets_and_floors():
    row = parity.ParityRow("a", 1, max_abs=2e-4, mean_abs=1e-5, iou=0.985)
    fp32 = parity.ParityReport("fp32", "fp32", [row])
    assert not fp32.passed and fp32.sane
    half = parity.ParityReport("fp16", "fp16", [row])
    assert not half.passed and half.sane
    half.rows.append(parity.ParityRow("b", 1, max_abs=0.5, mean_abs=0.1, iou=0.5))
    assert not half.sane
    good = parity.ParityReport("fp16", "fp16", [parity.ParityRow("a", 1, 1e-3, 1e-4, 0.995)])
    assert good.passed and good.to_dict()["passed"] and parity.FP16_MIN_IOU == 0.99
    table = parity.format_table([fp32, good])
    assert "FAIL" in table and "pass" in table
    with pytest.raises(ValueError):
        parity.check_parity(lambda x: x, lambda x: x, [], name="x", precision="int8")


def test_fp16_gate_judges_face_crops_and_random_inputs_only_for_finiteness():
    """Finding 2: the fp16 gate compares fp16 with fp32 on real face crops (and the
    batch with its single images); random inputs only have to be finite."""
    rows = [parity.ParityRow("random 0", 1, 0.3, 1e-3, 0.90, "random"),
            parity.ParityRow("face 0", 1, 2e-3, 1e-5, 0.995, "face"),
            parity.ParityRow("batch of 2", 2, 1e-3, 1e-6, 1.0, "batch")]
    gate = parity.ParityReport("TensorRT fp16 vs PyTorch", "fp16", rows)
    assert gate.passed and gate.sane
    assert gate.gate_iou == 0.995 and gate.min_iou == 0.90
    assert "face crops" in gate.criterion and "random inputs: finite" in gate.criterion
    assert gate.to_dict()["gate_iou"] == 0.995
    assert [r["kind"] for r in gate.to_dict()["rows"]] == ["random", "face", "batch"]
    rows[0].max_abs = float("inf")  # a random input overflows: fails, even untrained
    assert not gate.passed and not gate.sane
    rows[0].max_abs = 0.3
    rows[2].iou = 0.98  # the batch disagrees with the same images one at a time
    assert not gate.passed and gate.sane
    rows[2].iou = 1.0
    rows[1].iou = 0.985  # the face misses the target
    assert not gate.passed
    # Without a face crop (a model without RGB input) every row is judged.
    randoms = parity.ParityReport("x", "fp16", [parity.ParityRow("r", 1, 0.1, 1e-3, 0.98,
                                                                 "random")])
    assert not randoms.passed and "every input" in randoms.criterion


def test_face_crop_variants_are_the_pipelines_crops_of_the_sample_photo():
    crops, landmarks = parity.face_crop_variants(48)
    assert crops.shape == (3, 3, 48, 48) and landmarks.shape == (3, 68, 3)
    assert crops.dtype == landmarks.dtype == np.float32
    assert 0 <= crops.min() and crops.max() <= 1
    assert not np.array_equal(crops[0], crops[1])  # other boxes, other crops
    again, _ = parity.face_crop_variants(48)
    again[0] = 0  # a copy each call: the cache is not changed
    assert np.array_equal(parity.face_crop_variants(48)[0], crops)
    inputs = parity.parity_inputs(3, 48, random_count=1, faces=parity.face_crop_variants)
    assert [(i.label, i.kind) for i in inputs] == [("random 0", "random"), ("face 0", "face"),
                                                   ("face 1", "face"), ("face 2", "face")]


def test_parity_inputs():
    inputs = parity.parity_inputs(3, 48, random_count=2, faces=sample_face_crops)
    assert [i.label for i in inputs] == ["random 0", "random 1", "face 0"]
    for item in inputs:
        assert item.image.shape == (1, 3, 48, 48) and item.image.dtype == np.float32
        assert 0 <= item.image.min() and item.image.max() <= 1
    again = parity.parity_inputs(3, 48, random_count=2, faces=sample_face_crops)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(inputs, again))
    assert len(parity.parity_inputs(5, 48, random_count=1, faces=sample_face_crops)) == 1
    assert len(parity.parity_inputs(3, 48, random_count=1)) == 1  # no faces asked for


# --- engine files -----------------------------------------------------------------------

GPU = GpuInfo("NVIDIA Jetson AGX Orin", "8.7")


def write_fake_engine(folder, onnx_path, *, payload=b"serialized engine " * 64):
    engine_path = folder / "vrn.fp16.engine"
    meta = EngineMetadata(tensorrt_version="10.3.0", gpu_name=GPU.name,
                          compute_capability=GPU.compute_capability,
                          onnx_file=onnx_path.name, onnx_sha256=engine_file.sha256_file(onnx_path),
                          engine_sha256="", engine_bytes=0, precision="fp16",
                          batch={"min": 1, "opt": 2, "max": 2},
                          model_info={"architecture": "VRN"})
    write_engine(engine_path, payload, meta)
    return engine_path


@pytest.fixture
def engine_setup(tmp_path):
    onnx_path = tmp_path / "vrn.fp16.onnx"
    onnx_path.write_bytes(b"onnx bytes")
    return onnx_path, write_fake_engine(tmp_path, onnx_path)


def test_check_engine_accepts_a_matching_engine(engine_setup):
    onnx_path, engine_path = engine_setup
    meta = check_engine(engine_path, onnx=onnx_path, tensorrt_version="10.3.0", gpu=GPU)
    assert meta.precision == "fp16" and meta.batch["max"] == 2
    assert meta.engine_bytes == engine_path.stat().st_size
    sidecar = json.loads(engine_file.sidecar_path(engine_path).read_text())
    assert sidecar["format"] == engine_file.FORMAT and sidecar["onnx_file"] == onnx_path.name


@pytest.mark.parametrize("mismatch, pattern", [
    (dict(tensorrt_version="10.13.3"), "TensorRT 10.3.0"),
    (dict(gpu=GpuInfo("NVIDIA GeForce RTX 4090", "8.9")), "compute capability 8.7"),
])
def test_check_engine_refuses_other_machines(engine_setup, mismatch, pattern):
    onnx_path, engine_path = engine_setup
    kwargs = {"tensorrt_version": "10.3.0", "gpu": GPU, **mismatch}
    with pytest.raises(EngineError, match=pattern) as info:
        check_engine(engine_path, **kwargs)
    assert f"vrn-export --from-onnx {onnx_path}" in str(info.value)


def test_check_engine_refuses_another_onnx(engine_setup, tmp_path):
    _, engine_path = engine_setup
    other = tmp_path / "other.onnx"
    other.write_bytes(b"another graph")
    with pytest.raises(EngineError, match="different ONNX") as info:
        check_engine(engine_path, onnx=other, tensorrt_version="10.3.0", gpu=GPU)
    assert f"vrn-export --from-onnx {other}" in str(info.value)


def test_truncated_or_corrupt_engine_gives_engine_error(engine_setup):
    _, engine_path = engine_setup
    data = engine_path.read_bytes()
    engine_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="truncated or corrupt"):
        check_engine(engine_path, tensorrt_version="10.3.0", gpu=GPU)
    engine_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one bit off
    with pytest.raises(EngineError, match="truncated or corrupt"):
        check_engine(engine_path, tensorrt_version="10.3.0", gpu=GPU)


def test_missing_engine_or_sidecar(engine_setup):
    _, engine_path = engine_setup
    sidecar = engine_file.sidecar_path(engine_path)
    sidecar.write_text("{not json")
    with pytest.raises(EngineError, match="unreadable engine metadata"):
        check_engine(engine_path, tensorrt_version="10.3.0", gpu=GPU)
    sidecar.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(EngineError, match="unreadable engine metadata"):
        check_engine(engine_path, tensorrt_version="10.3.0", gpu=GPU)
    sidecar.unlink()
    with pytest.raises(EngineError, match="no metadata file"):
        check_engine(engine_path, tensorrt_version="10.3.0", gpu=GPU)
    with pytest.raises(EngineError, match="not found"):
        check_engine(engine_path.with_name("missing.engine"))


@pytest.fixture
def tensorrt_module(monkeypatch):
    """Install a stand-in tensorrt module; returns a function that sets it up."""
    def install(version="10.3.0", **kwargs):
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, **kwargs))
        engine_file.tensorrt_runtime.cache_clear()
        tensorrt_lib.tensorrt_logger.cache_clear()
    yield install
    engine_file.tensorrt_runtime.cache_clear()
    tensorrt_lib.tensorrt_logger.cache_clear()


def test_load_engine_without_tensorrt(engine_setup, monkeypatch):
    _, engine_path = engine_setup
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        engine_file.load_engine(engine_path)


def test_load_engine_with_tensorrt(engine_setup, monkeypatch, tensorrt_module):
    onnx_path, engine_path = engine_setup
    monkeypatch.setattr(engine_file, "current_gpu", lambda device=0: GPU)
    tensorrt_module("10.3.0", deserialized=None)  # TensorRT rejects the bytes
    with pytest.raises(EngineError, match="could not deserialize"):
        engine_file.load_engine(engine_path)
    sentinel = object()
    tensorrt_module("10.3.0", deserialized=sentinel)
    engine, meta = engine_file.load_engine(engine_path, onnx=onnx_path)
    assert engine is sentinel and meta.model_info == {"architecture": "VRN"}
    tensorrt_module("10.13.3.9", deserialized=sentinel)
    with pytest.raises(EngineError, match="not portable"):
        engine_file.load_engine(engine_path)
    monkeypatch.setattr(engine_file, "current_gpu", lambda device=0: None)
    tensorrt_module("10.3.0", deserialized=sentinel)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        engine_file.load_engine(engine_path)


def test_current_gpu_without_a_driver():
    if engine_file.current_gpu() is not None:
        pytest.skip("this machine has a CUDA driver and device")
    assert engine_file.current_gpu() is None


# --- TensorRT build helpers -------------------------------------------------------------

def test_import_tensorrt_versions(monkeypatch, tensorrt_module):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not available"):
        tensorrt_lib.import_tensorrt()
    tensorrt_module("8.6.1")
    with pytest.raises(BackendUnavailableError, match="too old"):
        tensorrt_lib.import_tensorrt()
    tensorrt_module("10.2.0")
    with pytest.raises(BackendUnavailableError, match="too old"):
        tensorrt_lib.import_tensorrt()
    tensorrt_module("10.3.0")
    assert tensorrt_lib.import_tensorrt().__version__ == "10.3.0"


def test_network_flags_per_version():
    assert tensorrt_build.network_flags(fake_tensorrt("10.3.0")) == 1 << 1
    assert tensorrt_build.network_flags(fake_tensorrt("10.13.3.9")) == 1 << 1
    assert tensorrt_build.network_flags(fake_tensorrt("11.4.1")) == 0  # always strongly typed
    old = fake_tensorrt("10.3.0")
    old.NetworkDefinitionCreationFlag = types.SimpleNamespace()
    with pytest.raises(BackendUnavailableError, match="strongly typed"):
        tensorrt_build.network_flags(old)
    assert tensorrt_lib.parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert tensorrt_lib.parse_version("11.0.0b1") == (11, 0, 0)


def test_layer_precisions_from_inspector_json():
    v10 = {"Layers": [
        {"Name": "conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where "
                                                      "channel % 8 == 0"}],
         "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "norm", "LayerType": "Normalization",
         "Inputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "c", "Format/Datatype": "Float"}]},
        {"Name": "cast", "Inputs": [{"Format/Datatype": "Float"}],
         "Outputs": [{"Format/Datatype": "Half"}]},
    ], "Bindings": ["image", "volume"]}
    assert tensorrt_build.layer_precisions(v10) == {"fp16": 2, "fp32": 1}
    v11 = {"Layers": [
        {"Name": "conv", "Inputs": [{"DataType": "Half", "Format": "Channel major FP16"}],
         "Outputs": [{"DataType": "Half", "Format": "Row major linear"}]},
        {"Name": "sig", "Inputs": [{"DataType": "Float", "Format": "Row major linear"}],
         "Outputs": [{"DataType": "Float", "Format": "Row major linear"}]},
    ], "I/O Tensors": []}
    assert tensorrt_build.layer_precisions(v11) == {"fp16": 1, "fp32": 1}
    fp32_only = {"Layers": [{"Inputs": [{"DataType": "Float"}], "Outputs": []}]}
    assert not tensorrt_build.layer_precisions(fp32_only).get("fp16")
    names_only = {"Layers": ["conv + relu", "sigmoid"]}
    assert tensorrt_build.layer_precisions(names_only) == {"unknown": 2}
    assert tensorrt_build.classify_precision("N/A due to dynamic shapes") == "unknown"


@pytest.fixture
def fake_gpu_build(monkeypatch, tensorrt_module):
    """TensorRT and a GPU, faked: returns the :class:`FakeBuild` in use."""
    return install_fake_gpu(monkeypatch, FakeBuild(), GPU)


def test_engine_build_through_the_exporter(small_weights, fast_export, fake_gpu_build,
                                           tmp_path):
    out = tmp_path / "out"
    report = Exporter(out, fp16=True, max_batch=3, workspace_gb=1.5,
                      out=_Lines([])).export(small_weights)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["export.json", "landmarks.engine", "landmarks.engine.json",
                     "landmarks.onnx", "timing.cache", "vrn.fp16.engine",
                     "vrn.fp16.engine.json", "vrn.fp16.onnx", "vrn.onnx"]
    # Both engines were checked on the TensorRT backend's engine runner: the VRN's on
    # three random images, the sample photo's three face crops and one batch of three,
    # against PyTorch fp32; the landmark stage's on one batch.
    assert fake_gpu_build.executions == 8
    gate = report["parity"]["TensorRT fp16 vs PyTorch"]
    assert [r["label"] for r in gate["rows"]] == ["random 0", "random 1", "random 2",
                                                  "face 0", "face 1", "face 2", "batch of 3"]
    assert [r["kind"] for r in gate["rows"]] == ["random"] * 3 + ["face"] * 3 + ["batch"]
    # The stand-in engine computes like fp16 (perturbed, float16-rounded output).
    assert 0 < gate["max_abs"] < 1e-2 and gate["sane"]
    # Two builds: the VRN's engine, then the landmark stage's (fp32, input "crop").
    starts = [i for i, c in enumerate(fake_gpu_build.calls) if c[0] == "create_network"]
    assert len(starts) == 2
    landmark_calls = dict((c[0], c[1:]) for c in fake_gpu_build.calls[starts[1]:])
    assert list(landmark_calls["profile"][0]) == ["crop"]
    calls = dict((c[0], c[1:]) for c in fake_gpu_build.calls[:starts[1]])
    assert calls["create_network"] == (1 << 1,)  # STRONGLY_TYPED on 10.x
    assert calls["workspace"] == ("workspace", int(1.5 * 2**30))
    # Tuned for batch 1 (live use), up to the graph's batch 3 (finding 9).
    assert calls["profile"] == ({"image": ((1, 3, 32, 32), (1, 3, 32, 32), (3, 3, 32, 32))},)
    assert calls["verbosity"] == ("detailed",)
    assert "clear_flag" not in calls  # TF32 is only switched off for fp32 graphs
    meta = check_engine(out / "vrn.fp16.engine", onnx=out / "vrn.fp16.onnx",
                        tensorrt_version="10.3.0", gpu=GPU)
    assert meta.precision == "fp16" and meta.layer_precisions == {"fp16": 1, "fp32": 1}
    assert meta.batch == {"min": 1, "opt": 1, "max": 3}
    assert meta.inputs[0] == {"name": "image", "shape": [-1, 3, 32, 32], "dtype": "float32"}
    assert meta.model_info["architecture"] == "VRN" and meta.model_info["precision"] == "fp16"
    assert report["engine"]["engine_sha256"] == meta.engine_sha256
    assert report["files"]["vrn.fp16.engine"]["bytes"] == meta.engine_bytes
    assert (out / "timing.cache").read_bytes() == b"fresh++"  # both builds share it
    # the engine loads through the one loader, and a rebuild reuses the timing cache
    engine, loaded = engine_file.load_engine(out / "vrn.fp16.engine")
    assert loaded == meta and engine.onnx_bytes == (out / "vrn.fp16.onnx").read_bytes()
    backend = TensorRTBackend(out / "vrn.fp16.engine")  # the model travels in the sidecar
    assert backend.model_info.architecture == "VRN" and backend.precision == "fp16"
    lines = []
    Exporter(out, max_batch=3, out=_Lines(lines)).export_from_onnx(out / "vrn.fp16.onnx")
    assert (out / "timing.cache").read_bytes() == b"fresh+++"
    assert "timing cache reused" in "".join(lines)
    # the rebuild is added to the export's report, which keeps its ONNX parity figures
    merged = json.loads((out / "export.json").read_text())
    assert "ONNX fp32 vs PyTorch" in merged["parity"] and merged["model"]["trained"] is False
    assert [s["step"] for s in merged["engine_build"]["steps"]] == ["ONNX", "TensorRT"]
    assert merged["files"]["vrn.fp16.engine"]["sha256"] == engine_file.sha256_file(
        out / "vrn.fp16.engine")
    # elsewhere, --from-onnx writes a report of its own
    other = tmp_path / "jetson"
    report = Exporter(other, max_batch=3, out=_Lines([])).export_from_onnx(
        out / "vrn.fp16.onnx")
    assert report["source"]["onnx_sha256"] == engine_file.sha256_file(out / "vrn.fp16.onnx")
    assert report["model"]["architecture"] == "VRN"
    assert sorted(p.name for p in other.iterdir()) == [
        "export.json", "timing.cache", "vrn.fp16.engine", "vrn.fp16.engine.json"]
    meta = check_engine(other / "vrn.fp16.engine", onnx=out / "vrn.fp16.onnx",
                        tensorrt_version="10.3.0", gpu=GPU)
    assert (other / meta.onnx_file).resolve() == (out / "vrn.fp16.onnx").resolve()


def test_fp16_graph_without_fp16_layers_fails_the_build(small_weights, fast_export,
                                                        fake_gpu_build, tmp_path):
    fake_gpu_build.layer_type = "Float"  # TensorRT fell back to fp32 everywhere
    out = tmp_path / "out"
    report = Exporter(out, fp16=True, out=_Lines([])).export(small_weights)
    assert report["failed"][0]["target"] == "TensorRT"
    assert "without a single fp16 layer" in report["failed"][0]["error"]
    assert not any(p.suffix == ".engine" for p in out.iterdir())
    assert report["engine"] is None


def test_fp32_engine_switches_tf32_off(small_onnx, fake_gpu_build, tmp_path):
    _, result = small_onnx
    build = tensorrt_build.build_engine(result.path, tmp_path / "vrn.engine", max_batch=2,
                                        precision="fp32")
    assert ("clear_flag", "tf32") in fake_gpu_build.calls
    assert build.metadata.precision == "fp32" and not build.timing_cache_reused
    assert (tmp_path / build.metadata.onnx_file).resolve() == result.path.resolve()


def test_tensorrt_backend_on_a_fake_engine(small_onnx, fake_gpu_build, tmp_path):
    """The TensorRT backend over a (faked) engine: its interface read from the engine,
    batches over the profile run in chunks, the results those of PyTorch."""
    model, result = small_onnx
    build = tensorrt_build.build_engine(result.path, tmp_path / "vrn.engine", max_batch=2,
                                        precision="fp32")
    backend = TensorRTBackend(build.engine_path)
    assert (backend.input_size, backend.out_depth, backend.min_batch, backend.max_batch) == \
        (32, 8, 1, 2)
    assert not backend.guided and backend.model_info is None  # no model in the metadata
    assert "host buffers" in backend.describe()
    images = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    got = backend.infer(images)
    assert fake_gpu_build.executions == 3  # 2 + 2 + 1
    assert got.shape == (5, 8, 32, 32) and got.dtype == np.float32
    assert np.abs(got - TorchBackend(model).infer(images)).max() < 1e-4
    with pytest.raises(ValueError, match=r"batch must be \(N, 3, 32, 32\)"):
        backend.infer(images[:, :, :16])
    with pytest.raises(BackendUnavailableError, match="CUDA graphs"):
        TensorRTBackend(build.engine_path, cuda_graphs=True)


def test_tensorrt_backend_on_a_fake_guided_engine(fake_gpu_build, tmp_path):
    from conftest import guided_model

    model = guided_model(SMALL.to_dict(), guidance_scale=0.05)
    path = export_onnx(model, tmp_path / "guided.onnx", max_batch=2).path
    build = tensorrt_build.build_engine(path, tmp_path / "guided.engine", max_batch=2,
                                        precision="fp32")
    backend = TensorRTBackend(build.engine_path)
    assert backend.guided and backend.landmarks_name == "landmarks"
    images = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)
    landmarks = parity.random_landmarks(3, 32, seed=2)
    got = backend.infer(images, landmarks)
    assert np.abs(got - TorchBackend(model).infer(images, landmarks)).max() < 1e-4
    with pytest.raises(ValueError, match="needs landmarks"):
        backend.infer(images)


def test_landmark_engine_runner(small_weights, fast_export, fake_gpu_build, tmp_path):
    from vrn.model.landmark_net import load_landmark_regressor
    from vrn.runtime.landmarks import TensorRTLandmarkRunner, TorchLandmarkRunner

    out = tmp_path / "out"
    Exporter(out, max_batch=2, verify=False, out=_Lines([])).export(small_weights)
    runner = TensorRTLandmarkRunner(out / "landmarks.engine")
    crops = np.random.default_rng(3).uniform(-1, 1, (3, 3, 120, 120)).astype(np.float32)
    expected = TorchLandmarkRunner(load_landmark_regressor())(crops)
    assert np.abs(runner(crops) - expected).max() < 1e-2
    assert "landmarks.engine" in runner.describe()
    with pytest.raises(EngineError, match=r"are not \(N, 3, 120, 120\)"):
        TensorRTLandmarkRunner(out / "vrn.engine")


def test_export_parity_runs_the_shipped_backends(small_weights, fast_export, fake_gpu_build,
                                                 tmp_path, monkeypatch):
    """A fault in a runtime backend fails the export's check of the file it runs."""
    real_run = tensorrt_backend.TensorRTEngine.run_chunk
    monkeypatch.setattr(tensorrt_backend.TensorRTEngine, "run_chunk",
                        lambda self, inputs: real_run(self, inputs) * 0.5)
    report = Exporter(tmp_path / "a", max_batch=2, engine="yes",
                      out=_Lines([])).export(small_weights)
    assert [item["target"] for item in report["failed"]] == ["TensorRT"]
    assert "TensorRT fp32 vs ONNX Runtime: parity check failed" in report["failed"][0]["error"]
    real_infer = OnnxRuntimeBackend.infer
    monkeypatch.setattr(OnnxRuntimeBackend, "infer",
                        lambda self, *a, **k: real_infer(self, *a, **k) + 1e-3)
    with pytest.raises(ExportError, match="ONNX fp32 vs PyTorch: parity check failed"):
        Exporter(tmp_path / "b", engine="no", out=_Lines([])).export(small_weights)


# --- the exporter -----------------------------------------------------------------------

def test_exporter_writes_files_and_report(small_weights, fast_export, tmp_path):
    out = tmp_path / "out"
    lines = []
    report = Exporter(out, fp16=True, max_batch=3, engine="auto", out=_Lines(lines),
                      face_crops=sample_face_crops).export(small_weights)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "landmarks.onnx",
                                                     "vrn.fp16.onnx", "vrn.onnx"]
    saved = json.loads((out / "export.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert saved["versions"]["tensorrt"] is None and saved["gpu"] is None
    assert saved["versions"]["onnxruntime"] == ort.__version__
    assert saved["files"]["vrn.onnx"]["sha256"] == engine_file.sha256_file(out / "vrn.onnx")
    assert saved["files"]["vrn.fp16.onnx"]["bytes"] == (out / "vrn.fp16.onnx").stat().st_size
    assert saved["inputs"] == [{"name": "image", "shape": ["batch", 3, 32, 32],
                                "dtype": "float32"}]
    assert saved["outputs"][0]["shape"] == ["batch", 8, 32, 32]
    assert saved["batch"] == {"min": 1, "opt": 1, "max": 3} and saved["bn_mode"] == "instance"
    assert saved["model"]["architecture"] == "VRN" and saved["model"]["trained"] is False
    assert saved["model"]["config"] == SMALL.to_dict()
    assert saved["engine"] is None
    assert [s["step"] for s in saved["steps"]] == ["weights", "ONNX", "ONNX parity", "fp16",
                                                  "fp16 parity", "landmarks"]
    assert saved["parity"]["ONNX fp32 vs PyTorch"]["passed"]
    assert saved["parity"]["ONNX fp32 vs PyTorch"]["max_abs"] < 1e-4
    rows = saved["parity"]["ONNX fp16 emulated vs PyTorch"]["rows"]
    assert [r["label"] for r in rows] == ["random 0", "random 1", "random 2", "face 0",
                                          "batch of 3"]
    text = "".join(lines)
    assert "vrn-export --from-onnx" in text and "skipped" in text
    assert "IoU@0.5" in text  # the parity table


def test_engine_yes_without_tensorrt_is_a_failed_target(small_weights, fast_export,
                                                         tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "out"
    lines = []
    report = Exporter(out, engine="yes", verify=False, out=_Lines(lines)).export(small_weights)
    assert [item["target"] for item in report["failed"]] == ["TensorRT"]
    assert "cannot build a TensorRT engine" in report["failed"][0]["error"]
    assert "1 target(s) FAILED" in "".join(lines)
    # The targets that do not depend on the engine are still written, and recorded.
    assert (out / "vrn.onnx").is_file() and (out / "landmarks.onnx").is_file()
    assert json.loads((out / "export.json").read_text())["failed"] == report["failed"]
    with pytest.raises(ExportError, match=r"1 target\(s\) failed \(TensorRT\)"):
        Exporter(tmp_path / "strict", engine="yes", verify=False, out=_Lines([]),
                 strict=True).export(small_weights)
    assert (tmp_path / "strict" / "export.json").is_file()


def test_a_failed_landmark_target_keeps_the_others(small_weights, fast_export, tmp_path,
                                                   monkeypatch):
    from vrn.export import landmark_onnx

    def disk_full(model, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(landmark_onnx, "export_landmark_onnx", disk_full)
    out = tmp_path / "out"
    report = Exporter(out, engine="no", verify=False, out=_Lines([])).export(small_weights)
    assert report["failed"][0]["target"] == "landmarks.onnx"
    assert "No space left on device" in report["failed"][0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "vrn.onnx"]


def test_interrupted_export_leaves_no_partial_file(small_weights, fast_export, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "out"

    def failing_fp16(src, dst, **kwargs):
        (dst).write_bytes(b"half written")
        raise RuntimeError("simulated crash while converting")

    monkeypatch.setattr(fp16, "export_fp16", failing_fp16)
    with pytest.raises(ExportError, match=r"1 target\(s\) failed \(vrn.fp16.onnx\)"):
        Exporter(out, fp16=True, engine="no", out=_Lines([]), strict=True).export(
            small_weights)
    # the completed, verified graphs are there, and the report; no partial fp16 file,
    # not even a temp file
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "landmarks.onnx",
                                                     "vrn.onnx"]
    onnx.checker.check_model(onnx.load(str(out / "vrn.onnx")))
    report = json.loads((out / "export.json").read_text())
    assert "simulated crash" in report["failed"][0]["error"]


def test_failing_parity_fails_the_export(small_weights, fast_export, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(parity, "FP32_MAX_ABS", 0.0)
    with pytest.raises(ExportError, match="parity check failed") as info:
        Exporter(out, engine="no", out=_Lines([])).export(small_weights)
    assert "IoU@0.5" in str(info.value)  # the table comes with the error
    assert list(out.iterdir()) == []
    # --no-verify skips the check
    report = Exporter(out, engine="no", verify=False, out=_Lines([])).export(small_weights)
    assert report["parity"] == {} and (out / "vrn.onnx").is_file()


def test_fp16_target_is_enforced_for_trained_weights_only(small_weights, fast_export,
                                                          tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "FP16_MIN_IOU", 1.01)  # unreachable
    report = Exporter(tmp_path / "a", fp16=True, engine="no",
                      out=_Lines([])).export(small_weights)
    fp16_report = report["parity"]["ONNX fp16 emulated vs PyTorch"]
    assert not fp16_report["passed"] and fp16_report["sane"] and not fp16_report["enforced"]
    assert any("untrained" in note for note in report["notes"])
    model = load_model(small_weights)
    model.info.trained = True
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(model, trained, info=model.info)
    report = Exporter(tmp_path / "b", fp16=True, engine="no", out=_Lines([])).export(trained)
    assert "ONNX fp16 emulated vs PyTorch: parity check failed" in report["failed"][0]["error"]
    assert not (tmp_path / "b" / "vrn.fp16.onnx").exists()
    assert (tmp_path / "b" / "vrn.onnx").is_file()


def test_exporter_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="max_batch"):
        Exporter(tmp_path, max_batch=0)
    with pytest.raises(ValueError, match="engine"):
        Exporter(tmp_path, engine="maybe")
    with pytest.raises(ValueError, match="bn_mode"):
        Exporter(tmp_path, bn_mode="group")
    with pytest.raises(ValueError, match="workspace"):
        Exporter(tmp_path, workspace_gb=0)


class _Lines:
    """A text stream that collects what is printed."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass


# --- the command line -------------------------------------------------------------------

def test_cli_end_to_end(small_weights, fast_export, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main([str(small_weights), "-o", str(out), "--fp16", "--max-batch", "2",
                        "--engine", "auto"]) == 0
    captured = capsys.readouterr().out
    assert "vrn-export: done" in captured and "vrn.fp16.onnx" in captured
    saved = json.loads((out / "export.json").read_text())
    assert saved["batch"]["max"] == 2 and saved["options"]["fp16"] is True
    for name in ("vrn.onnx", "vrn.fp16.onnx"):  # the model travels with the graph
        metadata = onnx_export.onnx_metadata(out / name)
        assert metadata["architecture"] == "VRN" and metadata["max_batch"] == "2"
        assert metadata["trained"] == "false"
    assert onnx_export.onnx_metadata(out / "vrn.fp16.onnx")["precision"] == "fp16"


@pytest.mark.parametrize("argv, message", [
    (["missing.safetensors", "-o", "{tmp}/out"], "missing.safetensors: weights file not found"),
    (["-o", "{tmp}/afile/out"], "cannot write to the output folder"),
    (["-o", "{tmp}/afile"], "exists and is not a folder"),
    (["--from-onnx", "{tmp}/missing.onnx"], "missing.onnx: ONNX file not found"),
    (["--from-onnx", "{tmp}/afile"], "not a readable ONNX file"),
])
def test_cli_bad_input_gives_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("not a folder, not an ONNX file")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert export_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vrn-export: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_exit_code_is_1_only_when_nothing_succeeded_or_strict(
        small_weights, fast_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    argv = [str(small_weights), "--engine", "yes", "--no-verify"]
    assert export_main([*argv, "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 target(s) failed (TensorRT)" in err and "--strict" in err
    assert export_main([*argv, "-o", str(tmp_path / "b"), "--strict"]) == 1
    assert capsys.readouterr().err.startswith("vrn-export: error: 1 target(s) failed")


def test_cli_from_onnx_needs_tensorrt(small_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    _, result = small_onnx
    assert export_main(["--from-onnx", str(result.path), "-o", str(tmp_path)]) == 1
    assert "cannot build a TensorRT engine" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["w.safetensors", "--from-onnx", "x.onnx"],
    ["--from-onnx", "x.onnx", "--fp16"],
    ["--from-onnx", "x.onnx", "--engine", "no"],
    [],  # no -o
    ["-o", "out", "--engine", "sometimes"],
])
def test_cli_usage_errors(argv):
    with pytest.raises(SystemExit) as info:
        export_main(argv)
    assert info.value.code == 2


# --- the released architecture ----------------------------------------------------------

@pytest.mark.slow
def test_full_model_export_fp32_fp16_dynamic_batch(tmp_path):
    """The released architecture (19M parameters, default weights, instance mode):
    fp32 and fp16 graphs with parity on random images and the face crop, batch 1 and 2."""
    lines = []
    model = random_model()  # the released architecture, seeded random weights
    assert sum(p.numel() for p in model.parameters()) == 19_184_968
    report = Exporter(tmp_path, fp16=True, max_batch=2, engine="no", random_inputs=1,
                      out=_Lines(lines), face_crops=sample_face_crops).export(model)
    assert report["op_counts"]["Conv"] == 276
    assert report["op_counts"]["InstanceNormalization"] == 273
    assert report["outputs"][0]["shape"] == ["batch", 200, 192, 192]
    fp32 = report["parity"]["ONNX fp32 vs PyTorch"]
    assert fp32["passed"] and fp32["max_abs"] < 1e-4
    assert [r["label"] for r in fp32["rows"]] == ["random 0", "face 0", "batch of 2"]
    half = report["parity"]["ONNX fp16 emulated vs PyTorch"]
    # Seeded random (untrained) weights: the volume hovers near 0.5, so fp16 rounding,
    # now emulated for real, flips more voxels (IoU 0.987) than trained weights do; the
    # gate is reported, not enforced, and gross errors would fall far below.
    assert half["sane"] and not half["enforced"] and half["min_iou"] > 0.98
    assert report["files"]["vrn.onnx"]["bytes"] < 2**31
    session = ort.InferenceSession(str(tmp_path / "vrn.fp16.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float)"
    print("".join(lines))


# --- ready for the first GPU host ---------------------------------------------------------
# Findings 2 (the fp16 gate), 3 (the engine check's buffers, said before the build), 5
# (device ids), 7 (CUDA graphs), 9 (engine defaults) and 10 (a stricter stand-in).

def fp16_chain() -> onnx.ModelProto:
    """x -> Relu (reads the input: stays fp32) -> * 300 -> * 300 -> * 0.001 (fp16)."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("a", 300.0), ("b", 300.0), ("c", 1e-3))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "a"], ["p"]),
             helper.make_node("Mul", ["p", "b"], ["q"]), helper.make_node("Mul", ["q", "c"], ["y"])]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_fp16_emulation_rounds_and_overflows_like_fp16():
    """Finding 2: the CPU fp16 check must see fp16 arithmetic. The emulated graph rounds
    every fp16 tensor to fp16 (fp32 arithmetic between), bit for bit what NumPy's float16
    gives, and overflows past 65504 as fp16 does."""
    half, _ = fp16.convert_to_fp16(fp16_chain())
    emulated = fp16.emulate_fp16(half)
    # Nothing computes in fp16 any more: only the rounding Casts hold fp16 tensors.
    assert not any(i.data_type == TensorProto.FLOAT16 for i in emulated.graph.initializer)
    to_fp16 = [n for n in emulated.graph.node
               if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert len(to_fp16) == 4  # a rounding after the input's cast and after each Mul
    assert [v.name for v in emulated.graph.output] == ["y"]
    fp16.check_io_float32(emulated)
    x = np.array([0.1, 1 / 3, 0.7, 1.0], np.float32)
    got = run_onnx_proto_named(emulated, {"x": x})
    h = np.float16
    with np.errstate(over="ignore"):  # fp32 products, each rounded to fp16 (inf past 65504)
        expected = ((h(x) * h(300)).astype(h) * h(300)).astype(h) * h(1e-3)
    assert np.array_equal(got[:3], expected[:3].astype(np.float32))
    assert got[3] == np.inf  # 1 * 300 * 300 = 90000 > 65504: fp16 overflows
    exact = x * np.float32(300) * np.float32(300) * np.float32(1e-3)
    assert not np.array_equal(got[:3], exact[:3])  # the rounding shows


def run_onnx_proto_named(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_default_weights_pass_the_fp16_gate_in_emulation(tmp_path):
    """The measurement behind FP16_MIN_IOU (docs/deploy.md): the default weights' fp16
    graph, its fp16 rounding emulated, against PyTorch fp32 on the sample photo's three
    face crops: IoU 0.9998 measured, far above the 0.99 gate."""
    model = load_model()
    path = export_onnx(model, tmp_path / "vrn.onnx", max_batch=1).path
    half, _ = fp16.convert_to_fp16(onnx.load(str(path)))
    session = ort.InferenceSession(fp16.emulate_fp16(half).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    crops, landmarks = parity.face_crop_variants(model.config.input_size)
    for crop, lm in zip(crops, landmarks):
        with torch.no_grad():
            reference = model(torch.from_numpy(crop[None]), torch.from_numpy(lm[None])).numpy()
        got = session.run(None, {"image": crop[None], "landmarks": lm[None]})[0]
        assert np.isfinite(got).all()
        assert parity.occupancy_iou(reference, got) >= parity.FP16_MIN_IOU + 0.009


def test_failed_engine_gate_keeps_a_rejected_engine_and_accept_parity_keeps_it(
        fake_gpu_build, tmp_path):
    """Finding 2: an fp16 engine that misses the gate (the stand-in's fp16 noise turned
    up) is kept as vrn.fp16.engine.rejected with its sidecar and parity report, not
    thrown away; --accept-parity publishes it, recorded as accepted; a later checked
    engine removes the rejected one."""
    weights = make_plane_weights(tmp_path)
    out = tmp_path / "out"
    fake_gpu_build.fp16_noise = 0.3
    report = Exporter(out, fp16=True, max_batch=2, out=_Lines([])).export(weights)
    assert report["parity"]["ONNX fp16 emulated vs PyTorch"]["passed"]  # the graph is fine
    failed = {item["target"]: item["error"] for item in report["failed"]}
    assert "kept as vrn.fp16.engine.rejected" in failed["TensorRT"]
    assert "--accept-parity" in failed["TensorRT"]
    names = {p.name for p in out.iterdir()}
    assert {"vrn.fp16.engine.rejected", "vrn.fp16.engine.rejected.json",
            "vrn.fp16.engine.rejected.parity.json"} <= names
    assert "vrn.fp16.engine" not in names and report["engine"] is None
    beside = json.loads((out / "vrn.fp16.engine.rejected.parity.json").read_text())
    assert beside["name"] == "TensorRT fp16 vs PyTorch" and not beside["passed"]
    assert beside["gate_iou"] < parity.FP16_MIN_IOU and "IoU@0.5" in beside["table"]
    saved = json.loads((out / "export.json").read_text())
    assert saved["parity"]["TensorRT fp16 vs PyTorch"]["passed"] is False
    # The rejected engine is a whole engine: its sidecar matches it.
    meta = EngineMetadata.from_json((out / "vrn.fp16.engine.rejected.json").read_text())
    assert meta.engine_sha256 == engine_file.sha256_file(out / "vrn.fp16.engine.rejected")

    lines = []
    report = Exporter(out, fp16=True, max_batch=2, accept_parity=True,
                      out=_Lines(lines)).export(weights)
    assert report["failed"] == [] and report["engine"] is not None
    gate = report["parity"]["TensorRT fp16 vs PyTorch"]
    assert gate["accepted"] and not gate["passed"]
    assert any("--accept-parity" in note for note in report["notes"])
    assert "kept with --accept-parity" in "".join(lines)
    names = {p.name for p in out.iterdir()}
    assert "vrn.fp16.engine" in names and not any(".rejected" in n for n in names)

    fake_gpu_build.fp16_noise = 5e-4  # fp16-sized errors: the gate passes
    report = Exporter(out, fp16=True, max_batch=2, out=_Lines([])).export(weights)
    gate = report["parity"]["TensorRT fp16 vs PyTorch"]
    assert gate["passed"] and not gate["accepted"] and 0 < gate["max_abs"] < 1e-2


def test_engine_check_names_its_buffers_before_the_build(small_weights, fast_export,
                                                         fake_gpu_build, tmp_path, monkeypatch):
    """Finding 3: what the engine's check runs on is said before the build starts, and
    with no buffer provider at all the target fails before any build."""
    lines = []
    Exporter(tmp_path / "a", max_batch=2, out=_Lines(lines)).export(small_weights)
    text = "".join(lines)
    said = text.index("its check runs on host on cuda:0")
    built = text.index("vrn.engine: TensorRT 10.3.0")
    assert said < built
    starts = [c for c in fake_gpu_build.calls if c[0] == "create_network"]
    assert len(starts) == 2

    def no_buffers(device_id=0):
        raise BackendUnavailableError("GPU buffers need torch with CUDA or numba-cuda")

    monkeypatch.setattr(cuda_arrays, "device_buffers", no_buffers)
    fake_gpu_build.calls.clear()
    report = Exporter(tmp_path / "b", max_batch=2, out=_Lines([])).export(small_weights)
    error = {item["target"]: item["error"] for item in report["failed"]}["TensorRT"]
    assert "cannot check a TensorRT engine here" in error and "numba-cuda" in error
    assert not any(c[0] == "create_network" for c in fake_gpu_build.calls)  # no build
    report = Exporter(tmp_path / "c", max_batch=2, verify=False,
                      out=_Lines([])).export(small_weights)
    assert report["engine"] is not None  # unchecked engines need no buffers


def test_engine_build_and_run_honour_the_device(small_weights, fast_export, fake_gpu_build,
                                                tmp_path):
    """Finding 5: with device 1, the GPU asked about, the build, the deserialisation,
    every execution context and every run are on device 1, and so are the buffers."""
    out = tmp_path / "out"
    report = Exporter(out, max_batch=2, device_id=1, out=_Lines([])).export(small_weights)
    assert report["engine"] is not None and report["options"]["device_id"] == 1
    kinds = {kind for kind, _ in fake_gpu_build.events}
    assert {"build", "deserialize", "create_execution_context", "execute"} <= kinds
    assert {device for _, device in fake_gpu_build.events} == {1}
    assert set(fake_gpu_build.gpu_calls) == {1}
    fake_gpu_build.events.clear()
    backend = TensorRTBackend(out / "vrn.engine", device_id=1)
    assert backend.device_id == 1 and backend.runner.buffers.device_id == 1
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    backend.infer(images)
    assert {device for _, device in fake_gpu_build.events} == {1}
    assert fake_gpu_build.current_device == 0  # restored after each call
    fake_gpu_build.events.clear()  # the landmark engine beside it pairs on the same GPU
    stage = default_landmark_stage(backend)
    crops = np.random.default_rng(1).random((2, 3, 120, 120), dtype=np.float32)
    assert stage.backend == "tensorrt" and stage._run(crops).shape == (2, 68, 3)
    assert {device for _, device in fake_gpu_build.events} == {1}


def test_tensorrt_cuda_graphs_get_one_context_per_graph(small_onnx, fake_gpu_build, tmp_path,
                                                        monkeypatch):
    """Finding 7: each captured batch size has an execution context of its own, and
    replays give the eager results."""
    _, result = small_onnx
    build = tensorrt_build.build_engine(result.path, tmp_path / "vrn.engine", max_batch=2,
                                        precision="fp32")
    monkeypatch.setattr(cuda_arrays, "device_buffers", lambda device_id=0: GraphHostBuffers(
        fake_gpu_build.arrays, device_id))
    eager = TensorRTBackend(build.engine_path)
    graphs = TensorRTBackend(build.engine_path, cuda_graphs=True)
    images = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)
    for _ in range(2):
        assert np.array_equal(graphs.infer(images), eager.infer(images))  # chunks of 2 + 1
    buffers = graphs.runner.buffers
    assert buffers.captures == 2 and buffers.replays == 4
    contexts = [graphs._graphs[n].context for n in (1, 2)]
    assert contexts[0] is not contexts[1] and graphs.context not in contexts
    assert {id(c) for c in contexts} <= {id(c) for c in fake_gpu_build.contexts}


def test_failed_cuda_graph_capture_falls_back_to_eager(small_onnx, fake_gpu_build, tmp_path,
                                                       monkeypatch):
    """Finding 7: a capture that fails, or whose enqueue fails (which an error raised
    inside the capture would mask), is a warning; that batch size then runs eagerly."""
    _, result = small_onnx
    path = tensorrt_build.build_engine(result.path, tmp_path / "vrn.engine", max_batch=2,
                                       precision="fp32").engine_path
    images = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    expected = TensorRTBackend(path).infer(images)

    monkeypatch.setattr(cuda_arrays, "device_buffers", lambda device_id=0: GraphHostBuffers(
        fake_gpu_build.arrays, device_id, fail_capture=True))
    backend = TensorRTBackend(path, cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of batch 2 failed"):
        assert np.array_equal(backend.infer(images), expected)
    assert backend._graphs[2] is None
    assert np.array_equal(backend.infer(images), expected)  # eager, no second capture
    assert backend.runner.buffers.captures == 1

    class FailingEnqueue(GraphHostBuffers):
        def capture(self, launch):
            fake_gpu_build.fail_execute = True
            try:
                return super().capture(launch)
            finally:
                fake_gpu_build.fail_execute = False

    monkeypatch.setattr(cuda_arrays, "device_buffers",
                        lambda device_id=0: FailingEnqueue(fake_gpu_build.arrays, device_id))
    backend = TensorRTBackend(path, cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="execute_async_v3 failed in the capture"):
        assert np.array_equal(backend.infer(images), expected)


def test_torch_buffers_capture_in_thread_local_mode():
    """Finding 7: the capture runs in thread-local mode on the provider's stream (a
    stand-in for torch.cuda records the call)."""
    recorded = {}

    class Graph:
        pass

    @contextlib.contextmanager
    def graph(cuda_graph, **kwargs):
        recorded.update(kwargs, graph=cuda_graph)
        yield

    torch_stub = types.SimpleNamespace(cuda=types.SimpleNamespace(CUDAGraph=Graph, graph=graph))
    buffers = cuda_arrays.TorchBuffers.__new__(cuda_arrays.TorchBuffers)
    buffers.torch, buffers.stream = torch_stub, object()
    launched = []
    captured = buffers.capture(lambda: launched.append(True))
    assert launched == [True] and recorded["graph"] is captured
    assert recorded["capture_error_mode"] == "thread_local"
    assert recorded["stream"] is buffers.stream


def test_engine_profile_defaults_match_use(small_onnx, fake_gpu_build, tmp_path):
    """Finding 9: the engine is tuned for batch 1 unless asked, its maximum is the
    graph's, and an impossible profile is refused before TensorRT sees it."""
    _, result = small_onnx
    proto = onnx.load(str(result.path))
    helper.set_model_props(proto, {"max_batch": "3"})
    graph = tmp_path / "max3.onnx"
    onnx_export.save_onnx(proto, graph)
    assert tensorrt_build.graph_max_batch(graph) == 3
    assert tensorrt_build.graph_max_batch(result.path) == onnx_export.DEFAULT_MAX_BATCH
    build = tensorrt_build.build_engine(graph, tmp_path / "a.engine", precision="fp32")
    assert build.metadata.batch == {"min": 1, "opt": 1, "max": 3}
    build = tensorrt_build.build_engine(graph, tmp_path / "b.engine", precision="fp32",
                                        opt_batch=2)
    assert build.metadata.batch == {"min": 1, "opt": 2, "max": 3}
    fake_gpu_build.calls.clear()
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tensorrt_build.build_engine(graph, tmp_path / "c.engine", precision="fp32",
                                    opt_batch=4)
    assert fake_gpu_build.calls == []  # refused before TensorRT
    with pytest.raises(ValueError, match="opt_batch"):
        Exporter(tmp_path, max_batch=2, opt_batch=3)


def test_stand_in_profiles_builds_and_timing_caches_fail_as_tensorrt_does(
        small_onnx, fake_gpu_build, tmp_path):
    """Finding 10: the stand-in refuses min > opt as the bindings do, and fails the build
    and the timing cache on request; our code turns each into a clear outcome."""
    _, result = small_onnx
    trt = sys.modules["tensorrt"]
    builder, network, _ = tensorrt_build.parse_network(trt, result.path)
    with pytest.raises(RuntimeError, match="inconsistent"):
        tensorrt_build.builder_config(trt, builder, network, {"min": 2, "opt": 1, "max": 3},
                                      workspace_gb=None, precision="fp32", source=result.path)
    network.inputs.clear()  # nothing to profile: TensorRT's -1
    with pytest.raises(EngineError, match="rejects the optimization profile"):
        tensorrt_build.builder_config(trt, builder, network, {"min": 1, "opt": 1, "max": 3},
                                      workspace_gb=None, precision="fp32", source=result.path)
    fake_gpu_build.fail_build = True
    with pytest.raises(EngineError, match="failed to build an engine"):
        tensorrt_build.build_engine(result.path, tmp_path / "x.engine", precision="fp32")
    assert not (tmp_path / "x.engine").exists() and not (tmp_path / "timing.cache").exists()
    fake_gpu_build.fail_build = False
    first = tensorrt_build.build_engine(result.path, tmp_path / "x.engine", precision="fp32")
    assert not first.timing_cache_reused
    assert tensorrt_build.build_engine(result.path, tmp_path / "x.engine",
                                       precision="fp32").timing_cache_reused
    for fault in ("corrupt", "mismatch"):
        fake_gpu_build.timing_cache_fault = fault
        build = tensorrt_build.build_engine(result.path, tmp_path / "x.engine",
                                            precision="fp32")
        assert not build.timing_cache_reused  # a fresh cache, and the build goes on
        assert ("timing_cache", fault) in fake_gpu_build.calls


def test_stand_in_context_checks_addresses_and_shapes(small_onnx, fake_gpu_build, tmp_path):
    """Finding 10: the TensorRT backend's set_tensor_address / execute_async_v3 path runs
    against a context that checks every address, shape, dtype and the stream."""
    _, result = small_onnx
    path = tensorrt_build.build_engine(result.path, tmp_path / "vrn.engine", max_batch=2,
                                       precision="fp32").engine_path
    runner = TensorRTBackend(path).runner
    x = runner.buffers.upload(np.zeros((2, 3, 32, 32), np.float32))
    shape = runner.set_shapes([x])
    assert shape == (2, 8, 32, 32)
    with pytest.raises(AssertionError):  # an output of the wrong shape
        runner.execute([x], runner.buffers.empty((1, 8, 32, 32)))
    with pytest.raises(AssertionError):  # an address TensorRT was never given memory at
        runner.context.set_tensor_address("image", 12345)
    assert not runner.context.set_input_shape("image", (3, 3, 32, 32))  # past the profile
    fake_gpu_build.fail_execute = True
    with pytest.raises(EngineError, match="execute_async_v3 failed"):
        runner.execute([x], runner.buffers.empty(shape))


def test_from_onnx_checks_an_fp16_engine_against_the_fp32_graph_beside_it(
        small_weights, fast_export, fake_gpu_build, tmp_path):
    """The fp16 engine of --from-onnx is checked against the fp32 graph of the same
    export when export.json vouches for it; a lone fp16 file against itself, with a
    note."""
    out = tmp_path / "out"
    Exporter(out, fp16=True, max_batch=2, engine="no", out=_Lines([])).export(small_weights)
    report = Exporter(tmp_path / "b", max_batch=2, out=_Lines([])).export_from_onnx(
        out / "vrn.fp16.onnx")
    assert "TensorRT fp16 vs ONNX fp32" in report["parity"]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "vrn.fp16.onnx").write_bytes((out / "vrn.fp16.onnx").read_bytes())
    report = Exporter(lone, max_batch=2, out=_Lines([])).export_from_onnx(lone / "vrn.fp16.onnx")
    assert "TensorRT fp16 vs ONNX Runtime" in report["parity"]
    assert any("no vrn.onnx of the same export" in note for note in report["notes"])


def test_cli_engine_options(small_weights, fast_export, fake_gpu_build, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main([str(small_weights), "-o", str(out), "--max-batch", "3",
                        "--opt-batch", "2", "--device", "1", "--accept-parity"]) == 0
    saved = json.loads((out / "export.json").read_text())
    assert saved["options"]["opt_batch"] == 2 and saved["options"]["device_id"] == 1
    assert saved["options"]["accept_parity"] is True
    assert saved["engine"]["batch"] == {"min": 1, "opt": 2, "max": 3}
    assert export_main([str(small_weights), "-o", str(tmp_path / "x"), "--max-batch", "2",
                        "--opt-batch", "3"]) == 1
    assert "opt_batch must be in [1, max_batch=2]" in capsys.readouterr().err
