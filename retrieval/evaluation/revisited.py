"""Revisited Oxford / Paris (Radenović et al. 2018): read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` without trusting
pickle, and turn it into the Easy / Medium / Hard protocols.

The file (revisitop ``python/dataset.py`` loads it with a plain ``pickle.load``) is a dict::

    {"imlist":  [name, ...],            # database images, no extension ("all_souls_000000")
     "qimlist": [name, ...],            # query images (70), not in imlist
     "gnd": [{"bbx": [x1, y1, x2, y2],  # query region, pixels of the query image
              "easy": [i, ...], "hard": [i, ...], "junk": [i, ...]}, ...]}   # 0-based indices into imlist

Written with Python lists of ints, floats and strings the file needs no pickle global at all; written with numpy inside
it needs a few. ``_RestrictedUnpickler`` resolves exactly these (``ALLOWED_GLOBAL_NAMES``), each to a local stand-in
that checks its arguments and never to the real numpy callable, and refuses every other global (``os.system``,
``builtins.eval``, ...) before anything is looked up, as the torch weights reader does:

* arrays, pickle protocols 2-4: ``numpy.core.multiarray._reconstruct`` (numpy 1) / ``numpy._core.multiarray._reconstruct``
  (numpy 2), ``numpy.ndarray``, ``numpy.dtype``; protocol 2 adds ``_codecs.encode`` (bytes written as latin-1 text)
  and, for empty bytes, ``__builtin__.bytes``;
* arrays, protocol 5: ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` and ``numpy.dtype``;
* numpy scalars in a list: ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` and ``numpy.dtype``.

Only bool, integer, float and unicode-string dtypes without fields are accepted (never object arrays). Every failure is
a ``GroundTruthError`` with a one-line message naming the file and, for content, ``gnd[i]`` and the query.

The protocols, as revisitop's ``example_evaluate.py`` builds them (``RevisitedGroundTruth.protocol``):

    easy:   relevant = easy,         junk = junk + hard
    medium: relevant = easy + hard,  junk = junk
    hard:   relevant = hard,         junk = junk + easy

A query with no relevant image in a protocol is left out of that protocol's means (revisitop: NaN, excluded). The
query images are not database images: each query is encoded from its file, cropped to ``bbx``, and the 70 query
images are junk for every query, so an index that also holds them (the whole ``jpg/`` folder indexed) scores exactly
like one built from ``imlist`` alone.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .groundtruth import GroundTruth, GroundTruthError, Query

PROTOCOLS = ("easy", "medium", "hard")
MAX_FILE_BYTES = 256 * 1024 * 1024
IMAGE_EXTENSION = ".jpg"  # revisitop's config_imname: jpg/<name>.jpg
_GND_KEYS = ("bbx", "easy", "hard", "junk")


# --------------------------------------------------------------------------- stand-ins for the allowed globals


class _Refuse:
    """Base of every stand-in: a pickle BUILD opcode may not set its state unless the class says how."""

    __slots__ = ()

    def __setstate__(self, state):
        raise GroundTruthError(f"the pickle tries to set the state of {type(self).__name__}")

    def __reduce__(self):
        raise TypeError("not picklable")


class _NdarrayClass(_Refuse):
    """Stands for ``numpy.ndarray``: only a marker passed to ``_reconstruct``; calling it fails."""

    __slots__ = ()


_NDARRAY = _NdarrayClass()
_DTYPE_CODE = re.compile(r"^[<>|=]?(?:b1|\?|[iu][1248]|f[248]|U\d{1,6})$")


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class _DType(_Refuse):
    """What ``numpy.dtype(code, align, copy)`` and its BUILD state mean; ``.dtype`` is the real numpy dtype."""

    __slots__ = ("dtype",)

    def __init__(self, code: str):
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise GroundTruthError("the pickle holds a numpy dtype with an unexpected state")
        _, order, subarray, names, fields, elsize, alignment, flags = state[:8]
        metadata = state[8] if len(state) == 9 else None
        if order not in ("<", ">", "|", "=") or subarray is not None or names is not None or fields is not None:
            raise GroundTruthError("the pickle holds a structured or sub-array numpy dtype (only plain numbers/strings)")
        if metadata is not None or not all(_is_int(v) for v in (elsize, alignment, flags)):
            raise GroundTruthError("the pickle holds a numpy dtype with an unexpected state")
        if self.dtype.kind == "U":
            if elsize < 0 or elsize % 4 or elsize // 4 > 10**6:
                raise GroundTruthError("the pickle holds a numpy string dtype of invalid size")
            base = np.dtype(f"U{elsize // 4}")
        else:
            if elsize != -1 and elsize != self.dtype.itemsize:
                raise GroundTruthError("the pickle holds a numpy dtype with an unexpected item size")
            base = self.dtype
        if order in ("<", ">") and base.itemsize > 1:
            base = base.newbyteorder(order)
        self.dtype = base


def _make_dtype(code=None, align=False, copy=False, *rest):
    if rest or not isinstance(code, str) or not _DTYPE_CODE.match(code):
        raise GroundTruthError(f"the pickle asks for numpy dtype {code!r}; only bool, integer, float, str are allowed")
    return _DType(code)


def _as_bytes(data, what: str) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):  # a Python 2 str read with encoding="latin1"
        return data.encode("latin1")
    raise GroundTruthError(f"the pickle gives {what} data of type {type(data).__name__}, expected bytes")


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(_is_int(n) and n >= 0 for n in shape):
        raise GroundTruthError("the pickle holds a numpy array with an invalid shape")
    return shape


def _from_bytes(data: bytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise GroundTruthError(f"the pickle holds a numpy array of shape {shape} whose data has {len(data)} bytes")
    flat = np.frombuffer(data, dtype=dtype, count=count) if count else np.zeros(0, dtype=dtype)
    array = flat.reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array.astype(dtype.newbyteorder("="), copy=True))


class _ArraySpec(_Refuse):
    """What ``_reconstruct(ndarray, ...)`` returns; the ndarray BUILD state fills ``.array``."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None):
        self.array = array

    def __setstate__(self, state):
        if self.array is not None:
            raise GroundTruthError("the pickle sets the state of a numpy array twice")
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise GroundTruthError("the pickle holds a numpy array with an unexpected state")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _DType) or not isinstance(fortran, bool):
            raise GroundTruthError("the pickle holds a numpy array with an unexpected state")
        if isinstance(data, list):
            raise GroundTruthError("the pickle holds a numpy object array (only numbers and strings are allowed)")
        self.array = _from_bytes(_as_bytes(data, "array"), dtype.dtype, _check_shape(shape), fortran)


