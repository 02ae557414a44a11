"""The engine sidecar reader (vrn/export/engine_file.py): every field validated, a bad
sidecar is an EngineError naming the file and the field in one line, and a seeded fuzz
of random values, truncated JSON and stray bytes never gets any other exception."""

from __future__ import annotations

import copy
import json
import random

import pytest

from vrn.errors import EngineError
from vrn.export.engine_file import (EngineMetadata, check_engine, read_metadata, sidecar_path,
                                    write_engine)

SHA = "ab" * 32


def valid_sidecar() -> dict:
    meta = EngineMetadata(
        tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7",
        onnx_file="vrn.fp16.onnx", onnx_sha256=SHA, engine_sha256=SHA, engine_bytes=1152,
        precision="fp16",
        inputs=[{"name": "image", "shape": [-1, 3, 192, 192], "dtype": "float32"}],
        outputs=[{"name": "volume", "shape": [-1, 200, 192, 192], "dtype": "float32"}],
        batch={"min": 1, "opt": 2, "max": 4}, layer_precisions={"fp16": 40, "fp32": 3},
        model_info={"architecture": "VRN", "config": "{}"}, build_seconds=12.5,
        built_at="2026-01-01T00:00:00+00:00")
    return json.loads(meta.to_json())


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "vrn.fp16.engine"
    path.write_bytes(b"engine")
    return path


def write_sidecar(engine, data) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    sidecar_path(engine).write_bytes(raw)


def read(engine):
    """``read_metadata``, checking that an error is a one-line EngineError naming the
    sidecar."""
    try:
        return read_metadata(engine)
    except EngineError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert message.startswith(f"{sidecar_path(engine)}: unreadable engine metadata: ")
        assert message.endswith("; rebuild the engine with `vrn-export --from-onnx "
                                "<model.onnx>`")
        assert len(message) < 400, message
        raise


def test_valid_sidecar_round_trips(engine):
    data = valid_sidecar()
    write_sidecar(engine, data)
    meta = read(engine)
    assert json.loads(meta.to_json()) == data


def test_written_sidecar_reads_back(tmp_path):
    data = valid_sidecar()
    meta = EngineMetadata(**{k: v for k, v in data.items()})
    path = write_engine(tmp_path / "x.engine", b"serialized" * 10, meta)
    assert read_metadata(path).engine_bytes == 100


def test_batch_null(engine):
    """The measured failure: ``"batch": null`` was a TypeError traceback."""
    write_sidecar(engine, {**valid_sidecar(), "batch": None})
    with pytest.raises(EngineError, match=r"field 'batch' must be an object \{min, opt, max\}"
                       r" of integers in \[1, 65536\], got null"):
        read(engine)
    # check_engine stops there too, before comparing anything.
    with pytest.raises(EngineError, match="'batch'"):
        check_engine(engine, tensorrt_version="10.3.0")


BAD_FIELDS = [
    ("batch", {"min": 1, "opt": 2}, "'batch'"),
    ("batch", {"min": 0, "opt": 1, "max": 1}, "'batch.min' must be an integer in"),
    ("batch", {"min": 1, "opt": 1, "max": -4}, "'batch.max'"),
    ("batch", {"min": 1, "opt": 1, "max": 10 ** 30}, "'batch.max'"),
    ("batch", {"min": 1, "opt": 1.5, "max": 2}, "'batch.opt'"),
    ("batch", {"min": True, "opt": 1, "max": 2}, "'batch.min'"),
    ("batch", {"min": 3, "opt": 2, "max": 4}, "min <= opt <= max"),
    ("batch", {"min": 1, "opt": 1, "max": 1, "extra": 1}, "'batch'"),
    ("engine_bytes", -1, "'engine_bytes'"),
    ("engine_bytes", "1152", "'engine_bytes'"),
    ("engine_bytes", 2 ** 64, "'engine_bytes'"),
    ("engine_sha256", "XYZ", "'engine_sha256'"),
    ("onnx_sha256", None, "'onnx_sha256'"),
    ("onnx_file", "/etc/passwd", "'onnx_file'"),
    ("onnx_file", "", "'onnx_file'"),
    ("onnx_file", "a\u0000b", "'onnx_file'"),
    ("compute_capability", 8.7, "'compute_capability'"),
    ("compute_capability", "eight", "'compute_capability'"),
    ("precision", "int4", "'precision'"),
    ("precision", ["fp16"], "'precision'"),
    ("tensorrt_version", None, "'tensorrt_version'"),
    ("gpu_name", {"a": 1}, "'gpu_name'"),
    ("inputs", None, "'inputs'"),
    ("inputs", [{"name": "x"}], "'inputs[0]'"),
    ("inputs", [{"name": "x", "shape": [1, "3"], "dtype": "float32"}], "'inputs[0].shape'"),
    ("outputs", [{"name": "", "shape": [1], "dtype": "float32"}], "'outputs[0].name'"),
    ("outputs", [{"name": "y", "shape": [-2], "dtype": "float32"}], "'outputs[0].shape'"),
    ("layer_precisions", {"fp16": -1}, "'layer_precisions[\"fp16\"]'"),
    ("layer_precisions", [], "'layer_precisions'"),
    ("model_info", {"architecture": 3}, "'model_info[\"architecture\"]'"),
    ("build_seconds", float("nan"), "'build_seconds'"),
    ("build_seconds", -1, "'build_seconds'"),
    ("build_seconds", "12", "'build_seconds'"),
    ("built_at", 2026, "'built_at'"),
]


