"""Synthetic training faces: random BFM faces rendered over real-photo backgrounds, each
with its exact target volume (in the compact :func:`~vrn.data.voxelize.column_runs` form).

One sample (reproducible from ``(seed, index)``):

- identity and expression: BFM parameters drawn around the 300W-LP fit statistics
  (``param_whitening.pkl``), clipped at 2.5 standard deviations;
- pose: yaw up to 90 degrees (60% of samples within 45), pitch and roll up to about
  30 degrees; orthographic projection as in 300W-LP;
- crop: the paper's 68-landmark rule (:func:`~vrn.runtime.crop.landmarks_crop_matrix`)
  jittered in scale (0.85-1.15) and shift (+-12 crop pixels), which covers the error of
  the detection-box crop used at run time;
- appearance: a skin albedo with low-frequency variation, darker brows, eyes with iris
  and sclera, lips and mouth painted from the 68 landmarks, Lambert plus specular
  shading under a random light, a rough head ellipse (hair) and neck behind the face;
- background: a random crop of a real photo (``vrn/assets/astronaut.jpg`` and the images
  bundled with scikit-image) or a smooth random texture; then blur, noise and gamma;
- rendering: :func:`vrn.runtime.render._rasterize`, a real z-buffer rasteriser.

Samples are written to a cache folder as ``.npz`` shards (:func:`write_cache`) and read
back with :class:`CachedFaces`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_path
from ..errors import VRNError
from ..runtime.crop import CROP_SIZE, landmarks_crop_matrix
from ..runtime.render import _rasterize, vertex_normals
from .bfm import BFM, crop_rotation, rotation_matrix
from .voxelize import THICKNESS, VOLUME_DEPTH, column_runs

SKIN_TONES = np.array([[233, 192, 160], [224, 172, 135], [198, 144, 108], [160, 110, 80],
                       [115, 75, 52], [240, 205, 180], [210, 160, 125]], np.float32) / 255
HAIR_TONES = np.array([[30, 22, 18], [70, 45, 30], [120, 85, 50], [200, 170, 120],
                       [90, 90, 90], [15, 15, 15]], np.float32) / 255


@dataclass
class FaceSample:
    """``image`` ``(S, S, 3)`` uint8 RGB crop; ``runs`` ``(K, 2, S, S)`` uint8 target (see
    :func:`~vrn.data.voxelize.column_runs`); ``landmarks`` ``(68, 3)`` float32 crop pixels
    ``(x, y, z)``; ``vertices`` ``(V, 3)`` float32 the posed mesh in crop pixels."""

    image: np.ndarray
    runs: np.ndarray
    landmarks: np.ndarray
    vertices: np.ndarray


def _background_images() -> list[np.ndarray]:
    images = []
    asset = Path(__file__).resolve().parent.parent / "assets" / "astronaut.jpg"
    photo = cv2.imread(str(asset), cv2.IMREAD_COLOR)
    if photo is not None:
        images.append(cv2.cvtColor(photo, cv2.COLOR_BGR2RGB))
    try:
        import skimage.data as data
    except ImportError:
        return images
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "brick", "camera", "clock", "coins", "grass",
                 "gravel", "moon", "page", "text", "horse", "cell", "colorwheel"):
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # an image that needs a download: skip it
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        img = img.astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(img[:, :, :3]))
    return images


class SyntheticFaces:
    """A reproducible, indexable source of synthetic faces (see the module docstring).

    ``bfm``: the face-region :class:`~vrn.data.bfm.BFM`; ``seed``: samples are a pure
    function of ``(seed, index)``; ``thickness``: the targets' fill depth (voxels);
    ``max_yaw``: degrees.
    """

    def __init__(self, bfm: BFM, *, seed: int = 0, size: int = CROP_SIZE,
                 depth: int = VOLUME_DEPTH, thickness: int = THICKNESS,
                 max_yaw: float = 90.0):
        self.bfm = bfm
        self.thickness = thickness
        self.seed = int(seed)
        self.size = size
        self.depth = depth
        self.max_yaw = float(max_yaw)
        self.backgrounds = _background_images()
        self.triangles64 = np.ascontiguousarray(bfm.triangles, dtype=np.int64)

    @cached_property
    def _regions(self) -> dict[str, np.ndarray]:
        """Soft per-vertex masks ``(V,)`` float32 of brows, eyes, iris, lips and mouth,
        painted on the frontal mean face from its 68 landmarks."""
        mean = self.bfm.mean
        lm = mean[self.bfm.landmarks]
        span = np.ptp(lm[:, 0])
        scale = 256.0 / span
        origin = lm[:, :2].min(0) - 0.25 * span
        size = int(1.5 * 256)

        def to_px(points):
            p = (points[:, :2] - origin) * scale
            return np.stack([p[:, 0], size - 1 - p[:, 1]], 1)  # image y down

        lm_px = to_px(lm)
        masks = {}

        def paint(draw):
            canvas = np.zeros((size, size), np.float32)
            draw(canvas)
            return cv2.GaussianBlur(canvas, (0, 0), 2.0)

        def poly(idx):
            return lm_px[list(idx)].round().astype(np.int32)

        masks["brow"] = paint(lambda c: [cv2.polylines(c, [poly(r)], False, 1.0, 9)
                                         for r in (range(17, 22), range(22, 27))])
        masks["eye"] = paint(lambda c: [cv2.fillPoly(c, [poly(r)], 1.0)
                                        for r in (range(36, 42), range(42, 48))])

        def iris(c):
            for r in (range(36, 42), range(42, 48)):
                p = lm_px[list(r)]
                centre = p.mean(0)
                radius = 0.42 * np.ptp(p[:, 1]) + 2
                cv2.circle(c, tuple(int(v) for v in centre.round()), int(radius), 1.0, -1)
        masks["iris"] = paint(iris) * masks["eye"]
        masks["lips"] = paint(lambda c: (cv2.fillPoly(c, [poly(range(48, 60))], 1.0),
                                         cv2.fillPoly(c, [poly(range(60, 68))], 0.0)))
        masks["mouth"] = paint(lambda c: cv2.fillPoly(c, [poly(range(60, 68))], 1.0))
        vpx = to_px(mean)
        xi = np.clip(vpx[:, 0].round().astype(int), 0, size - 1)
        yi = np.clip(vpx[:, 1].round().astype(int), 0, size - 1)
        return {k: m[yi, xi].astype(np.float32) for k, m in masks.items()}

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def _parameters(self, rng):
        bfm = self.bfm
        n_s, n_e = bfm.shape_basis.shape[2], bfm.expression_basis.shape[2]
        if bfm.shape_std is not None:
            shape = bfm.shape_mean + bfm.shape_std * np.clip(rng.standard_normal(n_s), -2.5, 2.5)
            expression = bfm.expression_mean + bfm.expression_std * np.clip(
                rng.standard_normal(n_e), -2.5, 2.5)
        else:
            shape = np.zeros(n_s)
            expression = np.zeros(n_e)
        if rng.random() < 0.6:
            yaw = rng.uniform(-min(45.0, self.max_yaw), min(45.0, self.max_yaw))
        else:
            yaw = rng.uniform(-self.max_yaw, self.max_yaw)
        pitch = np.clip(rng.normal(0, 12), -35, 35)
        roll = np.clip(rng.normal(0, 10), -30, 30)
        return shape, expression, np.deg2rad([pitch, yaw, roll])

    def _background(self, rng) -> np.ndarray:
        s = self.size
        if not self.backgrounds or rng.random() < 0.2:
            noise = rng.random((8, 8, 3)).astype(np.float32)
            return cv2.resize(noise, (s, s), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        img = self.backgrounds[rng.integers(len(self.backgrounds))]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.25, 1.0) * min(h, w))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = img[y0:y0 + side, x0:x0 + side]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        patch = cv2.resize(np.ascontiguousarray(patch), (s, s), interpolation=cv2.INTER_AREA)
        return patch.astype(np.float32) / 255

    def __getitem__(self, index: int) -> FaceSample:
        rng = self._rng(index)
        bfm = self.bfm
        shape, expression, angles = self._parameters(rng)
        rot = rotation_matrix(*angles)
        model = bfm.vertices(shape, expression) @ rot.T          # posed, y up
        image_frame = model * np.array([1.0, -1.0, 1.0])          # x right, y down
        lm2d = image_frame[bfm.landmarks, :2]
        m = landmarks_crop_matrix(lm2d, self.size)
        jitter = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-12, 12, size=2)
        c = (self.size - 1) / 2.0
        m[:, :2] *= jitter
        m[:, 2] = (m[:, 2] - c) * jitter + c + shift
        scale = np.sqrt(abs(np.linalg.det(m[:, :2])))
        crop = np.empty_like(image_frame)
        crop[:, :2] = image_frame[:, :2] @ m[:, :2].T + m[:, 2]
        crop[:, 2] = image_frame[:, 2] * scale
        crop = crop.astype(np.float32)

        image = self._background(rng)
        self._draw_head(image, crop, rng)
        rgb = self._shade(model, rng)
        zbuf = np.full((self.size, self.size), -np.inf, np.float32)
        _rasterize(crop, self.triangles64, rgb, zbuf, image)
        image = self._degrade(image, rng)
        runs = column_runs(crop, bfm.triangles, rotation=crop_rotation(*angles),
                           size=self.size, depth=self.depth, thickness=self.thickness)
        return FaceSample(image=image, runs=runs, landmarks=crop[bfm.landmarks],
                          vertices=crop)

    def _shade(self, model: np.ndarray, rng) -> np.ndarray:
        regions = self._regions
        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.85, 1.15, 3)
        hair = HAIR_TONES[rng.integers(len(HAIR_TONES))]
        v = self.bfm.mean
        span = np.ptp(v[:, 0])
        albedo = np.tile(skin, (len(v), 1)).astype(np.float32)
        for _ in range(3):  # low-frequency blotches (redness, shadowing)
            centre = v[rng.integers(len(v))]
            r2 = ((v - centre) ** 2).sum(1) / (rng.uniform(0.1, 0.35) * span) ** 2
            albedo *= (1 + rng.uniform(-0.12, 0.12, 3) * np.exp(-r2)[:, None]).astype(np.float32)
        lips = np.clip(skin * np.array([1.0, 0.65, 0.65]) * rng.uniform(0.7, 1.0), 0, 1)
        eye_white = np.array([0.85, 0.82, 0.78]) * rng.uniform(0.6, 1.0)
        iris = HAIR_TONES[rng.integers(len(HAIR_TONES))] * rng.uniform(0.5, 1.5)
        for key, colour in (("brow", hair), ("lips", lips), ("eye", eye_white),
                            ("iris", iris), ("mouth", np.array([0.15, 0.05, 0.05]))):
            w = regions[key][:, None] * rng.uniform(0.7, 1.0)
            albedo = albedo * (1 - w) + np.asarray(colour, np.float32) * w

        normals = vertex_normals(model.astype(np.float32), self.bfm.triangles)
        light = rng.normal(size=3)
        light[2] = abs(light[2]) + 0.6
        light /= np.linalg.norm(light)
        lambert = np.clip(normals @ light, 0, None)
        ambient = rng.uniform(0.2, 0.6)
        half = light + np.array([0.0, 0.0, 1.0])
        half /= np.linalg.norm(half)
        specular = rng.uniform(0, 0.25) * np.clip(normals @ half, 0, None) ** rng.uniform(8, 30)
        tint = rng.uniform(0.85, 1.15, 3)
        intensity = rng.uniform(0.8, 1.3)
        rgb = albedo * (ambient + (1 - ambient) * lambert)[:, None] * intensity * tint
        rgb = rgb + specular[:, None]
        return np.ascontiguousarray(np.clip(rgb, 0, 1), dtype=np.float32)

    def _draw_head(self, image: np.ndarray, crop: np.ndarray, rng) -> None:
        """A rough head (hair) ellipse and neck behind the face, drawn into ``image``."""
        lo, hi = crop[:, :2].min(0), crop[:, :2].max(0)
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        if rng.random() < 0.8:
            colour = HAIR_TONES[rng.integers(len(HAIR_TONES))] * rng.uniform(0.7, 1.3)
            axes = half * rng.uniform(1.05, 1.3, 2)
            offset = np.array([0, -rng.uniform(0.1, 0.35) * half[1]])
            cv2.ellipse(image, tuple(int(v) for v in (centre + offset).round()),
                        tuple(int(v) for v in axes.round()), 0, 0, 360,
                        tuple(float(x) for x in np.clip(colour, 0, 1)), -1)
        if rng.random() < 0.7:
            colour = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.5, 0.9)
            x0 = int(centre[0] - rng.uniform(0.4, 0.7) * half[0])
            x1 = int(centre[0] + rng.uniform(0.4, 0.7) * half[0])
            cv2.rectangle(image, (x0, int(centre[1])), (x1, self.size),
                          tuple(float(x) for x in np.clip(colour, 0, 1)), -1)

    def _degrade(self, image: np.ndarray, rng) -> np.ndarray:
        sigma = rng.uniform(0.0, 1.2)
        if sigma > 0.3:
            image = cv2.GaussianBlur(image, (0, 0), sigma)
        image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
        image = image + rng.normal(0, rng.uniform(0, 0.03), image.shape).astype(np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_cache(faces: SyntheticFaces, folder: str | os.PathLike, *, start: int, count: int,
                shard_size: int = 100, progress: bool = True) -> list[Path]:
    """Render samples ``start .. start + count - 1`` into ``folder`` as ``.npz`` shards
    ``faces-<first index>.npz`` (``images`` ``(N, S, S, 3)`` uint8, ``runs`` ``(N, K, 2, S, S)``
    uint8, ``landmarks`` ``(N, 68, 3)`` float32, ``indices`` ``(N,)`` int64), each written
    atomically; shards already present are kept (so an interrupted run resumes)."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    firsts = range(start, start + count, shard_size)
    for first in tqdm(firsts, desc="synthetic faces", unit="shard", disable=not progress):
        path = folder / f"faces-{first:08d}.npz"
        if not path.exists():
            idx = range(first, min(first + shard_size, start + count))
            samples = [faces[i] for i in idx]
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=np.stack([s.image for s in samples]),
                             runs=np.stack([s.runs for s in samples]),
                             landmarks=np.stack([s.landmarks for s in samples]),
                             indices=np.asarray(list(idx), np.int64))
        written.append(path)
    return written


