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
    from vrn.model import VRN, VRNConfig, save_checkpoint, set_bn_mode

    torch.manual_seed(1)
    model = set_bn_mode(VRN(VRNConfig(**SMALL_CONFIG)), "instance").eval()
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_checkpoint(model, path)
    return path
