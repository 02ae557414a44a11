"""Shared fixtures. Tests that use ../shared (development data) skip without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# A small VRN with the pipeline's 192x192 input: quick on a CPU, real code paths.
SMALL_CONFIG = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1,
                    residuals_b=1, residuals_b_innermost=1, out_depth=16, input_size=192)


# The smallest VRN worth testing on 32x32 crops: model code paths, in milliseconds.
TINY_CONFIG = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1,
                   residuals_b=1, residuals_b_innermost=1, out_depth=8, input_size=32)


def make_small_model(architecture: str = "VRN", *, bn_mode: str = "instance", seed: int = 0,
                     **overrides):
    """A seeded model of ``architecture`` in evaluation mode, configured as
    :data:`SMALL_CONFIG` (the pipeline's 192x192 input) with ``overrides`` applied (e.g.
    ``**TINY_CONFIG``); a ``VRNGuided`` gets its 3 + 68 input channels."""
    from vrn.model import NUM_LANDMARKS, VRNConfig, build_model

    torch.manual_seed(seed)
    config = {**SMALL_CONFIG, **overrides}
    if architecture == "VRNGuided":
        config.setdefault("in_channels", 3 + NUM_LANDMARKS)
    return build_model(architecture, VRNConfig(**config), bn_mode=bn_mode).eval()


def make_plane_weights(folder: Path, *, trained: bool = True, **overrides) -> Path:
    """``folder/plane.safetensors``: a small VRN (:data:`TINY_CONFIG` with ``overrides``)
    whose volume is a wall at one depth whatever the image (last convolution's weights
    zero, biases from +4 to -4 along depth): sharp occupancy, as trained weights give, so
    fp16 rounding flips no voxel, and a mesh whose position says where the crop was;
    saved with ``trained`` in its metadata."""
    import dataclasses

    from vrn.model import model_info, save_checkpoint

    model = make_small_model(seed=5, **{**TINY_CONFIG, **overrides})
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.linspace(4.0, -4.0, model.config.out_depth))
    path = folder / "plane.safetensors"
    save_checkpoint(model, path, info=dataclasses.replace(model_info(model), trained=trained))
    return path


@pytest.fixture
def small_model():
    """``small_model(architecture="VRN", *, bn_mode="instance", seed=0, **overrides)``:
    see :func:`make_small_model`."""
    return make_small_model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data (development data) is not present")
    return path


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    from vrn.runtime import load_image, sample_image_path

    return load_image(sample_image_path())


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A seeded small VRN (instance batch norm) saved in our checkpoint format."""
    from vrn.model import save_checkpoint

    model = make_small_model(seed=1)
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def guided_model(config: dict, *, seed: int = 4, guidance_scale: float = 0.2):
    """A seeded VRNLandmarkGuided (instance batch norm, evaluation mode) whose guidance
    parameters, which start at zero or weak, are random, and whose surface points are
    distinct random affine combinations of the landmarks, so that every guidance path
    is exercised."""
    from vrn.model import build_model

    torch.manual_seed(seed)
    model = build_model("VRNLandmarkGuided", config, bn_mode="instance").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("vrn."):
                param.copy_(guidance_scale * torch.randn(param.shape, generator=gen))
        # Distinct surface points (the placeholder puts all of them on the centroid).
        rng = np.random.default_rng(seed)
        points = rng.dirichlet(np.ones(68), size=model.depth.points.shape[0])
        model.depth.points.copy_(torch.from_numpy(points).float())
    return model
