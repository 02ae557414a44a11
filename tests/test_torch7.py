"""Torch7 weight import: real ``.t7`` files written by ``torch7_writer`` (the released
file's 1,339-module structure with seeded random weights) must land tensor for tensor
in the PyTorch model, and compute what the Torch7 module graph computes."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfile

import torch7_writer as t7w
from vrn.cli.convert import main as convert_main
from vrn.errors import WeightsError
from vrn.model import VRN, VRNConfig, load_model, set_bn_mode
from vrn.model.torch7 import list_modules, load_torch7

REFERENCE = (Path(__file__).resolve().parents[2] / "shared" / "reference"
             / "vrn-unguided-t7-modules.txt")
SMALL = VRNConfig(features=16, num_stacks=2, hourglass_depth=2, residuals_a=1, residuals_b=1,
                  residuals_b_innermost=2, out_depth=8, input_size=32)


def model_from_tensors(named: dict[str, np.ndarray], config: VRNConfig,
                       bn_mode: str = "instance") -> VRN:
    """A VRN given the writer's tensors by name (the mapping under test, done by hand)."""
    model = VRN(config)
    result = model.load_state_dict({k: torch.from_numpy(v.astype(np.float32))
                                    for k, v in named.items()}, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    return set_bn_mode(model, bn_mode).eval()


def assert_same_tensors(model: VRN, named: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    assert set(state) - set(named) == {k for k in state if k.endswith("num_batches_tracked")}
    for name, array in named.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], torch.from_numpy(array.astype(np.float32))), name


def t7_forward(module, x, *, running: bool):
    """Run a torchfile-parsed Torch7 module tree the way Torch7's nn would.

    Batch norms use batch statistics (every module was saved with ``train=True``) unless
    ``running``; for one image that is instance normalisation.
    """
    kind = module.torch_typename().decode()
    get = lambda key: module._obj.get(key.encode())  # noqa: E731
    tensor = lambda key: torch.from_numpy(np.array(get(key), dtype=np.float32))  # noqa: E731
    if kind == "nn.Sequential":
        for child in get("modules"):
            x = t7_forward(child, x, running=running)
        return x
    if kind == "nn.ConcatTable":
        return [t7_forward(child, x, running=running) for child in get("modules")]
    if kind == "nn.CAddTable":
        return sum(x[1:], x[0])
    if kind == "nn.Identity":
        return x
    if kind == "nn.ReLU":
        return F.relu(x)
    if kind == "nn.Sigmoid":
        return torch.sigmoid(x)
    if kind.endswith("SpatialConvolution") or kind.endswith("SpatialConvolutionMM"):
        weight = tensor("weight").reshape(get("nOutputPlane"), get("nInputPlane"),
                                          get("kH"), get("kW"))
        return F.conv2d(x, weight, tensor("bias"), stride=(get("dH"), get("dW")),
                        padding=(get("padH"), get("padW")))
    if kind.endswith("SpatialBatchNormalization"):
        return F.batch_norm(x, tensor("running_mean"), tensor("running_var"), tensor("weight"),
                            tensor("bias"), training=not running, eps=get("eps"))
    if kind == "nn.SpatialMaxPooling":
        return F.max_pool2d(x, (get("kH"), get("kW")), (get("dH"), get("dW")),
                            (get("padH"), get("padW")), ceil_mode=get("ceil_mode"))
    if kind == "nn.SpatialUpSamplingNearest":
        return F.interpolate(x, scale_factor=get("scale_factor"), mode="nearest")
    if kind == "nn.SpatialUpSamplingBilinear":
        return F.interpolate(x, scale_factor=get("scale_factor"), mode="bilinear",
                             align_corners=True)
    raise AssertionError(f"no Torch7 semantics for {kind}")


def write(tmp_path, root, name="model.t7") -> Path:
    return t7w.save_t7(tmp_path / name, root)


def small_file(tmp_path, **kwargs):
    root, named = t7w.vrn_t7(SMALL, seed=3, **kwargs)
    return write(tmp_path, root), named


def find(root, name: str):
    """``(depth-first index, module)`` of the writer module standing for ``name``."""
    for index, module in enumerate(t7w.iter_modules(root)):
        if module.name == name:
            return index, module
    raise KeyError(name)


# -- the full-size released structure ------------------------------------------------