def _reconstruct(cls=None, shape=None, typecode=None, *rest):
    if cls is not _NDARRAY or rest:
        raise GroundTruthError("the pickle rebuilds something other than a numpy.ndarray")
    return _ArraySpec()


def _frombuffer(buffer=None, dtype=None, shape=None, order=None, *rest):
    if rest or not isinstance(dtype, _DType) or order not in ("C", "F"):
        raise GroundTruthError("the pickle holds a numpy array (protocol 5) with unexpected arguments")
    if isinstance(buffer, pickle.PickleBuffer):
        raise GroundTruthError("the pickle refers to out-of-band buffers")
    return _ArraySpec(_from_bytes(_as_bytes(buffer, "array"), dtype.dtype, _check_shape(shape), order == "F"))


def _scalar(dtype=None, data=None, *rest):
    if rest or not isinstance(dtype, _DType):
        raise GroundTruthError("the pickle holds a numpy scalar with unexpected arguments")
    return _from_bytes(_as_bytes(data, "scalar"), dtype.dtype, (), False)[()].item()


def _codecs_encode(text=None, encoding="utf-8", *rest):
    if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise GroundTruthError("the pickle calls _codecs.encode other than for latin-1 bytes")
    return text.encode("latin1")


def _bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise GroundTruthError("the pickle calls bytes() with unexpected arguments")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _make_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
ALLOWED_GLOBAL_NAMES = tuple(sorted(f"{module}.{name}" for module, name in _ALLOWED_GLOBALS))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED_GLOBAL_NAMES`` (to stand-ins); no persistent ids, no out-of-band buffers."""

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise GroundTruthError(f"refusing to load: the pickle asks for {module}.{name}")
        return target

    def persistent_load(self, pid):
        raise GroundTruthError("refusing to load: the pickle holds a persistent id")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with the restricted unpickler: numpy arrays come back as ndarray, numpy scalars as
    int/float/str. Python 2 pickles are read with ``encoding="latin1"`` (numpy's advice for Python 2 array data)."""
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except GroundTruthError:
        raise
    except RecursionError:
        raise GroundTruthError("malformed pickle: nested too deeply") from None
    except EOFError:
        raise GroundTruthError("truncated or empty pickle") from None
    except Exception as exc:  # UnpicklingError, a TypeError from calling a marker, MemoryError, ...
        detail = " ".join(str(exc).split())[:200]
        raise GroundTruthError(f"malformed pickle: {type(exc).__name__}: {detail}") from None
    return _materialise(loaded)


