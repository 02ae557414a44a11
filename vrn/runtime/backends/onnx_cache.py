"""Checksums of the cached ONNX exports, so a corrupt cache file costs a re-export and
one line on stderr instead of breaking every later run.

The cached files live in ``<cache>/onnx/`` (the volume graph, its fp16 conversion, the
landmark regressor). Their index is ``<cache>/onnx-index.json``, beside that folder::

    {"format": "vrn-onnx-cache/1",
     "files": {"vrn-0123456789abcdef0123.onnx": {"sha256": "<64 hex>", "bytes": 123456}}}

keyed by file name. :func:`cached_file` checks a file against its entry before it is
used; a file without an entry (or with an unreadable index) or whose size or SHA-256
differs is exported again. :func:`open_cached` also re-exports a file that ONNX Runtime
refuses to load (:class:`~vrn.errors.UnreadableOnnxError`). Either way one line goes to stderr::

    vrn: cached ONNX file <path> is corrupt (checksum mismatch); re-exported

Concurrent processes: every file, the index included, is written atomically
(:mod:`vrn.atomic`), the new entry is recorded before the new file is renamed into
place, and index updates are read-modify-write under an advisory lock on the folder
(where ``fcntl`` exists; elsewhere the last writer wins, and a lost entry only costs a
re-export).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable, Iterator

from ...atomic import atomic_path, write_text_atomic
from ...errors import UnreadableOnnxError

INDEX_FORMAT = "vrn-onnx-cache/1"
INDEX_SUFFIX = "-index.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


def index_path(path: str | os.PathLike) -> Path:
    """The index of the cache folder holding ``path``: ``<folder>-index.json`` beside
    the folder (``<cache>/onnx-index.json`` for ``<cache>/onnx/<file>``)."""
    folder = Path(path).parent
    return folder.with_name(folder.name + INDEX_SUFFIX)


def _read_index(index: Path) -> tuple[dict, bool]:
    """``(entries, readable)``: the valid entries of ``index`` (none when it is missing
    or unreadable) and whether it could be read."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError, RecursionError):
        return {}, False
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT \
            or not isinstance(data.get("files"), dict):
        return {}, False
    entries = {}
    for name, entry in data["files"].items():
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) \
                and _SHA256.fullmatch(entry["sha256"]) \
                and type(entry.get("bytes")) is int and entry["bytes"] >= 0:
            entries[name] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    return entries, True


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` (a no-op without ``fcntl``)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _update_index(path: Path, entry: dict | None) -> None:
    """Set (or, with ``None``, remove) the entry of ``path`` in its index."""
    index = index_path(path)
    with _locked(index.parent):
        entries, _ = _read_index(index)
        if entry is None:
            if path.name not in entries:
                return
            entries.pop(path.name)
        else:
            entries[path.name] = entry
        write_text_atomic(index, json.dumps({"format": INDEX_FORMAT, "files": entries},
                                            indent=1, sort_keys=True) + "\n")


def _entry(path: Path) -> dict:
    from ...export.engine_file import sha256_file

    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def check(path: str | os.PathLike) -> str | None:
    """``None`` when the cached file ``path`` matches its index entry, else what is
    wrong (``"is corrupt (checksum mismatch)"``, ...). ``path`` must exist."""
    path = Path(path)
    index = index_path(path)
    entries, readable = _read_index(index)
    if not readable:
        return f"cannot be verified (the cache index {index.name} is unreadable)"
    expected = entries.get(path.name)
    if expected is None:
        return f"cannot be verified (no checksum in the cache index {index.name})"
    try:
        actual = _entry(path)
    except OSError as exc:
        return f"is unreadable ({exc.strerror})"
    if actual != expected:
        return "is corrupt (checksum mismatch)"
    return None


def report(path: str | os.PathLike, problem: str) -> None:
    """The one line on stderr for a cached file that was exported again."""
    print(f"vrn: cached ONNX file {path} {problem}; re-exported", file=sys.stderr,
          flush=True)


def discard(path: str | os.PathLike) -> None:
    """Forget the cached file ``path``: its index entry and the file."""
    path = Path(path)
    _update_index(path, None)
    path.unlink(missing_ok=True)


def cached_file(path: str | os.PathLike, produce: Callable[[Path], object]) -> Path:
    """``path`` once it is present and matches its checksum; otherwise ``produce(tmp)``
    writes it to a temporary path, its checksum is recorded, and it is renamed over
    ``path`` (a corrupt file also gets a line on stderr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = check(path) if path.is_file() else None
    if path.is_file() and problem is None:
        return path
    with atomic_path(path) as tmp:
        produce(tmp)
        _update_index(path, _entry(tmp))
    if problem is not None:
        report(path, problem)
    return path


def open_cached(export: Callable[[], Path], open_file: Callable[[Path], T]) -> T:
    """``open_file(export())``; when that raises
    :class:`~vrn.errors.UnreadableOnnxError` (the file passed its checksum but does not
    load), the file is discarded, exported again, reported, and opened once more."""
    path = export()
    try:
        return open_file(path)
    except UnreadableOnnxError as exc:
        discard(path)
        path = export()
        report(path, f"is corrupt ({exc.reason})")
        return open_file(path)