@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    """The full vrn-unguided structure, parameters in one flat storage (as Torch7's
    ``getParameters()`` leaves them), random weights."""
    root, named = t7w.vrn_t7(seed=7, flat=True)
    path = t7w.save_t7(tmp_path_factory.mktemp("t7") / "vrn-unguided.t7", root)
    return path, named


@pytest.fixture(scope="module")
def full_model(full_file):
    return load_torch7(full_file[0])


@pytest.fixture(scope="module")
def full_root(full_file):
    """The full file as plain torchfile parses it."""
    return torchfile.load(str(full_file[0]))


@pytest.fixture(scope="module")
def full_io(full_model):
    """A fixed input ``(1, 3, 192, 192)`` and the imported model's output (instance mode)."""
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return x, full_model(x)


def test_written_file_has_the_released_module_counts(full_root):
    # Walk the file as plain torchfile reads it, independently of vrn.model.torch7.
    types = []

    def visit(module):
        for child in module._obj.get(b"modules") or []:
            types.append(child.torch_typename().decode())
            visit(child)

    visit(full_root)
    assert len(types) == 1339
    assert types.count("nn.SpatialConvolution") == 276
    assert types.count("nn.SpatialBatchNormalization") == 273


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared reference list not present")
def test_written_file_matches_the_reference_module_list(full_file):
    assert list_modules(full_file[0]) == REFERENCE.read_text().splitlines()


