"""The vrn-edge checkpoint format: safetensors tensors plus string metadata."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_small_model
from vrn.errors import WeightsError
from vrn.model import (ModelInfo, VRNConfig, load_checkpoint, load_model, save_checkpoint,
                       set_bn_mode)
from vrn.model.checkpoint import FORMAT, read_checkpoint_info

SMALL = dict(features=16, num_stacks=1, hourglass_depth=2, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=8, input_size=32)


def small(architecture: str, seed: int = 0):
    model = make_small_model(architecture, bn_mode="running", seed=seed, **SMALL)
    # Non-trivial running statistics, so a round trip that dropped buffers would show.
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.eval()


def outputs(model, seed: int = 0) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("architecture", ["VRN", "VRNMultitask", "VRNGuided"])
@pytest.mark.parametrize("bn_mode", ["instance", "running"])
def test_round_trip(tmp_path, architecture, bn_mode):
    model = set_bn_mode(small(architecture), bn_mode)
    info = ModelInfo(architecture=architecture, config=model.config,
                     landmark_config=getattr(model, "landmark_config", None),
                     trained=True, provenance="unit test", extra={"dataset": "none"})
    path = save_checkpoint(model, tmp_path / "m.safetensors", info=info)
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model)
    assert not loaded.training and loaded.bn_mode == bn_mode
    state, original = loaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    assert torch.equal(outputs(loaded), outputs(model))
    got = loaded.info
    assert (got.architecture, got.config, got.bn_mode, got.trained, got.provenance) == (
        architecture, model.config, bn_mode, True, "unit test")
    assert got.landmark_config == getattr(model, "landmark_config", None)
    assert got.extra == {"dataset": "none"}
    assert (got.color_order, got.input_range, got.z_scale) == ("RGB", "[0, 1]", 0.5)


def test_metadata_is_plain_strings(tmp_path):
    model = small("VRNGuided")
    path = save_checkpoint(model, tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    assert meta["architecture"] == "VRNGuided"
    assert json.loads(meta["config"]) == model.config.to_dict()
    assert json.loads(meta["landmark_config"]) == model.landmark_config.to_dict()
    assert meta["trained"] == "false"  # a model without info is untrained
    assert (meta["bn_mode"], meta["color_order"], meta["z_scale"]) == ("running", "RGB", "0.5")
    assert read_checkpoint_info(path).architecture == "VRNGuided"


def test_bn_mode_override_and_load_model(tmp_path):
    path = save_checkpoint(set_bn_mode(small("VRN"), "running"), tmp_path / "m.safetensors")
    assert load_checkpoint(path, bn_mode="instance").bn_mode == "instance"
    loaded = load_model(path, bn_mode="instance")
    assert loaded.bn_mode == loaded.info.bn_mode == "instance"
    with pytest.raises(ValueError, match="batch-norm mode"):
        load_checkpoint(path, bn_mode="group")


def test_fp16_storage(tmp_path):
    model = small("VRNMultitask")
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(half), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for k, v in stored.items() if "num_batches" not in k} == {torch.float16}
    assert stored["stem.1.num_batches_tracked"].dtype == torch.int64
    data_bytes = sum(v.numel() * v.element_size() for v in stored.values())
    assert half.stat().st_size < full.stat().st_size - data_bytes * 0.9
    loaded = load_checkpoint(half)
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value, original[name].half().float()), name
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=2e-2)


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(small("VRN", seed=1), path)
    save_checkpoint(small("VRN", seed=2), path)
    assert torch.equal(outputs(load_checkpoint(path)), outputs(small("VRN", seed=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any new file


# -- bad input -----------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="absent.safetensors: weights file not found"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(WeightsError, match="absent.safetensors: weights file not found"):
        load_model(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_truncated_file(tmp_path, keep):
    data = save_checkpoint(small("VRN"), tmp_path / "m.safetensors").read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    broken = tmp_path / "cut.safetensors"
    broken.write_bytes(data[:cut])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        load_checkpoint(broken)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="foreign.safetensors: not a vrn-edge checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(WeightsError, match="unknown weights format '.pt'"):
        load_model(junk.rename(tmp_path / "junk.pt"))


def _rewrite(tmp_path, edit_tensors=None, edit_meta=None):
    """A checkpoint of a small VRN with its tensors or metadata edited."""
    path = save_checkpoint(small("VRN"), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (edit_tensors or (lambda t: None))(tensors)
    (edit_meta or (lambda m: None))(meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return bad


def test_mismatched_tensor_shape(tmp_path):
    def widen(t):
        t["head.1.weight"] = torch.zeros(9, 16, 1, 1)

    with pytest.raises(WeightsError, match=r"bad.safetensors: tensor 'head.1.weight' has shape "
                                           r"\(9, 16, 1, 1\), the architecture needs "
                                           r"\(8, 16, 1, 1\)"):
        load_checkpoint(_rewrite(tmp_path, widen))


def test_missing_and_unexpected_tensors(tmp_path):
    with pytest.raises(WeightsError, match="missing tensor 'stem.1.running_var'"):
        load_checkpoint(_rewrite(tmp_path, lambda t: t.pop("stem.1.running_var")))
    with pytest.raises(WeightsError, match="unexpected tensor 'extra.weight'"):
        load_checkpoint(_rewrite(tmp_path, lambda t: t.update({"extra.weight": torch.ones(1)})))


def test_bad_metadata(tmp_path):
    with pytest.raises(WeightsError, match="unknown architecture 'VRN3'"):
        load_checkpoint(_rewrite(tmp_path, edit_meta=lambda m: m.update(architecture="VRN3")))
    with pytest.raises(WeightsError, match="invalid checkpoint metadata"):
        load_checkpoint(_rewrite(tmp_path, edit_meta=lambda m: m.update(config="{not json")))
    # A config that disagrees with the tensors is a shape mismatch, named as such.
    wider = json.dumps({**VRNConfig(**SMALL).to_dict(), "out_depth": 9})
    with pytest.raises(WeightsError, match="tensor 'head.1.weight' has shape"):
        load_checkpoint(_rewrite(tmp_path, edit_meta=lambda m: m.update(config=wider)))


@pytest.mark.parametrize("edit", [{"features": 8192}, {"num_stacks": 200000},
                                  {"features": 2 ** 20}, {"hourglass_depth": 5000},
                                  {"features": 1024, "num_stacks": 16}])
def test_lying_architecture_fails_before_allocating(tmp_path, edit):
    """A small file whose metadata claims a huge model is refused from its header, with
    one clear error and no large allocation."""
    import resource

    config = json.dumps({**VRNConfig(**SMALL).to_dict(), **edit})
    path = _rewrite(tmp_path, edit_meta=lambda m: m.update(config=config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsError):
        load_checkpoint(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200


@pytest.mark.parametrize("key,value,match", [
    ("z_scale", "nan", "z_scale must be finite and positive"),
    ("z_scale", "inf", "z_scale must be finite and positive"),
    ("z_scale", "-0.5", "z_scale must be finite and positive"),
    ("bn_mode", "group", "bn_mode must be one of"),
    ("color_order", "BGR", "color_order 'BGR' is not supported"),
    ("input_range", "[0, 255]", r"input_range '\[0, 255\]' is not supported"),
])
def test_metadata_values_are_validated(tmp_path, key, value, match):
    path = _rewrite(tmp_path, edit_meta=lambda m: m.update({key: value}))
    with pytest.raises(WeightsError, match=match):
        load_checkpoint(path)
