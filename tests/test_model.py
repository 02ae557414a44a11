"""VRN architectures: the released configuration's size and output, the variants'
shapes, trainability, and the two batch-norm modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_small_model
from vrn.model import (NUM_LANDMARKS, VRN, BatchNorm2d, VRNConfig, VRNGuided, VRNMultitask,
                       build_model, count_parameters, set_bn_mode)

SMALL = dict(features=16, num_stacks=2, hourglass_depth=2, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=8, input_size=32)


def small(architecture: str = "VRN", **overrides) -> nn.Module:
    return make_small_model(architecture, bn_mode="running", **{**SMALL, **overrides}).train()


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- the released configuration ------------------------------------------------------

def test_default_vrn_is_the_released_size():
    model = VRN()
    assert count_parameters(model) == 19_184_968
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 276
    assert sum(isinstance(m, BatchNorm2d) for m in model.modules()) == 273
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, BatchNorm2d))


@pytest.mark.parametrize("bn_mode", ["instance", "running"])
def test_default_vrn_output_shape(bn_mode):
    # Shapes only, on the meta device: no memory, no arithmetic.
    with torch.device("meta"):
        model = set_bn_mode(VRN(), bn_mode).eval()
        out = model(torch.empty(2, 3, 192, 192))
    assert out.shape == (2, 200, 192, 192)


@pytest.mark.slow
def test_default_vrn_output_range():
    torch.manual_seed(0)
    model = set_bn_mode(VRN(), "instance").eval()
    with torch.inference_mode():
        out = model(images(1, 192))
    assert out.shape == (1, 200, 192, 192) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0


def test_input_shape_is_checked():
    model = small().eval()
    with pytest.raises(ValueError, match=r"expects input \(N, 3, 32, 32\)"):
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expects input"):
        model(torch.rand(3, 32, 32))


# -- variants ------------------------------------------------------------------------

def test_small_vrn_shapes_and_logits():
    model = small().eval()
    x = images(3)
    with torch.inference_mode():
        out, logits = model(x), model.logits(x)
        features = model.features(x)
    assert out.shape == logits.shape == (3, 8, 32, 32)
    assert features.shape == (3, 16, 8, 8)
    torch.testing.assert_close(out, torch.sigmoid(logits))


def test_multitask_shapes():
    model = small("VRNMultitask").eval()
    x = images(2)
    with torch.inference_mode():
        volume, heatmaps = model.forward_all(x)
        out = model(x)
    assert volume.shape == (2, 8, 32, 32)
    assert heatmaps.shape == (2, NUM_LANDMARKS, 32, 32)
    assert torch.equal(out, volume)
    assert 0 <= heatmaps.min() and heatmaps.max() <= 1


def test_guided_shapes_and_landmark_input():
    model = small("VRNGuided").eval()
    assert model.landmark_config.in_channels == 3
    assert model.landmark_config.out_depth == NUM_LANDMARKS
    assert model.reconstruction.config.in_channels == 3 + NUM_LANDMARKS
    x = images(2)
    with torch.inference_mode():
        volume, heatmaps = model.forward_all(x)
        out = model(x)
    assert volume.shape == (2, 8, 32, 32)
    assert heatmaps.shape == (2, NUM_LANDMARKS, 32, 32)
    assert torch.equal(out, volume)
    with pytest.raises(ValueError, match="3 \\+ 68"):
        VRNGuided(VRNConfig(**SMALL))


@pytest.mark.parametrize("architecture", ["VRN", "VRNMultitask", "VRNGuided"])
@pytest.mark.parametrize("bn_mode", ["instance", "running"])
def test_trainable(architecture, bn_mode):
    model = set_bn_mode(small(architecture), bn_mode).train()
    x = images(2)
    target = (torch.rand(2, 8, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5)
    loss = F.binary_cross_entropy_with_logits(model.logits(x), target.float())
    if architecture != "VRN":
        heatmaps = model.logits_all(x)[1]
        loss = loss + heatmaps.square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 4)


def test_build_model_and_config_validation():
    assert isinstance(build_model("VRNMultitask", SMALL), VRNMultitask)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("VRN2")
    with pytest.raises(ValueError, match="multiple of 4"):
        VRNConfig(features=18)
    with pytest.raises(ValueError, match="multiple of 8"):
        VRNConfig(input_size=100)
    with pytest.raises(TypeError, match="must be an int"):
        VRNConfig(out_depth=2.5)
    with pytest.raises(ValueError, match="unknown VRNConfig fields"):
        VRNConfig.from_dict({"depth": 3})
    assert VRNConfig.from_dict(VRNConfig(**SMALL).to_dict()) == VRNConfig(**SMALL)


# -- batch-norm modes ----------------------------------------------------------------

def _bn_with_stats(channels: int = 4) -> BatchNorm2d:
    bn = BatchNorm2d(channels)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def _affine(bn: BatchNorm2d, x, mean, var) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape)
            + bn.bias.view(shape))


@pytest.mark.parametrize("training", [False, True])
def test_instance_mode_uses_per_image_statistics(training):
    bn = _bn_with_stats()
    bn.mode = "instance"
    bn.train(training)
    running = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(4)) * 3 + 2
    with torch.no_grad():
        out = bn(x)
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, _affine(bn, x, mean, var), rtol=1e-5, atol=1e-5)
    # Each image on its own gives the same: nothing is shared across the batch...
    with torch.no_grad():
        alone = torch.cat([bn(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(out, alone)
    # ...and the running statistics are neither used nor updated.
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])


def test_running_mode_in_eval_uses_running_statistics():
    bn = _bn_with_stats().eval()
    assert bn.mode == "running"
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = bn(x)
    expected = _affine(bn, x, bn.running_mean.view(1, -1, 1, 1),
                       bn.running_var.view(1, -1, 1, 1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_model_bn_modes():
    model = small().eval()
    assert model.bn_mode == "running"
    set_bn_mode(model, "instance")
    assert model.bn_mode == "instance"
    assert all(m.mode == "instance" for m in model.modules() if isinstance(m, BatchNorm2d))
    x = images(3)
    with torch.inference_mode():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
        # Per-image statistics: the input scale cancels out (the first BN removes the bias).
        rescaled = model(x * 0.5)
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rescaled, batch, rtol=0, atol=5e-3)  # up to eps
    set_bn_mode(model, "running")
    with torch.inference_mode():
        assert not torch.allclose(model(x), batch, atol=1e-3)
    with pytest.raises(ValueError, match="batch-norm mode"):
        set_bn_mode(model, "batch")
