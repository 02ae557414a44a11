"""The paper's training recipe for VRN models (``docs/reference.md``, "Training"), on
CPU, one GPU, or many with ``torchrun`` (PyTorch DDP).

- loss: per-voxel sigmoid cross-entropy on the logits (:meth:`VRN.logits`), averaged over
  voxels; optionally evaluated on a coarser ``loss_size`` x ``loss_size`` grid (the
  logits are bilinearly resized there from the trunk's output, ``align_corners=True``
  like the full-size head, and the target is sampled at the same points), which cuts
  the cost of the 200-channel loss on small machines. VRN-Multitask and VRN-Guided add
  the same loss on 68 Gaussian landmark heatmaps (sigma 3 crop pixels);
- RMSProp, learning rate ``lr`` (1e-4) lowered to ``lr_after_drop`` (1e-5) from epoch
  ``lr_drop_epoch`` on;
- joint augmentation of image and target: rotation, scale, translation, horizontal flip
  (20%) and per-channel colour scaling (0.6-1.4); the target's depth is scaled with the
  image about the volume's front anchor, so the face keeps its proportions;
- checkpoints in our safetensors format (``last.safetensors``, with full
  :class:`~vrn.model.ModelInfo` metadata) plus ``last-optimizer.pt`` (tensors and
  numbers only, loaded with ``weights_only=True``) to resume; a CSV log.

Samples are ``(image, runs)`` or ``(image, runs, landmarks)``: ``image`` ``(S, S, 3)``
uint8 RGB crop, ``runs`` ``(K, 2, S, S)`` uint8 (:func:`vrn.data.voxelize.column_runs`),
``landmarks`` ``(68, 2 or 3)`` float crop pixels ``(x, y[, z])``.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..data.voxelize import FRONT_MARGIN
from ..model import (GUIDED_ARCHITECTURES, ModelInfo, VRNConfig, build_model, load_checkpoint,
                     load_model, save_checkpoint)
from ..model.heatmaps import LandmarkHeatmaps
from ..model.vrn import NUM_LANDMARKS

CHECKPOINT = "last.safetensors"
OPTIMIZER_STATE = "last-optimizer.pt"
LOG = "log.csv"


@dataclass
class Augmentation:
    """Per-sample joint augmentation ranges (the paper's, ``docs/reference.md``)."""

    rotation: float = 45.0
    translation: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    flip: float = 0.2
    color: tuple[float, float] = (0.6, 1.4)


@dataclass
class Guidance:
    """How the guiding landmarks of a landmark-guided model are made in training, so
    that they look like the run-time landmark stage's (crop pixels ``(x, y, z)``).

    ``stage``: the fraction of samples guided by :class:`~vrn.runtime.landmarks.
    LandmarkStage` run on the (augmented) training image, from a crop box around the
    true landmarks moved and scaled by a few percent (as a detector's box would be).
    The rest get the true landmarks plus noise: a shift shared by all 68 points
    (standard deviation ``shared`` per axis), an offset per point (``point``), a scale
    about their centre (``scale``, relative), and in a fraction ``outlier`` of samples
    all of it doubled. ``stage = 0`` is truth plus noise only; ``1`` the stage only.

    ``blur``: the fraction of samples whose image is then blurred (Gaussian, sigma drawn
    from ``blur_sigma`` crop pixels), so that the network learns to build the face from
    the landmarks where the image says little: synthetic and real photos differ in
    appearance, while the landmarks look the same in both.
    """

    stage: float = 0.5
    shared: float = 1.5
    point: float = 1.8
    scale: float = 0.03
    outlier: float = 0.1
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (4.0, 10.0)

    def __post_init__(self):
        for name in ("stage", "blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Guidance.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        self._stage = None

    def noisy(self, landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``landmarks`` ``(68, 3)`` -> a copy with the noise above (float32)."""
        gain = 2.0 if rng.random() < self.outlier else 1.0
        centre = landmarks.mean(axis=0)
        out = centre + (landmarks - centre) * (1.0 + self.scale * gain * rng.standard_normal())
        out = out + gain * (self.shared * rng.standard_normal(3)
                            + self.point * rng.standard_normal(landmarks.shape))
        return out.astype(np.float32)

    def from_stage(self, image: np.ndarray, landmarks: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
        """The landmark stage on ``image`` ``(S, S, 3)`` float32 in [0, 1], around the
        true ``landmarks`` ``(68, 3)``."""
        from ..runtime.landmarks import LandmarkStage, landmarks_to_crop_box

        if self._stage is None:
            self._stage = LandmarkStage("torch")
        box = landmarks_to_crop_box(landmarks)
        centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2
        centre = centre + rng.normal(0.0, 0.04, 2) * 2 * half
        half = half * rng.uniform(0.92, 1.08)
        pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        found = self._stage.from_crop_boxes(pixels, np.concatenate([centre - half,
                                                                    centre + half])[None])
        return found[0].astype(np.float32)

    def __call__(self, image: np.ndarray, landmarks: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(image, guiding landmarks)`` for a sample: ``image`` ``(S, S, 3)`` float32,
        possibly blurred; landmarks ``(68, 3)`` float32."""
        if rng.random() < self.stage:
            landmarks = self.from_stage(image, landmarks, rng)
        else:
            landmarks = self.noisy(landmarks, rng)
        if rng.random() < self.blur:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*self.blur_sigma))
        return image, landmarks


@dataclass
class TrainConfig:
    """Everything a training run needs besides its data.

    ``init_weights``: start from these weights (``.safetensors`` or ``.t7``; fine-tuning);
    their architecture and configuration then replace ``architecture`` and ``model``.
    """

    architecture: str = "VRN"
    model: VRNConfig = field(default_factory=VRNConfig)
    bn_mode: str = "instance"
    epochs: int = 60
    batch_size: int = 8
    lr: float = 1e-4
    lr_after_drop: float = 1e-5
    lr_drop_epoch: int = 40
    loss_size: int | None = None
    augmentation: Augmentation | None = field(default_factory=Augmentation)
    workers: int = 0
    threads: int | None = None
    seed: int = 0
    save_every: int = 200
    max_minutes: float | None = None
    provenance: str = ""
    init_weights: str | None = None
    device: str | None = None
    guidance: Guidance = field(default_factory=Guidance)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def augment_sample(image: np.ndarray, runs: np.ndarray, landmarks: np.ndarray | None,
                   aug: Augmentation, rng: np.random.Generator, *, depth: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply one random joint augmentation to ``image`` ``(S, S, 3)`` uint8, ``runs``
    ``(K, 2, S, S)`` uint8 and ``landmarks`` ``(68, 3)`` ``(x, y, z)``; returns float32
    image in [0, 1], uint8 runs and float32 landmarks. Rotation is about the viewing
    axis, so columns move whole (nearest neighbour); depth (and the landmarks' z) is
    scaled with the image about the front anchor."""
    s = image.shape[0]
    c = (s - 1) / 2.0
    angle = rng.uniform(-aug.rotation, aug.rotation)
    scale = rng.uniform(*aug.scale)
    shift = rng.uniform(-aug.translation, aug.translation, 2)
    m = cv2.getRotationMatrix2D((c, c), angle, scale)
    m[:, 2] += shift
    img = cv2.warpAffine(image, m, (s, s), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Each output column's source column, through a float32 map of flat indices (exact
    # below 2**24), so that all 2K channels move together.
    flat = np.arange(s * s, dtype=np.float32).reshape(s, s)
    source = cv2.warpAffine(flat, m, (s, s), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=-1).astype(np.int64)
    warped = runs.reshape(-1, s * s)[:, np.maximum(source, 0)].astype(np.float32)
    warped = warped.reshape(runs.shape) * (source >= 0)
    anchor = depth - FRONT_MARGIN
    used = warped[:, 1] > 0
    start = np.clip(np.round(anchor + scale * (warped[:, 0] - anchor)), 0, depth - 1)
    stop = np.clip(np.round(anchor + scale * (warped[:, 1] - anchor)), 1, depth)
    runs = np.where(used[:, None], np.stack([start, stop], axis=1), 0).astype(np.uint8)
    if landmarks is not None:
        moved = np.empty_like(landmarks, dtype=np.float32)
        moved[:, :2] = landmarks[:, :2] @ m[:, :2].T + m[:, 2]
        moved[:, 2:] = landmarks[:, 2:] * scale
        landmarks = moved
    if rng.random() < aug.flip:
        img, runs = img[:, ::-1], runs[..., ::-1]
        if landmarks is not None:
            landmarks = landmarks.copy()
            landmarks[:, 0] = s - 1 - landmarks[:, 0]
            landmarks = landmarks[FLIP_68]
    img = img.astype(np.float32) / 255 * rng.uniform(*aug.color, 3).astype(np.float32)
    return np.clip(img, 0, 1), np.ascontiguousarray(runs), landmarks


# 68-point (iBUG) index permutation under a horizontal flip.
FLIP_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + list(range(27, 31))
    + list(range(35, 30, -1)) + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + list(range(54, 47, -1)) + list(range(59, 54, -1)) + list(range(64, 59, -1))
    + list(range(67, 64, -1)))


class TrainingSet(torch.utils.data.Dataset):
    """Wraps an indexable of samples with augmentation; items are ``(image (3, S, S)
    float32, runs (K, 2, S, S) uint8, landmarks (68, 3) float32 or NaN)``. With
    ``guidance`` (a :class:`Guidance`), the landmarks are those a landmark-guided model
    is trained with, not the true ones."""

    def __init__(self, samples, augmentation: Augmentation | None, *, depth: int = 200,
                 seed: int = 0, guidance: Guidance | None = None):
        self.samples = samples
        self.guidance = guidance
        self.augmentation = augmentation
        self.depth = depth
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        item = self.samples[index]
        image, runs = item[0], item[1]
        landmarks = None
        if len(item) > 2:
            landmarks = np.full((NUM_LANDMARKS, 3), np.nan, np.float32)
            given = np.asarray(item[2], np.float32)
            landmarks[:, :given.shape[1]] = given[:, :3]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        if self.augmentation is not None:
            image, runs, landmarks = augment_sample(image, runs, landmarks, self.augmentation,
                                                   rng, depth=self.depth)
        else:
            image = image.astype(np.float32) / 255
        if landmarks is None:
            landmarks = np.full((NUM_LANDMARKS, 3), np.nan, np.float32)
        elif self.guidance is not None:
            image, landmarks = self.guidance(image, landmarks, rng)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(runs)), torch.from_numpy(landmarks))


def volume_targets(runs: torch.Tensor, *, depth: int, size: int) -> torch.Tensor:
    """Binary volumes ``(N, depth, size, size)`` float32 from runs ``(N, K, 2, S, S)``
    sampled at the ``size`` x ``size`` grid that ``align_corners=True`` resizing uses."""
    s = runs.shape[-1]
    if size != s:
        idx = torch.round(torch.arange(size, dtype=torch.float64) * (s - 1) / (size - 1)).long()
        runs = runs[..., idx, :][..., idx]
    runs = runs.to(torch.int16)
    d = torch.arange(depth, dtype=torch.int16, device=runs.device)[None, :, None, None]
    occupied = torch.zeros((runs.shape[0], depth, size, size), dtype=torch.bool,
                           device=runs.device)
    for k in range(runs.shape[1]):
        occupied |= (d >= runs[:, k, 0:1]) & (d < runs[:, k, 1:2])
    return occupied.float()


def heatmap_targets(landmarks: torch.Tensor, *, input_size: int, size: int,
                    sigma: float = 3.0) -> torch.Tensor:
    """Gaussian heatmaps ``(N, 68, size, size)`` of landmarks ``(N, 68, 2+)`` crop
    pixels, sampled where ``align_corners=True`` resizing puts the ``size`` grid; missing
    (NaN) landmarks give zero heatmaps."""
    render = LandmarkHeatmaps(size, step=(input_size - 1) / (size - 1), sigma=sigma)
    return torch.nan_to_num(render.to(landmarks.device)(landmarks[..., :2]), nan=0.0)


def _trunk_logits(vrn: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    y = vrn.head(vrn.features(x))
    return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=True)


def model_logits(model: nn.Module, x: torch.Tensor, size: int,
                 landmarks: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(volume logits (N, D, size, size), heatmap logits (N, 68, size, size) or None)``;
    ``landmarks`` ``(N, 68, 3)`` crop pixels guide a landmark-guided model."""
    arch = model.architecture
    if arch == "VRN":
        return _trunk_logits(model, x, size), None
    if arch in GUIDED_ARCHITECTURES:
        if landmarks is None or not torch.isfinite(landmarks).all():
            raise ValueError(f"{arch} trains on samples with landmarks")
        return F.interpolate(model.trunk_logits(x, landmarks), size=(size, size),
                             mode="bilinear", align_corners=True), None
    if arch == "VRNMultitask":
        model._check_input(x)
        h = model.stem(x)
        first = None
        for stack in model.stacks:
            h = h + stack(h)
            first = h if first is None else first
        up = dict(size=(size, size), mode="bilinear", align_corners=True)
        return (F.interpolate(model.head(h), **up),
                F.interpolate(model.landmark_head(first), **up))
    if arch == "VRNGuided":
        heat_full = model.landmarks.logits(x)
        guided = torch.cat([x, torch.sigmoid(heat_full)], dim=1)
        heat = F.interpolate(heat_full, size=(size, size), mode="bilinear", align_corners=True)
        return _trunk_logits(model.reconstruction, guided, size), heat
    raise ValueError(f"cannot train architecture {arch!r}")


def _init_prior_bias(model: nn.Module, dataset: TrainingSet, config: TrainConfig,
                     cfg: VRNConfig, count: int = 64) -> None:
    """Start the volume head's last bias at the log-odds of each depth channel's mean
    occupancy over a few samples, so training does not spend its first steps on it."""
    count = min(count, len(dataset))
    if count == 0:
        return
    runs = torch.stack([dataset[i][1] for i in range(count)])
    occupancy = volume_targets(runs, depth=cfg.out_depth,
                               size=min(48, cfg.input_size)).mean(dim=(0, 2, 3))
    p = occupancy.clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.log(p / (1 - p)))


def _guided_from_unguided(unguided: nn.Module, config: TrainConfig) -> nn.Module:
    """A landmark-guided model whose VRN trunk starts as ``unguided``'s; its guidance
    convolutions and its head's last layer start at zero, so that it starts as the
    landmarks' slab prior (see :class:`~vrn.model.VRNLandmarkGuided`), with the fitted
    surface points and prior buffers of the package's default model."""
    from safetensors.torch import load_file

    from ..model.weights import default_weights_path

    model = build_model(config.architecture, unguided.config, bn_mode=config.bn_mode)
    model.vrn.load_state_dict(unguided.state_dict())
    fitted = ("depth.points", "prior.reference_pinv", "prior.neighbours")
    default = default_weights_path()
    tensors = load_file(str(default)) if default is not None else {}
    state = model.state_dict()
    with torch.no_grad():
        for name in fitted:
            if name in tensors and tensors[name].shape == state[name].shape:
                state[name].copy_(tensors[name].to(state[name].dtype))
        model.vrn.head[-1].weight.zero_()
        model.vrn.head[-1].bias.zero_()
    return model


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def train(samples, config: TrainConfig, out_dir: str | os.PathLike, *,
          resume: bool = False, progress: bool = True, log=None) -> dict:
    """Train on ``samples`` (see the module docstring) and write checkpoints to ``out_dir``.

    ``resume``: continue from ``out_dir``'s last checkpoint and optimizer state. Returns
    ``{"steps", "epochs", "loss" (mean of the last 50 steps), "seconds", "checkpoint"}``.
    Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its share of the
    data (``DistributedSampler``) and rank 0 writes the files.
    """
    from tqdm import tqdm

    rank, world, local_rank = _distributed()
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _device(config, local_rank)
    torch.manual_seed(config.seed)

    ckpt_path = out_dir / CHECKPOINT
    model, resume = _initial_model(config, ckpt_path, resume)
    model.to(device).train()
    cfg = model.config
    loss_size = config.loss_size or cfg.input_size
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr)
    state = _restore_optimizer(optimizer, out_dir / OPTIMIZER_STATE, device, resume)
    net = _LogitsNet(model, loss_size)
    if world > 1:  # gradients are averaged over processes in the wrapper's backward
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    guided = model.architecture in GUIDED_ARCHITECTURES
    dataset = TrainingSet(samples, config.augmentation, depth=cfg.out_depth, seed=config.seed,
                          guidance=config.guidance if guided else None)
    volume_net = getattr(model, "vrn", model)
    if not resume and not config.init_weights and not guided and hasattr(volume_net, "head"):
        _init_prior_bias(volume_net, dataset, config, cfg)  # a guided model has its prior

    start = time.perf_counter()
    recent: list[float] = []
    deadline = (start + 60 * config.max_minutes) if config.max_minutes else None
    info = ModelInfo(architecture=model.architecture, config=cfg,
                     landmark_config=getattr(model, "landmark_config", None),
                     trained=True, provenance=config.provenance)

    def save():
        if rank == 0:
            _save_state(model, optimizer, info, state, recent, out_dir)

    log_csv = _TrainingLog(out_dir / LOG, append=resume) if rank == 0 else None
    stop = False
    try:
        while state["epoch"] < config.epochs and not stop:
            epoch = state["epoch"]
            lr = _set_learning_rate(optimizer, config, epoch)
            bar = tqdm(_epoch_loader(samples, dataset, config, epoch, world),
                       desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not progress or rank != 0, leave=False)
            for images, runs, landmarks in bar:
                t0 = time.perf_counter()
                losses = _train_step(net, optimizer, images, runs,
                                     landmarks if guided else None, cfg, loss_size, device,
                                     heatmap_landmarks=landmarks)
                state["step"] += 1
                recent.append(losses[0])
                if log_csv is not None:
                    log_csv.write(state["step"], epoch, losses, lr, time.perf_counter() - start,
                                  len(images) * world / (time.perf_counter() - t0))
                bar.set_postfix(loss=f"{np.mean(recent[-20:]):.4f}")
                if log is not None and rank == 0:
                    log(state["step"], losses[0])
                if state["step"] % config.save_every == 0:
                    save()
                if deadline is not None and time.perf_counter() > deadline:
                    stop = True
                    break
            else:
                state["epoch"] += 1
        save()
    finally:
        if log_csv is not None:
            log_csv.close()
    return {"steps": state["step"], "epochs": state["epoch"],
            "loss": float(np.mean(recent[-50:])) if recent else math.nan,
            "seconds": time.perf_counter() - start, "checkpoint": ckpt_path}


def _set_learning_rate(optimizer, config: TrainConfig, epoch: int) -> float:
    """The paper's schedule: ``lr``, then ``lr_after_drop`` from ``lr_drop_epoch`` on."""
    lr = config.lr if epoch < config.lr_drop_epoch else config.lr_after_drop
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _initial_model(config: TrainConfig, ckpt_path: Path, resume: bool
                   ) -> tuple[nn.Module, bool]:
    """The model to start from, and whether this is a resumed run: ``ckpt_path`` when
    resuming and it exists, else ``config.init_weights`` (an unguided model becomes a
    guided one's trunk), else a new model."""
    if resume and ckpt_path.is_file():
        return load_checkpoint(ckpt_path, bn_mode=config.bn_mode), True
    if config.init_weights:
        model = load_model(config.init_weights, bn_mode=config.bn_mode)
        if config.architecture in GUIDED_ARCHITECTURES and model.architecture == "VRN":
            model = _guided_from_unguided(model, config)
        return model, False
    return build_model(config.architecture, config.model, bn_mode=config.bn_mode), False


def _restore_optimizer(optimizer, path: Path, device, resume: bool) -> dict:
    """``{"epoch", "step"}`` to continue from: the saved optimizer state's when resuming
    and ``path`` exists (also loaded into ``optimizer``), else zeros."""
    if not (resume and path.is_file()):
        return {"epoch": 0, "step": 0}
    saved = torch.load(path, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    return {"epoch": int(saved["epoch"]), "step": int(saved["step"])}


def _save_state(model, optimizer, info: ModelInfo, state: dict, recent: list[float],
                out_dir: Path) -> None:
    """The checkpoint (with the step, epoch and recent loss in its metadata) and the
    optimizer state, each written atomically."""
    info.extra = {"epoch": str(state["epoch"]), "step": str(state["step"]),
                  "train_loss": f"{np.mean(recent[-50:]):.6f}" if recent else "nan"}
    save_checkpoint(model, out_dir / CHECKPOINT, info=info)
    with atomic_path(out_dir / OPTIMIZER_STATE) as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "epoch": state["epoch"],
                    "step": state["step"]}, tmp)


