"""vrn-edge checkpoints: safetensors tensors plus string metadata.

Metadata keys (all strings): ``format`` (``"vrn-edge-checkpoint/1"``), ``architecture``,
``config`` and ``landmark_config`` (JSON of :class:`~vrn.model.VRNConfig`), ``bn_mode``,
``color_order`` (``"RGB"``), ``input_range`` (``"[0, 1]"``: pixel values / 255),
``z_scale`` (``"0.5"``: volume depth units per pixel), ``trained`` (``"true"``/``"false"``),
``provenance`` (free text: where the weights came from), and any extra keys given.
safetensors never executes code on load, so untrusted files are safe to open.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import WeightsError
from .blocks import BN_MODES
from .vrn import ARCHITECTURES, VRNConfig, bn_mode_of, build_model, set_bn_mode

FORMAT = "vrn-edge-checkpoint/1"
# The one input layout every backend feeds; checkpoints that declare another are refused.
SUPPORTED_INPUT = {"color_order": "RGB", "input_range": "[0, 1]"}


@dataclass
class ModelInfo:
    """What a model's weights are and how its input and output are to be read."""

    architecture: str = "VRN"
    config: VRNConfig = field(default_factory=VRNConfig)
    landmark_config: VRNConfig | None = None
    bn_mode: str = "running"
    color_order: str = "RGB"
    input_range: str = "[0, 1]"
    z_scale: float = 0.5
    trained: bool = True
    provenance: str = ""
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "architecture": self.architecture,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "bn_mode": self.bn_mode,
            "color_order": self.color_order,
            "input_range": self.input_range,
            "z_scale": repr(float(self.z_scale)),
            "trained": "true" if self.trained else "false",
            "provenance": self.provenance,
        }
        if self.landmark_config is not None:
            meta["landmark_config"] = json.dumps(self.landmark_config.to_dict(), sort_keys=True)
        for key, value in self.extra.items():
            meta.setdefault(str(key), str(value))
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelInfo:
        known = {"format", "architecture", "config", "landmark_config", "bn_mode",
                 "color_order", "input_range", "z_scale", "trained", "provenance"}
        landmark = meta.get("landmark_config")
        z_scale = float(meta.get("z_scale", "0.5"))
        if not math.isfinite(z_scale) or z_scale <= 0:
            raise ValueError(f"z_scale must be finite and positive, got {z_scale}")
        bn_mode = meta.get("bn_mode", "running")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {list(BN_MODES)}, got {bn_mode!r}")
        for key, supported in SUPPORTED_INPUT.items():
            if meta.get(key, supported) != supported:
                raise ValueError(f"{key} {meta[key]!r} is not supported (the runtime feeds "
                                 f"{SUPPORTED_INPUT['color_order']} in "
                                 f"{SUPPORTED_INPUT['input_range']})")
        return cls(
            architecture=meta["architecture"],
            config=VRNConfig.from_dict(json.loads(meta["config"])),
            landmark_config=VRNConfig.from_dict(json.loads(landmark)) if landmark else None,
            bn_mode=bn_mode,
            color_order=meta.get("color_order", "RGB"),
            input_range=meta.get("input_range", "[0, 1]"),
            z_scale=z_scale,
            trained=meta.get("trained", "true") == "true",
            provenance=meta.get("provenance", ""),
            extra={k: v for k, v in meta.items() if k not in known},
        )


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` attached to ``model`` (built from the model if none is)."""
    info = getattr(model, "info", None)
    if info is None:
        info = ModelInfo(architecture=model.architecture, config=model.config,
                         landmark_config=getattr(model, "landmark_config", None),
                         bn_mode=bn_mode_of(model), trained=False)
    return info


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                    info: ModelInfo | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s state dict and metadata to ``path`` (safetensors), atomically.

    ``dtype`` (e.g. ``torch.float16``) converts floating-point tensors for a smaller
    file; they are converted back to float32 on load.
    """
    from safetensors.torch import save_file

    info = dataclasses.replace(info or model_info(model), bn_mode=bn_mode_of(model))
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info.to_metadata())
    return path


def read_checkpoint_info(path: str | os.PathLike) -> ModelInfo:
    """Read only the metadata of a checkpoint (no tensors are loaded)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a vrn-edge checkpoint (metadata format is "
                           f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("architecture") not in ARCHITECTURES:
        raise WeightsError(f"{path}: unknown architecture {meta.get('architecture')!r}")
    try:
        return ModelInfo.from_metadata(meta)
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: invalid checkpoint metadata ({exc})") from None


def load_checkpoint(path: str | os.PathLike, *, bn_mode: str | None = None,
                    map_location: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes and load its weights (float32).

    Returns the model in evaluation mode with ``model.info`` set. ``bn_mode`` overrides
    the stored batch-norm mode.
    """
    from safetensors.torch import load_file

    path = _existing(path)
    info = read_checkpoint_info(path)
    # The metadata is checked against the file's tensor shapes before anything is
    # allocated: a small file claiming a huge architecture fails here, not after.
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in
                  build_model(info.architecture, info.config,
                              landmark_config=info.landmark_config).state_dict().items()}
    _check_shapes(path, shapes)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as exc:
        raise WeightsError(f"{path}: truncated or corrupt safetensors data ({exc})") from None
    model = build_model(info.architecture, info.config, landmark_config=info.landmark_config)
    expected = model.state_dict()
    for name, ref in expected.items():
        tensors[name] = tensors[name].to(ref.dtype)
    model.load_state_dict(tensors)
    set_bn_mode(model, bn_mode or info.bn_mode)
    model.info = info
    return model.to(map_location).eval()


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the tensor names and shapes in ``path``'s header with ``shapes`` (what
    the architecture needs), reading no tensor data. Raises :class:`WeightsError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:
        raise WeightsError(f"{path}: truncated or corrupt safetensors data ({exc})") from None
    for name, shape in shapes.items():
        if name not in stored:
            raise WeightsError(f"{path}: missing tensor {name!r} (shape {shape})")
        if stored[name] != shape:
            raise WeightsError(f"{path}: tensor {name!r} has shape {stored[name]}, the "
                               f"architecture needs {shape}")
    unexpected = sorted(set(stored) - set(shapes))
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]!r} "
                           f"({len(unexpected)} not in the architecture)")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return path