class CachedFaces:
    """Samples from the ``.npz`` shards of a cache folder: ``(image, runs, landmarks)``.

    ``images`` ``(N, S, S, 3)`` uint8, ``runs`` ``(N, K, 2, S, S)`` uint8 and
    ``landmarks`` ``(N, 68, 3)`` float32 crop pixels are held in memory (about 330 KB per
    sample with ``K = 3``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._loaded: list[Path] = []
        self.images = np.zeros((0, 1, 1, 3), np.uint8)
        self.runs = np.zeros((0, 1, 2, 1, 1), np.uint8)
        self.landmarks = np.zeros((0, 68, 3), np.float32)
        self.refresh()
        if not self._loaded:
            raise FileNotFoundError(f"{self.folder}: no faces-*.npz shards")

    def refresh(self) -> int:
        """Load shards written since the last call (a cache still being rendered grows);
        returns the number of samples."""
        new = [p for p in sorted(self.folder.glob("faces-*.npz")) if p not in self._loaded]
        images, runs, landmarks = [], [], []
        for p in new:
            try:
                with np.load(p, allow_pickle=False) as z:
                    images.append(z["images"])
                    if "runs" not in z.files or z["runs"].ndim != 5:
                        raise VRNError(f"{p}: a shard of an earlier cache format (no (N, K, 2, "
                                       "S, S) 'runs'); render the cache again into a new "
                                       "folder")
                    runs.append(z["runs"])
                    landmarks.append(z["landmarks"].astype(np.float32))
            except ValueError as exc:  # an object array (never unpickled), a bad header
                reason = " ".join(str(exc).split())
                if "allow_pickle" in reason:
                    reason = "holds an object array (pickles are not loaded)"
                raise VRNError(f"{p}: not a faces shard ({reason})") from None
        if new:
            old = bool(self._loaded)
            self.images = np.concatenate(([self.images] if old else []) + images)
            self.runs = np.concatenate(([self.runs] if old else []) + runs)
            self.landmarks = np.concatenate(([self.landmarks] if old else []) + landmarks)
            self._loaded += new
        return len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.images[index], self.runs[index], self.landmarks[index]
