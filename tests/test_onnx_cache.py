"""The ONNX cache's checksums (vrn/runtime/backends/onnx_cache.py): a cached file that
was flipped, truncated or replaced, a cache index that is corrupt or missing, and a
file that matches its checksum but does not load are each exported again, reported in
one line on stderr, and work; a clean cache is reused without an export. For the
volume graph, its fp16 conversion and the landmark regressor."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import vrn.export.onnx_export as onnx_export  # noqa: E402
from vrn.runtime.backends import create_backend, onnx_cache  # noqa: E402

INDEX = "onnx-index.json"


@pytest.fixture(scope="module")
def pristine(small_checkpoint, tmp_path_factory):
    """A cache with the small model exported once (for real), and its backend."""
    cache = tmp_path_factory.mktemp("pristine")
    backend = create_backend("onnxruntime", small_checkpoint, device="cpu", cache_dir=cache)
    return cache, backend


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(0).random((2, 3, 192, 192), dtype=np.float32)


@pytest.fixture
def cache(pristine, tmp_path, monkeypatch):
    """A copy of the pristine cache, made the default cache folder by $VRN_CACHE_DIR."""
    folder = tmp_path / "cache"
    shutil.copytree(pristine[0], folder)
    monkeypatch.setenv("VRN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def exports(pristine, monkeypatch):
    """Counts volume-graph exports; each one copies the pristine file (a real export
    takes seconds; one test below does it for real)."""
    calls = []

    def fake_export(model, path, **kwargs):
        calls.append(Path(path))
        shutil.copyfile(pristine[1].path, path)

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    return calls


def cached_path(cache: Path, pristine) -> Path:
    return cache / "onnx" / pristine[1].path.name


def open_backend(weights):
    return create_backend("onnxruntime", weights, device="cpu")  # cache from $VRN_CACHE_DIR


def assert_works(backend, pristine, crops):
    np.testing.assert_array_equal(backend.infer(crops), pristine[1].infer(crops))


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def read_index(cache: Path) -> dict:
    return json.loads((cache / INDEX).read_text())


def test_index_format(pristine):
    cache, backend = pristine
    index = read_index(cache)
    assert index["format"] == "vrn-onnx-cache/1"
    entry = index["files"][backend.path.name]
    assert entry["bytes"] == backend.path.stat().st_size
    assert entry["sha256"] == onnx_cache._entry(backend.path)["sha256"]
    assert sorted(p.name for p in cache.iterdir()) == ["onnx", INDEX]  # no temporary files


def test_clean_cache_is_reused(small_checkpoint, pristine, cache, exports, crops, capsys):
    path = cached_path(cache, pristine)
    stamp = path.stat().st_mtime_ns
    backend = open_backend(small_checkpoint)
    assert backend.path == path and path.stat().st_mtime_ns == stamp
    assert exports == [] and capsys.readouterr().err == ""
    assert_works(backend, pristine, crops)


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]


CORRUPTIONS = {
    "flipped bytes": _flip,
    "truncated": lambda data: data[:len(data) // 2],
    "garbage": lambda data: np.random.default_rng(1).bytes(len(data)),
    "empty": lambda data: b"",
    "one flipped bit": lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_is_reexported(small_checkpoint, pristine, cache, exports, crops,
                                    capsys, corrupt):
    path = cached_path(cache, pristine)
    path.write_bytes(corrupt(path.read_bytes()))
    backend = open_backend(small_checkpoint)
    assert len(exports) == 1 and backend.path == path
    assert one_line(capsys) == (f"vrn: cached ONNX file {path} is corrupt (checksum "
                                "mismatch); re-exported")
    assert_works(backend, pristine, crops)
    assert path.read_bytes() == pristine[1].path.read_bytes()
    # Reported once: the next backend reuses the new file.
    open_backend(small_checkpoint)
    assert len(exports) == 1 and capsys.readouterr().err == ""
    assert sorted(p.name for p in (cache / "onnx").iterdir()) == [path.name]


INDEX_CORRUPTIONS = {
    "garbage": (lambda text: "\x00\xff garbage", "unreadable"),
    "truncated": (lambda text: text[:len(text) // 2], "unreadable"),
    "not UTF-8": (lambda text: b"\xff\xfe{}".decode("latin-1"), "unreadable"),
    "files null": (lambda text: json.dumps({"format": "vrn-onnx-cache/1", "files": None}),
                   "unreadable"),
    "other format": (lambda text: json.dumps({"format": "x", "files": {}}), "unreadable"),
    "list": (lambda text: "[]", "unreadable"),
    "entry removed": (lambda text: json.dumps({"format": "vrn-onnx-cache/1", "files": {}}),
                      "no checksum"),
    "entry not an object": (lambda text: _edit_entries(text, lambda e: [e]), "no checksum"),
    "entry's checksum null": (lambda text: _edit_entries(text, lambda e: {**e, "sha256": None}),
                              "no checksum"),
    "checksum changed": (lambda text: _edit_entries(text, lambda e: {**e, "sha256": "0" * 64}),
                         "checksum mismatch"),
    "size changed": (lambda text: _edit_entries(text, lambda e: {**e, "bytes": e["bytes"] + 1}),
                     "checksum mismatch"),
}


def _edit_entries(text: str, edit) -> str:
    data = json.loads(text)
    data["files"] = {name: edit(entry) for name, entry in data["files"].items()}
    return json.dumps(data)


@pytest.mark.parametrize("corrupt, reason", INDEX_CORRUPTIONS.values(),
                         ids=INDEX_CORRUPTIONS.keys())
def test_corrupt_index_means_reexport(small_checkpoint, pristine, cache, exports, crops,
                                      capsys, corrupt, reason):
    index = cache / INDEX
    index.write_bytes(corrupt(index.read_text()).encode("latin-1"))
    path = cached_path(cache, pristine)
    backend = open_backend(small_checkpoint)
    assert len(exports) == 1
    line = one_line(capsys)
    assert line.startswith(f"vrn: cached ONNX file {path} ") and reason in line
    assert line.endswith("; re-exported")
    assert_works(backend, pristine, crops)
    assert read_index(cache)["files"][path.name] == onnx_cache._entry(path)
    open_backend(small_checkpoint)
    assert len(exports) == 1 and capsys.readouterr().err == ""


def test_missing_index_means_reexport(small_checkpoint, pristine, cache, exports, capsys):
    (cache / INDEX).unlink()
    open_backend(small_checkpoint)
    assert len(exports) == 1
    assert "no checksum in the cache index onnx-index.json" in one_line(capsys)


def _record(path: Path) -> None:
    """Make the index agree with whatever ``path`` now holds."""
    onnx_cache._update_index(path, onnx_cache._entry(path))


def _garbage(path):
    path.write_bytes(b"\x08\x07 not a protobuf " * 50)


def _unknown_operator(path):
    import onnx

    proto = onnx.load(str(path))
    proto.graph.node[0].op_type = "NoSuchOperator"
    onnx.save_model(proto, str(path))


@pytest.mark.parametrize("damage,reason", [
    (_garbage, "onnx cannot parse it"),              # passes its checksum, is not ONNX
    (_unknown_operator, "ONNX Runtime cannot load it"),  # well-formed, unknown operator
])
def test_a_file_matching_its_checksum_that_does_not_load(small_checkpoint, pristine, cache,
                                                         exports, crops, capsys, damage,
                                                         reason):
    path = cached_path(cache, pristine)
    damage(path)
    _record(path)
    backend = open_backend(small_checkpoint)
    assert len(exports) == 1
    assert one_line(capsys) == f"vrn: cached ONNX file {path} is corrupt ({reason}); re-exported"
    assert_works(backend, pristine, crops)


def test_a_real_reexport(small_checkpoint, pristine, cache, crops, capsys):
    """Without the stand-in exporter: the weights are exported again for real."""
    path = cached_path(cache, pristine)
    path.write_bytes(_flip(path.read_bytes()))
    backend = open_backend(small_checkpoint)
    assert "is corrupt (checksum mismatch); re-exported" in one_line(capsys)
    np.testing.assert_allclose(backend.infer(crops), pristine[1].infer(crops), atol=1e-5)
    assert onnx_cache.check(path) is None


def test_changed_graph_source_is_exported_again(small_checkpoint, pristine, cache, exports,
                                                monkeypatch):
    """The cache key covers the code that builds the graph: the same weights under
    changed model code are a new file, not the old graph."""
    import vrn.runtime.backends.onnxruntime_backend as ort_backend
    from vrn.model import load_model

    model = load_model(small_checkpoint)
    assert ort_backend.cached_onnx(model) == cached_path(cache, pristine) and exports == []
    monkeypatch.setattr(ort_backend, "_graph_source_digest", lambda: "changed model code")
    again = ort_backend.cached_onnx(model)
    assert again != cached_path(cache, pristine) and again.is_file() and len(exports) == 1


def test_fp16_variant(small_checkpoint, cache, capsys, monkeypatch):
    """The fp16 conversion has its own entry: corrupting it converts again, only it."""
    import vrn.export.fp16 as fp16
    from vrn.model import load_model
    from vrn.runtime.backends.onnxruntime_backend import cached_onnx

    model = load_model(small_checkpoint)
    half = cached_onnx(model, fp16=True)  # converted now: the pristine cache has no fp16
    assert half.name.endswith("-fp16.onnx") and onnx_cache.check(half) is None
    assert capsys.readouterr().err == ""
    calls = []
    real = fp16.export_fp16
    monkeypatch.setattr(fp16, "export_fp16", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(onnx_export, "export_onnx",
                        lambda *a, **k: pytest.fail("the fp32 file was fine"))
    assert cached_onnx(model, fp16=True) == half and calls == []
    half.write_bytes(half.read_bytes()[:-10])
    assert cached_onnx(model, fp16=True) == half and len(calls) == 1
    assert one_line(capsys) == (f"vrn: cached ONNX file {half} is corrupt (checksum "
                                "mismatch); re-exported")
    assert onnx_cache.check(half) is None


def test_landmark_cache(tmp_path, monkeypatch, capsys, sample_image):
    """The landmark stage's ONNX file: same checks, same message."""
    from vrn.runtime.detect import FaceBox
    from vrn.runtime.landmarks import LandmarkStage

    monkeypatch.setenv("VRN_CACHE_DIR", str(tmp_path))
    first = LandmarkStage("onnxruntime")
    path = first._run.path
    assert path.parent == tmp_path / "onnx" and onnx_cache.check(path) is None
    box = [FaceBox(177, 66, 95, 95)]  # the face in the sample photo
    want = first(sample_image, box)
    stamp = path.stat().st_mtime_ns
    LandmarkStage("onnxruntime")
    assert path.stat().st_mtime_ns == stamp and capsys.readouterr().err == ""

    path.write_bytes(_flip(path.read_bytes()))
    again = LandmarkStage("onnxruntime")
    assert again._run.path == path
    assert one_line(capsys) == (f"vrn: cached ONNX file {path} is corrupt (checksum "
                                "mismatch); re-exported")
    np.testing.assert_allclose(again(sample_image, box), want, atol=1e-3)

    path.write_bytes(b"not onnx at all")  # and the index agrees: ONNX Runtime refuses it
    _record(path)
    LandmarkStage("onnxruntime")
    assert one_line(capsys) == (f"vrn: cached ONNX file {path} is corrupt (ONNX Runtime "
                                "cannot load it); re-exported")
    assert onnx_cache.check(path) is None


def test_concurrent_index_updates(tmp_path):
    """Index updates from many writers at once: every entry kept, always valid JSON."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    errors = []

    def writer(k):
        try:
            for i in range(15):
                path = folder / f"f{k}-{i}.onnx"
                path.write_bytes(f"{k} {i}".encode())
                onnx_cache._update_index(path, onnx_cache._entry(path))
                json.loads((tmp_path / INDEX).read_text())
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = read_index(tmp_path)["files"]
    assert len(files) == 90
    assert all(onnx_cache.check(folder / name) is None for name in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", INDEX]
