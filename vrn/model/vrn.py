"""The Volumetric Regression Network and its multitask and guided variants.

The default :class:`VRNConfig` is exactly the released ``vrn-unguided`` (19,184,968
parameters): input ``(N, 3, 192, 192)`` RGB in [0, 1], output ``(N, 200, 192, 192)``
occupancy in [0, 1] after a sigmoid, channel ``d`` is depth with larger ``d`` nearer the
camera, so the volume is ``(D, H, W)`` per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BN_MODES, BatchNorm2d, ConvBNReLU, Level, Residual
from .heatmaps import DepthSmoothing, LandmarkDepth, LandmarkHeatmaps, PlaneSmoothing
from .slab_prior import SlabPrior

NUM_LANDMARKS = 68


# Upper bounds of the configuration fields: generous for any real VRN (the released one
# has features 256, 2 stacks, depth 4, residuals 3/6/9), and they keep a checkpoint's
# metadata from asking for an absurd model.
CONFIG_LIMITS = {"in_channels": 512, "features": 2048, "num_stacks": 16, "hourglass_depth": 8,
                 "residuals_a": 64, "residuals_b": 64, "residuals_b_innermost": 64,
                 "out_depth": 1024, "input_size": 1024}


@dataclass(frozen=True)
class VRNConfig:
    """Architecture of one VRN trunk and head.

    ``features`` is the hourglass width (the stem runs at ``features // 4`` and
    ``features // 2``); ``hourglass_depth`` the number of nested levels; the ``residuals_*``
    the residual counts per level branch; ``out_depth`` the number of output channels
    (volume depth, or heatmaps); ``input_size`` the square input side, divisible by
    ``4 * 2`` so the pooled branch stays integral.
    """

    in_channels: int = 3
    features: int = 256
    num_stacks: int = 2
    hourglass_depth: int = 4
    residuals_a: int = 3
    residuals_b: int = 6
    residuals_b_innermost: int = 9
    out_depth: int = 200
    input_size: int = 192

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"VRNConfig.{field.name} must be an int, got {value!r}")
        positive = ("in_channels", "features", "num_stacks", "hourglass_depth", "out_depth",
                    "input_size", "residuals_b_innermost")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"VRNConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name, most in CONFIG_LIMITS.items():
            if getattr(self, name) > most:
                raise ValueError(f"VRNConfig.{name} must be <= {most}, got "
                                 f"{getattr(self, name)}")
        for name in ("residuals_a", "residuals_b"):
            if getattr(self, name) < 0:
                raise ValueError(f"VRNConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.features % 4:
            raise ValueError(f"VRNConfig.features must be a multiple of 4, got {self.features}")
        if self.input_size % 8:
            raise ValueError(f"VRNConfig.input_size must be a multiple of 8, got {self.input_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VRNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown VRNConfig fields: {sorted(unknown)}")
        return cls(**data)


def set_bn_mode(module: nn.Module, mode: str) -> nn.Module:
    """Set every :class:`BatchNorm2d` under ``module`` to ``"running"`` or ``"instance"``.

    The norm layers are the only place the mode is kept: ``model.bn_mode`` and
    ``model.info.bn_mode`` read it from them (:func:`bn_mode_of`).
    """
    if mode not in BN_MODES:
        raise ValueError(f"batch-norm mode must be one of {BN_MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, BatchNorm2d):
            m.mode = mode
    return module


def bn_mode_of(module: nn.Module) -> str:
    """The mode shared by every :class:`BatchNorm2d` under ``module`` (``"running"``
    when there is none); ``ValueError`` when they differ."""
    modes = {m.mode for m in module.modules() if isinstance(m, BatchNorm2d)}
    if len(modes) > 1:
        raise ValueError(f"batch-norm layers disagree on their mode: {sorted(modes)}")
    return modes.pop() if modes else "running"


class _ModelState:
    """What every VRN architecture exposes about its state: ``bn_mode`` and ``info``."""

    @property
    def bn_mode(self) -> str:
        """``"running"`` or ``"instance"``, read from the norm layers (:func:`bn_mode_of`)."""
        return bn_mode_of(self)

    @property
    def info(self):
        """The attached :class:`~vrn.model.checkpoint.ModelInfo` (``None`` until a loader
        or trainer attaches one); its ``bn_mode`` always reads the norm layers."""
        info = self.__dict__.get("_info")
        if info is not None:
            info.bn_mode = self.bn_mode
        return info

    @info.setter
    def info(self, value) -> None:
        self.__dict__["_info"] = value


class VRN(_ModelState, nn.Module):
    """Volumetric Regression Network (Jackson et al., ICCV 2017), unguided.

    ``forward(x)``: ``x`` ``(N, in_channels, S, S)`` float, RGB in [0, 1] ->
    ``(N, out_depth, S, S)`` occupancy in [0, 1]. :meth:`logits` returns the same before
    the sigmoid (for training with ``binary_cross_entropy_with_logits``).
    """

    architecture = "VRN"

    def __init__(self, config: VRNConfig | None = None, bn_mode: str = "running"):
        super().__init__()
        self.config = config = config or VRNConfig()
        f = config.features
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, f // 4, 7, stride=2, padding=3),
            BatchNorm2d(f // 4),
            nn.ReLU(inplace=True),
            Residual(f // 4, f // 2),
            nn.MaxPool2d(2),
            Residual(f // 2, f // 2),
            Residual(f // 2, f),
        )
        self.stacks = nn.ModuleList(
            nn.Sequential(
                Level(config.hourglass_depth, f, config.residuals_a, config.residuals_b,
                      config.residuals_b_innermost),
                ConvBNReLU(f, f),
                ConvBNReLU(f, f),
            )
            for _ in range(config.num_stacks)
        )
        self.head = nn.Sequential(ConvBNReLU(f, f), nn.Conv2d(f, config.out_depth, 1))
        set_bn_mode(self, bn_mode)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features ``(N, features, S/4, S/4)``."""
        self._check_input(x)
        x = self.stem(x)
        for stack in self.stacks:
            x = x + stack(x)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output ``(N, out_depth, S, S)``."""
        y = self.head(self.features(x))
        size = self.config.input_size
        return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: a new (N, D, S, S) tensor costs eager PyTorch more than the sigmoid.
        return self.logits(x).sigmoid_()

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.input_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            # Shapes are symbolic while exporting; only check concrete ones.
            if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
                raise ValueError(f"{type(self).__name__} expects input (N, {c}, {s}, {s}), "
                                 f"got {tuple(x.shape)}")


class VRNMultitask(VRN):
    """VRN-Multitask: one network regresses the volume and 68 landmark heatmaps.

    The landmark head (``conv1x1 BN ReLU conv1x1 -> 68``) reads the trunk features after
    the first stack, the volume head after the last. ``forward`` returns the volume
    ``(N, out_depth, S, S)``; :meth:`forward_all` also the heatmaps ``(N, 68, S, S)``.
    """

    architecture = "VRNMultitask"

    def __init__(self, config: VRNConfig | None = None, bn_mode: str = "running"):
        super().__init__(config, bn_mode="running")
        f = self.config.features
        self.landmark_head = nn.Sequential(ConvBNReLU(f, f), nn.Conv2d(f, NUM_LANDMARKS, 1))
        set_bn_mode(self, bn_mode)

    def logits_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-sigmoid ``(volume, heatmaps)``, both at the input resolution."""
        self._check_input(x)
        x = self.stem(x)
        landmark_features = None
        for stack in self.stacks:
            x = x + stack(x)
            if landmark_features is None:
                landmark_features = x
        size = (self.config.input_size,) * 2
        volume = F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=True)
        heatmaps = F.interpolate(self.landmark_head(landmark_features), size=size,
                                 mode="bilinear", align_corners=True)
        return volume, heatmaps

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_all(x)[0]

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        volume, heatmaps = self.logits_all(x)
        return torch.sigmoid(volume), torch.sigmoid(heatmaps)


