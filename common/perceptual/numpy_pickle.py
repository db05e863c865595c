"""Read a pickle that may hold nothing but numpy arrays in dicts, lists and tuples.

A pickle shipped inside a package is still untrusted input: ``pickle.load`` runs whatever
callable the file names. This unpickler resolves only the three globals numpy itself uses to
rebuild an ``ndarray`` (``_reconstruct``, ``ndarray``, ``dtype``); any other global is refused
with an error naming the file. Object arrays are refused too (they would need more globals).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

# numpy's own array rebuilder, whichever module numpy keeps it in (numpy.core before 2.0,
# numpy._core since): the function ``ndarray.__reduce__`` names.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._where}: refuses global {module}.{name} (only numpy arrays are allowed)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self._where}: refuses persistent id {pid!r}")


def _check(obj, where: str):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise pickle.UnpicklingError(f"{where}: non-string key {key!r}")
            _check(value, where)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check(value, where)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: object array refused")
    else:
        raise pickle.UnpicklingError(f"{where}: unexpected {type(obj).__name__} in a numpy pickle")


def load_numpy_pickle(data: bytes, where: str | Path):
    """Unpickle ``data`` (the bytes of ``where``) allowing only numpy arrays and containers.

    Raises:
        pickle.UnpicklingError naming ``where`` for any other content.
    """
    where = str(where)
    try:
        obj = _NumpyOnlyUnpickler(data, where).load()
    except Exception as err:  # a refused global, a truncated or corrupt stream, a bad dtype, ...
        if str(err).startswith(where):
            raise
        raise pickle.UnpicklingError(f"{where}: not a readable numpy pickle ({err})") from err
    _check(obj, where)
    return obj