def _materialise(value, depth: int = 0):
    """Replace the array stand-ins by their arrays; refuse any other stand-in left bare."""
    if depth > 64:
        raise GroundTruthError("malformed ground truth: nested too deeply")
    if isinstance(value, _ArraySpec):
        if value.array is None:
            raise GroundTruthError("the pickle holds a numpy array without data")
        return value.array
    if isinstance(value, _Refuse):
        raise GroundTruthError(f"the pickle holds a bare {type(value).__name__.strip('_')}")
    if isinstance(value, dict):
        return {_materialise(k, depth + 1): _materialise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v, depth + 1) for v in value)
    return value


# --------------------------------------------------------------------------- the checked structure


@dataclass(frozen=True, eq=False)
class RevisitedQuery:
    """One query: its image name (no extension), box (x1, y1, x2, y2) and easy / hard / junk indices into the image
    list (int64, read-only, in file order)."""

    name: str
    bbox: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True, eq=False)
class RevisitedGroundTruth:
    """``images``: the database names (``imlist``); ``queries``: one per ``qimlist`` entry, in file order."""

    images: tuple[str, ...]
    queries: tuple[RevisitedQuery, ...]

    def protocol(self, name: str) -> GroundTruth:
        """The ground truth of protocol ``name`` (one of ``PROTOCOLS``): per query the relevant and junk image files
        (``<name>.jpg``), its box, and its own file (``Query.image``); every query image is junk (module docstring)."""
        if name not in PROTOCOLS:
            raise GroundTruthError(f"unknown Revisited protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
        query_files = frozenset(q.name + IMAGE_EXTENSION for q in self.queries)
        out = []
        for query in self.queries:
            relevant, junk = {
                "easy": (query.easy, np.concatenate([query.junk, query.hard])),
                "medium": (np.concatenate([query.easy, query.hard]), query.junk),
                "hard": (query.hard, np.concatenate([query.junk, query.easy])),
            }[name]
            file = query.name + IMAGE_EXTENSION
            out.append(Query(file, self._files(relevant), self._files(junk) | query_files, query.bbox, image=file))
        return GroundTruth(tuple(out), "revisited")

    def _files(self, indices: np.ndarray) -> frozenset[str]:
        return frozenset(self.images[int(i)] + IMAGE_EXTENSION for i in indices)


def _names(value, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GroundTruthError(f"{where}: {key!r} must be a list of image names, got {type(value).__name__}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise GroundTruthError(f"{where}: {key}[{i}] must be a non-empty image name, got {name!r}")
        if "\x00" in name or name.startswith("/") or ".." in name.split("/"):
            raise GroundTruthError(f"{where}: {key}[{i}] is not a plain image name: {name[:80]!r}")
    names = tuple(str(n) for n in value)
    if len(set(names)) != len(names):
        raise GroundTruthError(f"{where}: {key!r} lists an image more than once")
    return names


def _indices(value, label: str, count: int, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim > 1 and (value.size == 0 or value.size == value.shape[-1]):  # a MATLAB-style (1, n) array
            value = value.reshape(-1)
        if value.ndim != 1:
            raise GroundTruthError(f"{where}: {label} must be a 1-D list of indices, got shape {value.shape}")
        items = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise GroundTruthError(f"{where}: {label} must be a list of image indices, got {type(value).__name__}")
    out = np.empty(len(items), dtype=np.int64)
    for j, item in enumerate(items):
        if isinstance(item, float) and item.is_integer():  # np.concatenate([[], [1]]) gives floats
            item = int(item)
        if not _is_int(item):
            raise GroundTruthError(f"{where}: {label}[{j}] must be an integer image index, got {item!r}")
        if not 0 <= item < count:
            raise GroundTruthError(f"{where}: {label}[{j}] = {item} is outside 0..{count - 1} (the image list)")
        out[j] = int(item)
    if np.unique(out).size != out.size:
        raise GroundTruthError(f"{where}: {label} lists an image more than once")
    out.flags.writeable = False
    return out


def _bbox(value, where: str) -> tuple[float, float, float, float]:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
        _is_int(v) or isinstance(v, (float, np.floating)) for v in value
    ):
        raise GroundTruthError(f"{where}: bbx must be four numbers x1, y1, x2, y2, got {value!r:.80}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise GroundTruthError(f"{where}: bbx must be finite, got {value!r}")
    if not (x2 > x1 >= 0 and y2 > y1 >= 0):
        raise GroundTruthError(f"{where}: empty or negative bbx ({x1}, {y1}, {x2}, {y2})")
    return x1, y1, x2, y2


def parse_revisited_gnd(content: Any, *, source: str = "ground truth") -> RevisitedGroundTruth:
    """Check the unpickled dict and build a ``RevisitedGroundTruth``. Refused: missing keys, names that repeat or
    are not plain, query images that are also database images, indices outside the image list or repeated, an image
    in two of one query's easy / hard / junk (each pair has one label), boxes that are not 4 finite numbers with
    x2 > x1 >= 0 and y2 > y1 >= 0. Extra top-level keys are ignored."""
    if not isinstance(content, dict):
        raise GroundTruthError(f"{source}: expected a dict with 'gnd', 'imlist', 'qimlist', got {type(content).__name__}")
    missing = [key for key in ("gnd", "imlist", "qimlist") if key not in content]
    if missing:
        raise GroundTruthError(f"{source}: missing key(s) {', '.join(map(repr, missing))} (expected gnd, imlist, qimlist)")
    images = _names(content["imlist"], "imlist", source)
    query_names = _names(content["qimlist"], "qimlist", source)
    shared = sorted(set(images) & set(query_names))
    if shared:
        raise GroundTruthError(f"{source}: query image {shared[0]!r} is also in 'imlist' (queries are not database images)")
    gnd = content["gnd"]
    if not isinstance(gnd, (list, tuple)):
        raise GroundTruthError(f"{source}: 'gnd' must be a list of per-query dicts, got {type(gnd).__name__}")
    if len(gnd) != len(query_names):
        raise GroundTruthError(f"{source}: 'gnd' has {len(gnd)} entries but 'qimlist' has {len(query_names)} queries")
    if not gnd:
        raise GroundTruthError(f"{source}: no queries")
    queries = []
    for i, entry in enumerate(gnd):
        where = f"{source}: gnd[{i}] ({query_names[i]})"
        if not isinstance(entry, dict):
            raise GroundTruthError(f"{where}: expected a dict with bbx, easy, hard, junk, got {type(entry).__name__}")
        absent = [key for key in _GND_KEYS if key not in entry]
        if absent:
            hint = " (an old-protocol file with 'ok'? only the revisited easy/hard/junk is read)" if "ok" in entry else ""
            raise GroundTruthError(f"{where}: missing {', '.join(map(repr, absent))}{hint}")
        lists = {key: _indices(entry[key], key, len(images), where) for key in ("easy", "hard", "junk")}
        for a, b in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
            both = np.intersect1d(lists[a], lists[b])
            if both.size:
                raise GroundTruthError(f"{where}: image {int(both[0])} is both {a} and {b}")
        queries.append(RevisitedQuery(query_names[i], _bbox(entry["bbx"], where), lists["easy"], lists["hard"], lists["junk"]))
    return RevisitedGroundTruth(images, tuple(queries))


def load_revisited_gnd(path: str | os.PathLike) -> RevisitedGroundTruth:
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (or any file of that shape) safely; see the module docstring."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise GroundTruthError(f"{path}: {size} bytes is too large for a ground-truth file")
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GroundTruthError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise GroundTruthError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        content = restricted_loads(data)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{path}: {exc}") from None
    return parse_revisited_gnd(content, source=str(path))