def _epoch_loader(samples, dataset: TrainingSet, config: TrainConfig, epoch: int,
                  world: int):
    """The epoch's ``DataLoader`` (seeded per epoch; a ``DistributedSampler`` share
    under ``torchrun``)."""
    dataset.epoch = epoch
    if hasattr(samples, "refresh"):
        samples.refresh()  # a cache that is still being written grows here
    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=config.seed)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=config.workers, drop_last=len(dataset) >= config.batch_size,
        generator=torch.Generator().manual_seed(config.seed + epoch))


class _LogitsNet(nn.Module):
    """:func:`model_logits` as a module's ``forward``, so that DistributedDataParallel,
    which averages gradients for what runs through its ``forward``, can wrap it."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, images: torch.Tensor, guide: torch.Tensor | None = None):
        return model_logits(self.model, images, self.size, guide)


def _train_step(net, optimizer, images, runs, guide, cfg, loss_size: int, device, *,
                heatmap_landmarks) -> tuple[float, float, float]:
    """One optimiser step on a batch; returns ``(loss, volume loss, landmark loss)``.

    ``net``: a :class:`_LogitsNet` (or DistributedDataParallel around one).

    ``images`` ``(N, C, S, S)``, ``runs`` the volume targets' depth runs, ``guide``
    ``(N, 68, 3)`` landmarks for a guided model (else ``None``); ``heatmap_landmarks``
    feed the heatmap loss of a model that predicts heatmaps."""
    images = images.to(device, non_blocking=True)
    targets = volume_targets(runs.to(device), depth=cfg.out_depth, size=loss_size)
    guide = guide.to(device) if guide is not None else None
    volume, heat = net(images, guide)
    volume_loss = F.binary_cross_entropy_with_logits(volume, targets)
    loss = volume_loss
    landmark_loss = torch.zeros(())
    if heat is not None:
        heat_t = heatmap_targets(heatmap_landmarks.to(device), input_size=cfg.input_size,
                                 size=loss_size)
        landmark_loss = F.binary_cross_entropy_with_logits(heat, heat_t)
        loss = loss + landmark_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), float(volume_loss.detach()), float(landmark_loss.detach())


class _TrainingLog:
    """The CSV log of every step (``log.csv``): a new file with its header, or
    appended to when a resumed run finds one."""

    HEADER = ["step", "epoch", "loss", "volume_loss", "landmark_loss", "lr", "seconds",
              "images_per_second"]

    def __init__(self, path: Path, *, append: bool):
        append = append and path.is_file()
        self.file = open(path, "a" if append else "w", newline="")
        self.writer = csv.writer(self.file)
        if not append:
            self.writer.writerow(self.HEADER)

    def write(self, step: int, epoch: int, losses: tuple[float, float, float], lr: float,
              seconds: float, images_per_second: float) -> None:
        loss, volume_loss, landmark_loss = losses
        self.writer.writerow([step, epoch, f"{loss:.6f}", f"{volume_loss:.6f}",
                              f"{landmark_loss:.6f}", lr, f"{seconds:.1f}",
                              f"{images_per_second:.2f}"])
        self.file.flush()

    def close(self) -> None:
        self.file.close()
