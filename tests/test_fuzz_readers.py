"""Seeded, bounded fuzzing of the readers of user files: a mutated Torch7 file,
safetensors checkpoint, ONNX file, ``.mat`` annotation or image is either read or
refused with our one error type, never any other exception."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch7_writer as t7w
from fake_bfm import write_aflw_sample

from vrn.errors import VRNError

CASES = 40


def _mutants(data: bytes, seed: int, count: int = CASES):
    """``count`` seeded corruptions of ``data``: flipped bytes, truncations, spliced
    garbage and repeated runs."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:
            for i in rng.integers(0, len(b), size=int(rng.integers(1, 9))):
                b[i] ^= int(rng.integers(1, 256))
        elif kind == 1:
            b = b[:int(rng.integers(0, len(b)))]
        elif kind == 2:
            at = int(rng.integers(0, len(b)))
            b[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:
            at, n = int(rng.integers(0, len(b))), int(rng.integers(1, 32))
            b[at:at] = b[at:at + n] * int(rng.integers(2, 50))
        yield bytes(b)


def _check_each(tmp_path, original: bytes, name: str, read, allowed=(VRNError,), seed=0):
    path = tmp_path / name
    for k, data in enumerate(_mutants(original, seed)):
        path.write_bytes(data)
        try:
            read(path)
        except allowed:
            pass
        except Exception as exc:  # the failure names the case for reproduction
            raise AssertionError(f"mutant {k} (seed {seed}) of {name} raised "
                                 f"{type(exc).__name__}: {exc}") from exc


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_fuzz_torch7(tmp_path):
    from test_torch7 import SMALL

    from vrn.model.torch7 import load_torch7

    root, _ = t7w.vrn_t7(SMALL, seed=3)
    original = t7w.save_t7(tmp_path / "model.t7", root).read_bytes()
    _check_each(tmp_path, original, "fuzz.t7",
                lambda p: load_torch7(p, bn_mode="running", config=SMALL), seed=1)


def test_fuzz_safetensors_checkpoint(tmp_path, small_checkpoint):
    from vrn.model import load_checkpoint

    original = small_checkpoint.read_bytes()
    _check_each(tmp_path, original, "fuzz.safetensors", load_checkpoint, seed=2)


def test_fuzz_safetensors_metadata_values(tmp_path, small_checkpoint):
    """Every metadata field replaced by hostile values: read, or one WeightsError."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vrn.model import load_checkpoint

    with safe_open(str(small_checkpoint), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    hostile = ["", "nan", "-inf", "1e308", "-1", "0", "null", "[]", "{}", "true", "\x00",
               "9" * 400, json.dumps({"features": -4}), "{not json"]
    rng = np.random.default_rng(3)
    path = tmp_path / "meta.safetensors"
    for key in list(meta) + [f"config.{k}" for k in config]:
        for value in rng.choice(hostile, size=4, replace=False):
            edited = dict(meta)
            if key.startswith("config."):
                field = key.split(".", 1)[1]
                try:
                    edited["config"] = json.dumps({**config, field: json.loads(value)})
                except ValueError:
                    edited["config"] = json.dumps({**config, field: value})
            else:
                edited[key] = str(value)
            save_file(tensors, str(path), metadata=edited)
            try:
                load_checkpoint(path)
            except VRNError:
                pass


def test_fuzz_onnx(tmp_path, small_checkpoint):
    import onnxruntime as ort

    from vrn.export.onnx_export import export_onnx, onnx_metadata
    from vrn.model import load_checkpoint

    source = tmp_path / "model.onnx"
    export_onnx(load_checkpoint(small_checkpoint), source, max_batch=1)
    original = source.read_bytes()

    def read(path):
        onnx_metadata(path)
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception:  # ONNX Runtime's own refusal: wrapped by our backends
            pass

    _check_each(tmp_path, original, "fuzz.onnx", read, allowed=(ValueError,), seed=4)


def test_fuzz_mat(tmp_path):
    from vrn.data.aflw import read_fit

    write_aflw_sample(tmp_path, "image00001")
    original = (tmp_path / "image00001.mat").read_bytes()
    _check_each(tmp_path, original, "fuzz.mat", read_fit, seed=5)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_fuzz_images(tmp_path, suffix):
    import cv2

    from vrn.runtime import load_image, sample_image_path

    photo = cv2.imread(str(sample_image_path()))
    ok, data = cv2.imencode(suffix, cv2.resize(photo, (96, 96)))
    assert ok
    original = data.tobytes()
    if suffix == ".png":  # also a header that lies about the size
        lying = bytearray(original)
        lying[16:24] = struct.pack(">II", 60000, 60000)
        (tmp_path / "lying.png").write_bytes(bytes(lying))
        with pytest.raises(VRNError):
            load_image(tmp_path / "lying.png")
    _check_each(tmp_path, original, "fuzz" + suffix, load_image, seed=6)