@pytest.mark.slow
def test_full_import_puts_every_tensor_in_place(full_file, full_model):
    path, named = full_file
    assert_same_tensors(full_model, named)
    assert len(named) == 276 * 2 + 273 * 4
    assert not full_model.training
    assert full_model.bn_mode == "instance"
    info = full_model.info
    assert (info.architecture, info.config, info.bn_mode, info.trained) == (
        "VRN", VRNConfig(), "instance", True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.provenance == f"Torch7 import of vrn-unguided.t7 (sha256 {digest})"


@pytest.mark.slow
def test_full_import_gives_identical_outputs(full_file, full_io):
    # Instance mode, as imported; running mode is compared at small size below (one
    # full-size forward pass takes seconds on a small CPU).
    x, got = full_io
    reference = model_from_tensors(full_file[1], VRNConfig(), "instance")
    with torch.inference_mode():
        want = reference(x)
    assert got.shape == (1, 200, 192, 192)
    assert torch.equal(got, want)
    assert want.std() > 1e-3  # not a saturated, trivially equal output


@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", ["instance", "running"])
def test_full_import_computes_the_torch7_graph(full_root, full_model, bn_mode):
    # The imported weights at a 32x32 input, to keep it quick (the graph is size-agnostic).
    model = VRN(VRNConfig(input_size=32))
    model.load_state_dict(full_model.state_dict())
    set_bn_mode(model, bn_mode).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        (want,) = t7_forward(full_root, x, running=bn_mode == "running")
        got = model(x)
    assert want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_truncated_full_file_names_the_file(full_file, tmp_path):
    data = full_file[0].read_bytes()
    cut = tmp_path / "cut.t7"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.t7"):
        load_torch7(cut)


@pytest.mark.slow
def test_wrong_conv_shape_names_the_module(tmp_path):
    root, _ = t7w.vrn_t7(seed=1)
    index, head_conv = find(root, "head.1")
    assert index == 1336  # the reference list's numbering
    head_conv.fields["weight"] = t7w.tensor(np.zeros((100, 256, 1, 1), np.float32))
    path = write(tmp_path, root, "bad.t7")
    with pytest.raises(WeightsError) as err:
        load_torch7(path)
    message = str(err.value)
    for part in ("bad.t7", "module 1336", "nn.SpatialConvolution", "(100, 256, 1, 1)",
                 "head.1", "(200, 256, 1, 1)"):
        assert part in message, message


@pytest.mark.slow
def test_convert_cli_round_trip(full_file, full_model, full_io, tmp_path, capsys):
    out = tmp_path / "weights" / "vrn.safetensors"
    assert convert_main([str(full_file[0]), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "19,184,968 parameters" in printed and str(out) in printed
    converted = load_model(out)
    assert converted.info.bn_mode == "instance"
    assert converted.info.provenance == full_model.info.provenance
    x, want = full_io
    with torch.inference_mode():
        assert torch.equal(converted(x), want)


@pytest.mark.slow
def test_convert_cli_fp16_and_running_mode(full_file, full_model, tmp_path):
    out = tmp_path / "half.safetensors"
    assert convert_main([str(full_file[0]), "-o", str(out), "--fp16", "--bn-mode",
                         "running"]) == 0
    assert out.stat().st_size < full_file[0].stat().st_size * 0.55
    converted = load_model(out)
    assert converted.bn_mode == "running" and converted.info.bn_mode == "running"
    original = full_model.state_dict()
    for name, value in converted.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, original[name].half().float()), name


# -- small configurations: format variants, semantics, errors ------------------------

@pytest.mark.parametrize("variant", [
    dict(dtype=np.float64),
    dict(flat=True, cuda=True, conv_type="cudnn.SpatialConvolution"),
    dict(conv_type="nn.SpatialConvolutionMM"),
])
def test_small_import_variants(tmp_path, variant):
    path, named = small_file(tmp_path, **variant)
    model = load_torch7(path, bn_mode="running", config=SMALL)
    assert_same_tensors(model, named)
    assert model.bn_mode == "running" and model.info.bn_mode == "running"
    assert model.info.config == SMALL


@pytest.mark.parametrize("bn_mode", ["instance", "running"])
def test_small_import_outputs_and_torch7_semantics(tmp_path, bn_mode):
    path, named = small_file(tmp_path)
    model = load_torch7(path, bn_mode=bn_mode, config=SMALL)
    reference = model_from_tensors(named, SMALL, bn_mode)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(x)
        assert torch.equal(got, reference(x))
        (want,) = t7_forward(torchfile.load(str(path)), x, running=bn_mode == "running")
    assert want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_plain_torchfile_reads_the_writer_output(tmp_path):
    path, named = small_file(tmp_path, dtype=np.float64)
    root = torchfile.load(str(path))
    stem_conv = root._obj[b"modules"][0]
    assert stem_conv.torch_typename() == b"nn.SpatialConvolution"
    assert stem_conv._obj[b"train"] is True
    np.testing.assert_array_equal(stem_conv._obj[b"weight"], named["stem.0.weight"])


def test_old_formats_running_std_and_2d_mm_weights(tmp_path):
    root, named = t7w.vrn_t7(SMALL, seed=4)
    _, bn = find(root, "stem.3.bn2")
    var = named["stem.3.bn2.running_var"]
    bn.fields["running_std"] = t7w.tensor(1 / np.sqrt(var.astype(np.float64) + 1e-5))
    del bn.fields["running_var"]
    _, conv = find(root, "stacks.0.0.out.conv2")
    weight = named["stacks.0.0.out.conv2.weight"]
    conv.typename = "nn.SpatialConvolutionMM"
    conv.fields["weight"] = t7w.tensor(weight.reshape(weight.shape[0], -1))
    model = load_torch7(write(tmp_path, root), config=SMALL)
    state = model.state_dict()
    torch.testing.assert_close(state["stem.3.bn2.running_var"], torch.from_numpy(var))
    assert torch.equal(state["stacks.0.0.out.conv2.weight"], torch.from_numpy(weight))


def test_batch_norm_eps_is_imported(tmp_path):
    root, named = t7w.vrn_t7(SMALL, seed=5)
    find(root, "stacks.1.1.1")[1].fields["eps"] = 1e-3
    model = load_torch7(write(tmp_path, root), config=SMALL)
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps.pop("stacks.1.1.1") == 1e-3
    assert set(eps.values()) == {1e-5}


def test_load_model_dispatches_t7(tmp_path):
    path, _ = small_file(tmp_path)
    # load_model imports a .t7 into the released architecture, which this file does not fit.
    with pytest.raises(WeightsError, match=r"model.t7: module 0 .*does not fit stem.0"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="nowhere.t7.*not found"):
        load_torch7(tmp_path / "nowhere.t7")


def test_truncated_copies_name_the_file(tmp_path):
    path, _ = small_file(tmp_path)
    data = path.read_bytes()
    for cut in (0, 2, 7, 40, 1000, len(data) // 3, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.t7"
        broken.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=f"cut{cut}.t7"):
            load_torch7(broken, config=SMALL)


@pytest.mark.parametrize("content", [b"not a torch file at all\n" * 20,
                                     bytes(range(256)) * 8, b"\x04\x00\x00\x00" * 3])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "junk.t7"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="junk.t7"):
        load_torch7(path, config=SMALL)


def test_tensor_beyond_its_storage_is_rejected(tmp_path):
    root, _ = t7w.vrn_t7(SMALL, seed=6)
    _, conv = find(root, "stem.0")
    short = t7w.Storage(np.zeros(10, np.float32))
    conv.fields["weight"] = t7w.Tensor(short, (4, 3, 7, 7), (147, 49, 7, 1), 0)
    with pytest.raises(WeightsError, match="model.t7.*storage"):
        load_torch7(write(tmp_path, root), config=SMALL)


def test_not_a_module_and_trailing_bytes(tmp_path):
    path = t7w.save_t7(tmp_path / "table.t7", {"weights": [1, 2, 3]})
    with pytest.raises(WeightsError, match="table.t7.*not a Torch7 nn model"):
        load_torch7(path, config=SMALL)
    good, _ = small_file(tmp_path)
    padded = tmp_path / "padded.t7"
    padded.write_bytes(good.read_bytes() + b"\0" * 16)
    with pytest.raises(WeightsError, match="padded.t7.*16 bytes"):
        load_torch7(padded, config=SMALL)


def _expect(tmp_path, root, *parts):
    with pytest.raises(WeightsError) as err:
        load_torch7(write(tmp_path, root, "bad.t7"), config=SMALL)
    for part in ("bad.t7",) + parts:
        assert part in str(err.value), str(err.value)


def test_wrong_shape_names_module_index_and_target(tmp_path):
    root, _ = t7w.vrn_t7(SMALL, seed=1)
    index, conv = find(root, "stacks.0.0.inner.branch_b.0.conv2")
    conv.fields["weight"] = t7w.tensor(np.zeros((8, 8, 1, 1), np.float32))
    _expect(tmp_path, root, f"module {index} ", "nn.SpatialConvolution", "(8, 8, 1, 1)",
            "stacks.0.0.inner.branch_b.0.conv2", "(8, 8, 3, 3)")


def test_missing_and_extra_layers(tmp_path):
    root, _ = t7w.vrn_t7(SMALL, seed=1)
    short = copy.deepcopy(root)
    short.fields["modules"].pop()  # the head
    _expect(tmp_path, short, "none after module", "for head.0.0")
    long = copy.deepcopy(root)
    extra = t7w.convolution(t7w.tensor(np.zeros((8, 8, 1, 1), np.float32)),
                            t7w.tensor(np.zeros(8, np.float32)))
    long.fields["modules"].append(extra)
    count = len(t7w.iter_modules(root))
    _expect(tmp_path, long, f"first extra one is module {count} (nn.SpatialConvolution")


@pytest.mark.parametrize("tamper, expected", [
    (lambda m: m.fields.pop("bias"), "no bias"),
    (lambda m: m.fields.update(dW=2, dH=2), "stride (2, 2), expected (1, 1)"),
    (lambda m: m.fields.update(padW=0, padH=0), "padding (0, 0), expected (1, 1)"),
    (lambda m: setattr(m, "typename", "nn.SpatialBatchNormalization"), "expected a conv"),
])
def test_conv_mismatches(tmp_path, tamper, expected):
    root, _ = t7w.vrn_t7(SMALL, seed=1)
    index, conv = find(root, "stem.5.conv2")
    tamper(conv)
    _expect(tmp_path, root, f"module {index} ", "stem.5.conv2", expected)


def test_batch_norm_mismatches(tmp_path):
    root, _ = t7w.vrn_t7(SMALL, seed=1)
    index, bn = find(root, "head.0.1")
    del bn.fields["weight"], bn.fields["bias"]
    _expect(tmp_path, root, f"module {index} ", "head.0.1", "affine")


def test_unexpected_weighted_module(tmp_path):
    root, _ = t7w.vrn_t7(SMALL, seed=1)
    linear = t7w.module("nn.Linear", weight=t7w.tensor(np.zeros((4, 4), np.float32)))
    root.fields["modules"].insert(2, linear)
    _expect(tmp_path, root, "module 2 (nn.Linear", "has weights")


def test_convert_cli_errors(tmp_path, capsys):
    assert convert_main([str(tmp_path / "absent.t7"), "-o", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vrn-convert: error:") and "absent.t7" in err and "\n" not in err
    path, _ = small_file(tmp_path)  # a small model does not fit the released architecture
    assert convert_main([str(path), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "model.t7" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert convert_main([str(path), "-o", str(tmp_path / "x.pt")]) == 1
    assert ".safetensors" in capsys.readouterr().err