@pytest.mark.parametrize("name, value, pattern", BAD_FIELDS)
def test_bad_field(engine, name, value, pattern):
    write_sidecar(engine, {**valid_sidecar(), name: value})
    with pytest.raises(EngineError, match=pattern.replace("[", r"\[").replace("]", r"\]")):
        read(engine)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("engine_bytes"), "'engine_bytes' is missing"),
    (lambda d: d.update(surprise=1), "unknown field \"surprise\""),
    (lambda d: d.update(format="vrn-engine/0"), "not a vrn-engine/1 sidecar"),
    (lambda d: d.pop("format"), "not a vrn-engine/1 sidecar"),
])
def test_missing_unknown_and_format(engine, edit, pattern):
    data = valid_sidecar()
    edit(data)
    write_sidecar(engine, data)
    with pytest.raises(EngineError, match=pattern):
        read(engine)


@pytest.mark.parametrize("raw, pattern", [
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "a JSON object expected"),
    (b"null", "a JSON object expected"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"batch": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b" " * (2 << 20), "over the 1048576-byte limit"),
])
def test_unreadable_sidecar(engine, raw, pattern):
    write_sidecar(engine, raw)
    with pytest.raises(EngineError, match=pattern):
        read(engine)


# --- fuzz ---------------------------------------------------------------------------------

def random_value(rng: random.Random, depth: int = 0):
    """A random JSON value: the awkward ones (null, booleans, strings, negative and
    huge numbers, NaN, lists, nested objects) more often than not."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, 2, -1, -(2 ** 31), 2 ** 31, 2 ** 63, 10 ** 40, 65536, 65537])
    if kind == 3:
        return rng.randint(-10, 10 ** rng.randrange(1, 20))
    if kind == 4:
        return rng.choice([0.0, -0.5, 1.5, 1e308, float("nan"), float("inf"), -float("inf")])
    if kind == 5:
        return rng.choice(["", "8.7", "fp16", "fp32", "float32", SHA, "a\u0000b", "/abs",
                           "\u00e9\u4e2d\ud83d", "x" * 5000, "1"])
    if kind == 6:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(8)))
    if kind == 7:
        return rng.randrange(-3, 5)
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["min", "opt", "max", "name", "shape", "dtype", "", "x"]):
            random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def near_valid(rng: random.Random, name: str, value):
    """A variation of a valid field's value: one of its parts replaced."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and value:
        value[rng.choice(list(value))] = random_value(rng)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        part = rng.choice(["name", "shape", "dtype"])
        value[0][part] = ([random_value(rng), 3] if part == "shape" and rng.random() < 0.5
                          else random_value(rng))
    else:
        value = random_value(rng)
    return value


def fuzz_cases(seed: int, count: int):
    rng = random.Random(seed)
    base = valid_sidecar()
    for _ in range(count):
        data = copy.deepcopy(base)
        for name in rng.sample(sorted(base), rng.randrange(1, 4)):
            data[name] = (near_valid(rng, name, base[name]) if rng.random() < 0.5
                          else random_value(rng))
        if rng.random() < 0.05:
            data.pop(rng.choice(sorted(data)))
        raw = json.dumps(data).encode()
        mode = rng.random()
        if mode < 0.1:  # truncated JSON
            raw = raw[:rng.randrange(len(raw))]
        elif mode < 0.15:  # stray non-UTF-8 bytes
            at = rng.randrange(len(raw))
            raw = raw[:at] + bytes([rng.randrange(0x80, 0x100)]) + raw[at:]
        elif mode < 0.2:  # one byte changed
            at = rng.randrange(len(raw))
            raw = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:]
        yield raw


def test_fuzz_sidecar_reader(engine):
    valid = invalid = 0
    for raw in fuzz_cases(seed=12, count=1500):
        write_sidecar(engine, raw)
        try:
            meta = read(engine)
        except EngineError:
            invalid += 1
            continue
        valid += 1
        # What the rest of the code relies on holds for every accepted sidecar.
        assert type(meta.engine_bytes) is int and meta.engine_bytes >= 1
        assert all(type(meta.batch[k]) is int and meta.batch[k] >= 1
                   for k in ("min", "opt", "max"))
        assert meta.precision in ("fp16", "fp32")
        assert isinstance(meta.onnx_file, str) and meta.onnx_file
    assert invalid > 1000 and valid > 0  # both outcomes were exercised
