"""One entry point for weights: a ``.t7``, a vrn-edge ``.safetensors`` checkpoint, or
the package default."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .checkpoint import ModelInfo, load_checkpoint
from .vrn import VRN, VRNConfig, set_bn_mode

DEFAULT_SEED = 0
DEFAULT_CHECKPOINT = "default.safetensors"


def default_weights_path() -> Path | None:
    """The trained default checkpoint shipped in ``vrn/model/weights_data``, if any."""
    path = Path(str(resources.files("vrn.model").joinpath("weights_data", DEFAULT_CHECKPOINT)))
    return path if path.is_file() else None


def random_model(seed: int = DEFAULT_SEED, config: VRNConfig | None = None,
                 bn_mode: str = "instance") -> nn.Module:
    """A VRN with a seeded random initialisation (the same weights on every machine)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = VRN(config)
    finally:
        torch.random.set_rng_state(generator_state)
    set_bn_mode(model, bn_mode)
    model.info = ModelInfo(config=model.config, bn_mode=bn_mode, trained=False,
                           provenance=f"seeded random initialisation (seed {seed}); "
                                      "not trained: its meshes are not faces")
    return model.eval()


def load_model(weights: str | os.PathLike | None = None, *, bn_mode: str | None = None,
               map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model in evaluation mode with ``model.info`` (:class:`ModelInfo`) set.

    ``weights``: a Torch7 ``.t7`` file (the authors' release; batch norm defaults to
    ``"instance"``), a vrn-edge ``.safetensors`` checkpoint, or ``None`` for the package
    default (the shipped trained checkpoint, or a seeded random initialisation when the
    package has none, with ``model.info.trained == False``).
    """
    if weights is None:
        path = default_weights_path()
        if path is None:
            model = random_model()
            if bn_mode is not None:
                set_bn_mode(model, bn_mode)
            return model.to(map_location)
        return load_checkpoint(path, bn_mode=bn_mode, map_location=map_location)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == ".t7":
        from .torch7 import load_torch7
        return load_torch7(path, bn_mode=bn_mode or "instance").to(map_location)
    if suffix == ".safetensors":
        return load_checkpoint(path, bn_mode=bn_mode, map_location=map_location)
    raise WeightsError(f"{path}: unknown weights format {suffix!r} "
                       "(expected a Torch7 .t7 or a vrn-edge .safetensors checkpoint)")
