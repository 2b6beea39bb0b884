"""Runtimes: what executes a backbone. Keras defines the model and is the weights' source; OpenVINO runs it on CPUs.

``load_runtime(weights, precision)`` returns a callable: preprocessed float32 (N, H, W, 3) -> float32 conv maps
(N, h, w, C), thread-safe, any batch and spatial size. Which runtime (``CBIR_RUNTIME``: ``auto`` | ``openvino`` |
``keras``):

* ``openvino`` (``auto`` on CPUs): the Keras model converted once to OpenVINO IR and cached (below); a cached model
  starts without importing TensorFlow (a terminal query then starts in a fraction of TensorFlow's import time).
  float32 runs in f32 (``INFERENCE_PRECISION_HINT`` set explicitly: OpenVINO would pick bf16 by itself on CPUs that
  have it), bfloat16 with the bf16 hint, int8 is NNCF post-training quantization calibrated on a seeded sample of the
  database's own images (``Calibration``).
* ``keras`` (``auto`` where an NVIDIA GPU and a GPU build of TensorFlow are installed, or where OpenVINO is not
  installed; that fallback is said once): the traced ``tf.function`` path, float32 or mixed_bfloat16; no int8.

The cache: ``$CBIR_MODEL_CACHE`` or ``$XDG_CACHE_HOME/cbir-retrieval/models`` (default ``~/.cache/...``), one folder
per (backbone, weights md5, precision, calibration sample) holding ``model.xml``/``model.bin`` and ``meta.json``.
``meta.json`` is written last (atomically, like the model files) and names the full key (cache format, backbone,
weights md5, input shape, precision, OpenVINO/NNCF versions, calibration digest), the md5 of both model files and a
probe: a fixed seeded input and the output it gave when the model was built. Loading checks all of it; a stale key,
a corrupt or truncated file or a probe that no longer matches rebuilds the model, with a notice.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import RetrievalError, WeightsError
from ..files import atomic_replace, atomic_write_bytes, check_readable_file
from . import backbones

RUNTIME_ENV = "CBIR_RUNTIME"
CACHE_ENV = "CBIR_MODEL_CACHE"
RUNTIME_CHOICES = ("auto", "openvino", "keras")
CACHE_FORMAT = 1
INPUT_SHAPE = "NHWC float32, dynamic batch and spatial size"
PROBE_SHAPE = (2, 64, 64, 3)  # the probe run at every load: small, so it costs a few milliseconds
PROBE_SEED = 20261202
OPENVINO_PIN = "openvino==2026.4.1"
NNCF_PIN = "nncf==3.4.0"
OV_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}  # int8: the layers NNCF leaves unquantized run in f32
# agreement of the converted model with Keras float32 on the probe, checked when a model is built
CONVERSION_MIN_COSINE = {"float32": 0.9999}
PROBE_MIN_COSINE = {"float32": 0.99999, "bfloat16": 0.999, "int8": 0.999}  # a cached model against its own probe

Notice = Callable[[str], None]
_said: set[str] = set()
_said_lock = threading.Lock()


def stderr_notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def notice_once(notice: Notice, message: str) -> None:
    """Say ``message`` once per process (a server builds extractors again on reload)."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    notice(message)


@dataclass(frozen=True)
class Calibration:
    """The int8 calibration sample: its digest (recorded in the database; part of the cache key) and a loader of
    its uint8 RGB images (which checks that the files still have that digest)."""

    digest: str
    images: Callable[[], Sequence[np.ndarray]]


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cbir-retrieval" / "models"


def runtime_choice() -> str:
    choice = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if choice not in RUNTIME_CHOICES:
        raise RetrievalError(f"{RUNTIME_ENV}={choice!r}: choose from {', '.join(RUNTIME_CHOICES)}")
    return choice