class VRNGuided(_ModelState, nn.Module):
    """VRN-Guided: a landmark hourglass predicts 68 heatmaps, which are stacked with the
    RGB image as the input of the reconstruction VRN (``in_channels = 3 + 68``).

    ``forward(x)``: ``(N, 3, S, S)`` RGB in [0, 1] -> volume ``(N, out_depth, S, S)``;
    :meth:`forward_all` also returns the heatmaps ``(N, 68, S, S)`` in [0, 1].
    """

    architecture = "VRNGuided"

    def __init__(self, config: VRNConfig | None = None, bn_mode: str = "running",
                 landmark_config: VRNConfig | None = None):
        super().__init__()
        config = config or VRNConfig(in_channels=3 + NUM_LANDMARKS)
        if config.in_channels != 3 + NUM_LANDMARKS:
            raise ValueError(f"VRNGuided's reconstruction network takes 3 + {NUM_LANDMARKS} "
                             f"input channels, got in_channels={config.in_channels}")
        landmark_config = landmark_config or dataclasses.replace(
            config, in_channels=3, num_stacks=1, out_depth=NUM_LANDMARKS)
        self.landmarks = VRN(landmark_config)
        self.reconstruction = VRN(config)
        self.config = config
        self.landmark_config = landmark_config
        set_bn_mode(self, bn_mode)

    def logits_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heatmap_logits = self.landmarks.logits(x)
        guided = torch.cat([x, torch.sigmoid(heatmap_logits)], dim=1)
        return self.reconstruction.logits(guided), heatmap_logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_all(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        volume, heatmaps = self.logits_all(x)
        return torch.sigmoid(volume), torch.sigmoid(heatmaps)


def _float32_geometry(device_type: str):
    """A context computing the landmark geometry in float32 under autocast (eager bf16 on
    CPUs); elsewhere, exports included, it does nothing."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class VRNLandmarkGuided(_ModelState, nn.Module):
    """VRN guided by 68 3D landmarks given as an input (the default model's architecture).

    ``forward(image, landmarks)``: ``image`` ``(N, 3, S, S)`` float32 RGB in [0, 1] and
    ``landmarks`` ``(N, 68, 3)`` float32 crop pixels ``(x, y, z)`` (z toward the camera,
    any origin) -> occupancy ``(N, out_depth, S, S)`` in [0, 1], ``(D, H, W)`` per image.

    Guidance, all computed inside the graph from the landmarks:

    - 68 Gaussian heatmaps (sigma :attr:`HEATMAP_SIGMA` crop pixels, as in the paper's
      VRN-Guided) stacked with the image at the stem: the stem convolution (7x7,
      stride 2) sees the image and a 1x1 convolution sees the heatmaps sampled at its
      output pixels (crop pixels ``0, 2, 4, ...``), i.e. one convolution over the
      stacked ``3 + 68`` channels whose heatmap taps are its centre tap (a full 7x7 over
      71 channels would cost 30 times the stem);
    - a smooth depth field and its coverage (:class:`~.heatmaps.LandmarkDepth`) on the
      trunk's grid, added to the trunk's features (1x1 convolution) before the head;
    - the face slab prior (:class:`~.slab_prior.SlabPrior`): the target volume the
      landmarks alone imply (the face's ``J`` surface points turned frontal, their
      depth map, a slab of the targets' thickness, turned back), as logits on the
      trunk's grid.

    The volume's logits are ``head(features) + prior`` (the head is the image's
    correction to the prior; the prior's weight is fixed: trained, cross-entropy shrinks
    a gain on it until the head, which does not carry over from synthetic to real
    photos as well as the prior does, decides the surface), smoothed along depth
    (:class:`~.heatmaps.DepthSmoothing`, sigma :attr:`DEPTH_SIGMA` voxels) on the trunk's
    grid, then resized to ``S`` in two bilinear doublings (``align_corners=True``) with
    a small blur between them (:class:`~.heatmaps.PlaneSmoothing`: VRN's single bilinear
    resize leaves the trunk's grid visible in the shading; ONNX Runtime's bicubic resize
    costs 400 ms). The prior's ramps are linear in depth over
    :attr:`~.slab_prior.SlabPrior.clamp` voxels, so the resize interpolates the surface
    between trunk pixels instead of stepping. ``self.vrn`` is a plain :class:`VRN`
    (``in_channels = 3``), so unguided weights initialise it.
    """

    architecture = "VRNLandmarkGuided"
    HEATMAP_SIGMA = 3.0
    DEPTH_SIGMA = 2.0
    FRONT_MARGIN = 8  # the volume's nearest face point is at d = out_depth - 1 - 8
    DEPTH_BIAS = 4.5  # voxels: the depth field's mean bias on synthetic faces

    def __init__(self, config: VRNConfig | None = None, bn_mode: str = "running"):
        super().__init__()
        config = config or VRNConfig()
        if config.in_channels != 3:
            raise ValueError("VRNLandmarkGuided's image input has 3 channels, got "
                             f"in_channels={config.in_channels}")
        self.config = config
        self.vrn = VRN(config)
        stem_conv = self.vrn.stem[0]
        s, trunk = config.input_size, config.input_size // 4
        front = config.out_depth - 1 - self.FRONT_MARGIN
        self.heatmaps = LandmarkHeatmaps(s // 2, step=2.0, sigma=self.HEATMAP_SIGMA)
        self.guide = nn.Conv2d(NUM_LANDMARKS, stem_conv.out_channels, 1, bias=False)
        self.depth = LandmarkDepth(trunk, step=(s - 1) / (trunk - 1),
                                   anchor=front - self.DEPTH_BIAS)
        self.depth_guide = nn.Conv2d(2, config.features, 1, bias=False)
        self.prior = SlabPrior(trunk, depth=config.out_depth, crop=s, front=front)
        # The depth field enters the features at about unit scale.
        self.register_buffer("field_scale", torch.tensor([1 / 64.0, 1.0]).view(1, 2, 1, 1),
                             persistent=False)
        for conv in (self.guide, self.depth_guide):
            nn.init.zeros_(conv.weight)
        self.smooth = DepthSmoothing(self.DEPTH_SIGMA)
        self.plane_smooth = PlaneSmoothing(config.out_depth)
        set_bn_mode(self, bn_mode)

    def trunk_logits(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Smoothed pre-sigmoid volume at the trunk's resolution ``(N, D, S/4, S/4)``."""
        self.vrn._check_input(image)
        stem = self.vrn.stem
        with _float32_geometry(image.device.type):
            heat = self.heatmaps(landmarks[..., :2])
            field = self.depth(landmarks)                      # (N, 2, S/4, S/4) float32
            prior = self.prior(landmarks, self.depth.points)   # (N, D, S/4, S/4) float32
        x = stem[0](image) + self.guide(heat.to(image.dtype))
        x = stem[1:](x)
        for stack in self.vrn.stacks:
            x = x + stack(x)
        x = x + self.depth_guide((field * self.field_scale.float()).to(x.dtype))
        return self.smooth(self.vrn.head(x) + prior.to(x.dtype))

    def logits(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output ``(N, out_depth, S, S)``."""
        return self.resize(self.trunk_logits(image, landmarks))

    def resize(self, trunk_logits: torch.Tensor) -> torch.Tensor:
        """Trunk-grid logits ``(N, D, S/4, S/4)`` -> ``(N, D, S, S)``: two bilinear
        doublings with :class:`~.heatmaps.PlaneSmoothing` between them."""
        size = self.config.input_size
        half = F.interpolate(trunk_logits, size=(size // 2, size // 2), mode="bilinear",
                             align_corners=True)
        return F.interpolate(self.plane_smooth(half), size=(size, size), mode="bilinear",
                             align_corners=True)

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return self.logits(image, landmarks).sigmoid_()  # in place, as VRN.forward


ARCHITECTURES = {cls.architecture: cls
                 for cls in (VRN, VRNMultitask, VRNGuided, VRNLandmarkGuided)}
GUIDED_ARCHITECTURES = ("VRNLandmarkGuided",)


def build_model(architecture: str = "VRN", config: VRNConfig | dict | None = None,
                bn_mode: str = "running", landmark_config: VRNConfig | dict | None = None
                ) -> nn.Module:
    """Build a model by architecture name (``"VRN"``, ``"VRNMultitask"``, ``"VRNGuided"``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; "
                         f"expected one of {sorted(ARCHITECTURES)}")
    if isinstance(config, dict):
        config = VRNConfig.from_dict(config)
    if architecture == "VRNGuided":
        if isinstance(landmark_config, dict):
            landmark_config = VRNConfig.from_dict(landmark_config)
        return VRNGuided(config, bn_mode=bn_mode, landmark_config=landmark_config)
    return ARCHITECTURES[architecture](config, bn_mode=bn_mode)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (batch-norm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