def gpu_for_tensorflow() -> bool:
    """True when an NVIDIA GPU is visible and a GPU build of TensorFlow is installed (checked without importing it)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        visible = gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        visible = False
    if not visible or os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("tensorflow", "tensorflow-gpu", "tf-nightly"):
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_available() -> bool:
    """NNCF is installed (found, not imported: importing it takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nncf") is not None
    except (ImportError, ValueError):
        return False


def openvino_capabilities() -> set[str]:
    """The CPU plugin's optimisation capabilities (e.g. FP32, BF16, INT8); empty without OpenVINO."""
    try:
        import openvino as ov

        return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO, or a plugin that cannot start: no capabilities
        return set()


# ------------------------------------------------------------------------------------------------ speed trial

SPEED_FILE = "precision-speed.json"  # in the cache root: one entry per (backbone, CPU, OpenVINO version)
SPEED_TRIAL_BATCH = 8  # images at the backbone's input size, per timed run
SPEED_TRIAL_RUNS = 3  # timed runs per precision, alternated; the fastest counts
BFLOAT16_MARGIN = 0.9  # bfloat16 is chosen where it takes at most this share of float32's time


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (``model name``, ``flags``...); {} where there is none (not Linux)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_identity() -> str:
    """The CPU as a speed trial sees it: its model name, logical core count and an md5 of its feature flags."""
    import hashlib

    fields = cpu_fields()
    flags = " ".join(sorted(fields.get("flags", "").split()))
    digest = hashlib.md5(flags.encode(), usedforsecurity=False).hexdigest()[:12]
    return f"{fields.get('model name') or platform.processor() or platform.machine()} x{os.cpu_count()} flags:{digest}"


def speed_trial_key(backbone: str) -> str:
    import openvino as ov

    return f"{backbone} | {cpu_identity()} | openvino {ov.get_version()}"


def _stored_trials() -> dict:
    """The kept speed trials; {} where there are none or the file is damaged or special (then they run again)."""
    try:
        path = check_readable_file(cache_root() / SPEED_FILE, "speed trial file")  # a FIFO would block a read
        data = json.loads(path.read_text(encoding="utf-8"))
    except (RetrievalError, OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _timed(entry) -> bool:
    """Whether a kept trial holds two usable times (positive, finite milliseconds)."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(p), (int, float)) and math.isfinite(entry[p]) and entry[p] > 0 for p in ("float32_ms", "bfloat16_ms")
    )


def bfloat16_pays(weights: backbones.Weights, notice: Notice = stderr_notice) -> bool:
    """Whether OpenVINO runs this backbone in bfloat16 in at most ``BFLOAT16_MARGIN`` of its float32 time on this CPU.

    A CPU that reports BF16 is not always faster with it: EfficientNet-Lite0 ran 2x faster in bfloat16 on an AMD Zen 5
    and 1.2-1.7x slower on an Intel Xeon with AVX-512 BF16 but no AMX (its depthwise convolutions). So it is timed:
    once per (backbone, CPU, OpenVINO version), the float32 model compiled with each precision hint and run on a
    ``SPEED_TRIAL_BATCH`` batch, alternately, ``SPEED_TRIAL_RUNS`` times; the result is kept in ``SPEED_FILE`` in the
    model cache (delete it to time again)."""
    import openvino as ov

    key = speed_trial_key(weights.backbone)
    entry = _stored_trials().get(key)
    if _timed(entry):
        return entry["bfloat16_ms"] <= BFLOAT16_MARGIN * entry["float32_ms"]
    notice(f"timing {weights.backbone} in bfloat16 against float32 on this CPU (once; --precision chooses by hand)")
    folder = OpenVinoRuntime.cached(weights, "float32", None, notice).folder
    spec = backbones.BACKBONES[weights.backbone]
    rng = np.random.default_rng(PROBE_SEED)
    batch = spec.preprocess(rng.integers(0, 256, (SPEED_TRIAL_BATCH, spec.input_size, spec.input_size, 3), dtype=np.uint8))
    best = {p: float("inf") for p in ("float32", "bfloat16")}
    try:
        core = ov.Core()
        model = core.read_model(str(folder / "model.xml"))
        runs = {p: OpenVinoRuntime(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OV_HINTS[p]}), p, folder)
                for p in best}
        for run in runs.values():
            run(batch)  # warm-up
        for _ in range(SPEED_TRIAL_RUNS):
            for precision, run in runs.items():
                started = time.perf_counter()
                run(batch)
                best[precision] = min(best[precision], (time.perf_counter() - started) * 1000)
    except Exception as exc:  # noqa: BLE001 - a plugin that cannot compile or run bf16: it does not pay
        notice(f"the bfloat16 trial failed ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); using float32")
        return False
    trials = _stored_trials()
    trials[key] = {"float32_ms": round(best["float32"], 2), "bfloat16_ms": round(best["bfloat16"], 2)}
    with contextlib.suppress(OSError):  # a read-only cache times again next time
        cache_root().mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_root() / SPEED_FILE, json.dumps(trials, indent=1, sort_keys=True).encode())
    return best["bfloat16"] <= BFLOAT16_MARGIN * best["float32"]


# ------------------------------------------------------------------------------------------------ Keras


class KerasRuntime:
    """The Keras model traced once as a ``tf.function`` with a dynamic batch and spatial shape."""

    name = "keras"

    def __init__(self, weights: backbones.Weights, precision: str):
        if precision == "int8":
            raise RetrievalError(f"precision int8 needs OpenVINO and NNCF (pip install {OPENVINO_PIN} {NNCF_PIN})", kind="unavailable")
        backbones.quiet_tensorflow()
        import tensorflow as tf

        self.precision = precision
        self.model = backbones.build_feature_model(weights, precision)
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def forward(batch):
            return tf.cast(model(batch, training=False), tf.float32)

        self._forward = forward

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(np.asarray(batch, np.float32)).numpy()


# ------------------------------------------------------------------------------------------------ OpenVINO


class CacheUnusable(Exception):
    """A cached model that must be rebuilt (the message says why)."""


def _md5_file(path: Path) -> str:
    return backbones.file_md5(path)


def _probe_input(spec: backbones.BackboneSpec) -> np.ndarray:
    rng = np.random.default_rng(PROBE_SEED)
    return spec.preprocess(rng.integers(0, 256, PROBE_SHAPE, dtype=np.uint8))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / denominator)


def _encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, np.float32)
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode_array(data: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data["float32_base64"]), np.float32).reshape(data["shape"])


def cache_key(weights: backbones.Weights, precision: str, calibration: Calibration | None) -> dict:
    import openvino as ov

    key = {
        "format": CACHE_FORMAT,
        "backbone": weights.backbone,
        "weights": weights.hash,
        "input": INPUT_SHAPE,
        "precision": precision,
        "openvino": ov.__version__,
        "calibration": calibration.digest if calibration is not None else "",
    }
    if precision == "int8":
        import nncf

        key["nncf"] = nncf.__version__
    return key


def cache_folder(weights: backbones.Weights, precision: str, calibration: Calibration | None) -> Path:
    """One folder per (backbone, weights, precision, calibration); versions changing the key rebuild it in place."""
    name = f"{weights.backbone}-{weights.hash.removeprefix('md5:')[:16]}-{precision}"
    if calibration is not None:
        name += f"-cal{calibration.digest.removeprefix('md5:')[:12]}"
    return cache_root() / name


class OpenVinoRuntime:
    """A compiled OpenVINO model; one infer request per calling thread."""

    name = "openvino"

    def __init__(self, compiled, precision: str, folder: Path):
        self.compiled = compiled
        self.precision = precision
        self.folder = folder
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer([np.ascontiguousarray(batch, dtype=np.float32)])
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    @classmethod
    def cached(
        cls, weights: backbones.Weights, precision: str, calibration: Calibration | None, notice: Notice
    ) -> "OpenVinoRuntime":
        """The cached model for this key, built (and cached) first when it is missing, stale or corrupt."""
        spec = backbones.BACKBONES[weights.backbone]
        key = cache_key(weights, precision, calibration)
        folder = cache_folder(weights, precision, calibration)
        try:
            runtime = cls._load(folder, key, spec, precision)
        except CacheUnusable as exc:
            notice(f"converted model in {folder} {exc}; rebuilding it")
            runtime = None
        if runtime is None:
            build_cached_model(folder, key, weights, precision, calibration, notice)
            try:
                runtime = cls._load(folder, key, spec, precision)
            except CacheUnusable as exc:
                raise RetrievalError(f"the converted model in {folder} {exc} right after it was built", kind="unavailable") from None
            if runtime is None:
                raise RetrievalError(f"the converted model in {folder} vanished right after it was built", kind="unavailable")
        return runtime

    @classmethod
    def _load(cls, folder: Path, key: dict, spec: backbones.BackboneSpec, precision: str) -> "OpenVinoRuntime | None":
        """The verified compiled model, None when nothing is cached; CacheUnusable when what is there cannot be used."""
        import openvino as ov

        meta_path = folder / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stored_key, files, probe = meta["key"], meta["files"], meta["probe"]
            expected = _decode_array(probe["output"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CacheUnusable("has an unreadable meta.json") from None
        if stored_key != key:
            changed = sorted(name for name in set(key) | set(stored_key) if key.get(name) != stored_key.get(name))
            raise CacheUnusable(f"was built for another {', '.join(changed)}")
        for name, digest in files.items():
            path = folder / name
            try:
                actual = _md5_file(path)
            except OSError:
                raise CacheUnusable(f"is missing {name}") from None
            if actual != digest:
                raise CacheUnusable(f"has a damaged {name} (checksum mismatch)")
        core = ov.Core()
        try:
            compiled = core.compile_model(
                core.read_model(str(folder / "model.xml")), "CPU", {"INFERENCE_PRECISION_HINT": OV_HINTS[precision]}
            )
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for every bad file
            raise CacheUnusable(f"cannot be compiled ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
        runtime = cls(compiled, precision, folder)
        output = runtime(_probe_input(spec))
        if output.shape != expected.shape or _cosine(output, expected) < PROBE_MIN_COSINE[precision]:
            raise CacheUnusable("no longer gives its recorded output for the probe input")
        return runtime


def build_cached_model(
    folder: Path, key: dict, weights: backbones.Weights, precision: str, calibration: Calibration | None, notice: Notice
) -> None:
    """Convert the Keras model (quantizing it for int8), check it against Keras on the probe, and cache it."""
    import openvino as ov

    spec = backbones.BACKBONES[weights.backbone]
    what = f"{weights.backbone} ({precision})"
    notice(f"converting {what} for OpenVINO once; cached in {folder}")
    keras_runtime = KerasRuntime(weights, "float32")
    probe = _probe_input(spec)
    reference = keras_runtime(probe)
    try:
        with warnings.catch_warnings():  # Keras warns that the traced input is not named like the model's input
            warnings.simplefilter("ignore")
            model = ov.convert_model(keras_runtime.model)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{what}: OpenVINO could not convert the model ({str(exc).splitlines()[0][:160]})") from None
    if precision == "int8":
        model = _quantize(model, spec, calibration)
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OV_HINTS[precision]})
    output = OpenVinoRuntime(compiled, precision, folder)(probe)
    agreement = _cosine(output, reference)
    floor = CONVERSION_MIN_COSINE.get(precision)
    if floor is not None and agreement < floor:
        raise WeightsError(f"{what}: the converted model disagrees with Keras (cosine {agreement:.6f} < {floor})")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    try:
        ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)  # the default would halve fp32 weights
        files = {}
        for name in ("model.bin", "model.xml"):
            with atomic_replace(folder / name) as temporary:
                shutil.move(str(staging / name), temporary)
            files[name] = _md5_file(folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = {
        "key": key,
        "files": files,
        "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE), "output": _encode_array(output)},
        "keras_float32_cosine_on_probe": agreement,
    }
    atomic_write_bytes(folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))


def _quantize(model, spec: backbones.BackboneSpec, calibration: Calibration | None):
    if calibration is None:
        raise RetrievalError("precision int8 needs calibration images (the database's own)", kind="unavailable")
    try:
        import nncf
    except ImportError:
        raise RetrievalError(f"precision int8 needs NNCF (pip install {NNCF_PIN}, or pip install .[int8])", kind="unavailable") from None
    images = list(calibration.images())
    if not images:
        raise RetrievalError("precision int8 needs at least one calibration image")
    samples = [spec.preprocess(image[None]) for image in images]
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars would land in index.py's output
        return nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))


# ------------------------------------------------------------------------------------------------ choosing


def load_runtime(
    weights: backbones.Weights,
    precision: str,
    calibration: Calibration | None = None,
    notice: Notice = stderr_notice,
):
    """The runtime for this model and precision (see the module docstring). Raises RetrievalError."""
    choice = runtime_choice()
    if choice == "keras" or (choice == "auto" and gpu_for_tensorflow()):
        return KerasRuntime(weights, precision)
    if not openvino_available():
        if choice == "openvino" or precision == "int8":
            raise RetrievalError(
                f"{'precision int8' if precision == 'int8' else RUNTIME_ENV + '=openvino'} needs OpenVINO "
                f"(pip install {OPENVINO_PIN})", kind="unavailable",
            )
        notice_once(notice, f"OpenVINO is not installed: running the model with Keras (slower; pip install {OPENVINO_PIN})")
        return KerasRuntime(weights, precision)
    return OpenVinoRuntime.cached(weights, precision, calibration, notice)


def runtime_name(precision: str) -> str:
    """Which runtime ``load_runtime`` would use now for ``precision`` (for reports), without building anything."""
    choice = runtime_choice()
    if choice == "keras" or (choice == "auto" and gpu_for_tensorflow()):
        return "keras"
    if not openvino_available():
        return "keras"
    return "openvino"
