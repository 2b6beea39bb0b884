"""The compiled runtime (retrieval.models.runtime): OpenVINO agrees with Keras, its conversion cache is keyed and
verified (a stale key, a damaged file or a wrong probe rebuild it with a notice), a missing OpenVINO falls back to
Keras with one notice, int8 is calibrated on the database's own images and recorded, precisions never mix, and a
terminal query from a cached model never imports TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO
from retrieval.descriptors import encoder as encoder_module
from retrieval.descriptors.encoder import new_encoder_config
from retrieval.descriptors.extractor import Extractor
from retrieval.errors import IndexFileError, RetrievalError
from retrieval.images import load_for_backbone
from retrieval.indexing import build_index
from retrieval.models import runtime
from retrieval.models.backbones import efficientnet_lite0_weights
from retrieval.storage.database import read_database

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0_weights()


@pytest.fixture(scope="module")
def demo_arrays():
    paths = sorted(DEMO_DATABASE.rglob("*.jpg"))[:12]
    return [load_for_backbone(p, 224) for p in paths]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, lite0):
    """A cache folder holding the float32 EfficientNet-Lite0 conversion, built once for the module."""
    root = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(runtime.CACHE_ENV, str(root))
        patch.setenv(runtime.RUNTIME_ENV, "openvino")
        notices = []
        model = runtime.load_runtime(lite0, "float32", notice=notices.append)
    assert isinstance(model, runtime.OpenVinoRuntime) and any("converting" in n for n in notices)
    return root


def fresh_copy(built_cache, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shutil.copytree(built_cache, root)
    monkeypatch.setenv(runtime.CACHE_ENV, str(root))
    monkeypatch.setenv(runtime.RUNTIME_ENV, "openvino")
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def test_openvino_float32_descriptors_agree_with_keras(built_cache, lite0, demo_arrays, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(built_cache))
    monkeypatch.setenv(runtime.RUNTIME_ENV, "openvino")
    encoder = new_encoder_config(lite0, "max", "float32")
    compiled = Extractor(encoder, lite0, notice=lambda line: pytest.fail(f"unexpected notice: {line}"))  # cached
    assert isinstance(compiled.runtime, runtime.OpenVinoRuntime)
    monkeypatch.setenv(runtime.RUNTIME_ENV, "keras")
    keras = Extractor(encoder, lite0)
    assert isinstance(keras.runtime, runtime.KerasRuntime)
    a, b = compiled.encode_arrays(demo_arrays), keras.encode_arrays(demo_arrays)
    assert np.min(np.sum(a * b, axis=1)) >= 0.9999
    # batches of other sizes and shapes (aspect-preserving inputs) run through the same dynamic model
    odd = compiled.feature_maps(np.zeros((3, 160, 200, 3), np.uint8))
    assert odd.shape[0] == 3 and odd.shape[-1] == 1280


def test_cached_model_is_reused_without_a_notice(built_cache, lite0, tmp_path, monkeypatch):
    folder = fresh_copy(built_cache, tmp_path, monkeypatch)
    notices = []
    runtime.load_runtime(lite0, "float32", notice=notices.append)
    assert notices == []
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"]["weights"] == lite0.hash and meta["key"]["precision"] == "float32"
    assert meta["keras_float32_cosine_on_probe"] >= 0.9999


def damage_key(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["key"]["openvino"] = "0.0.1"
    (folder / "meta.json").write_text(json.dumps(meta))


def damage_bin(folder):
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (folder / "model.bin").write_bytes(bytes(data))


def damage_meta(folder):
    (folder / "meta.json").write_text("{not json")


def damage_probe(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["probe"]["output"] = runtime._encode_array(-runtime._decode_array(meta["probe"]["output"]))
    (folder / "meta.json").write_text(json.dumps(meta))


def remove_xml(folder):
    (folder / "model.xml").unlink()


@pytest.mark.parametrize("damage, said", [
    (damage_key, "was built for another openvino"),
    (damage_bin, "damaged model.bin"),
    (damage_meta, "unreadable meta.json"),
    (damage_probe, "no longer gives its recorded output"),
    (remove_xml, "missing model.xml"),
])
def test_stale_or_corrupt_cache_is_rebuilt_with_a_notice(built_cache, lite0, tmp_path, monkeypatch, damage, said):
    folder = fresh_copy(built_cache, tmp_path, monkeypatch)
    damage(folder)
    notices = []
    model = runtime.load_runtime(lite0, "float32", notice=notices.append)
    assert any(said in n and "rebuilding" in n for n in notices), notices
    # rebuilt and usable: the next load is silent and gives the recorded probe output
    again = []
    runtime.load_runtime(lite0, "float32", notice=again.append)
    assert again == []
    probe = runtime._probe_input(runtime.backbones.BACKBONES["efficientnet-lite0"])
    expected = runtime._decode_array(json.loads((folder / "meta.json").read_text())["probe"]["output"])
    assert runtime._cosine(model(probe), expected) > 0.99999


def test_missing_openvino_falls_back_to_keras_with_one_notice(lite0, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    monkeypatch.setattr(runtime, "_said", set())
    notices = []
    first = runtime.load_runtime(lite0, "float32", notice=notices.append)
    second = runtime.load_runtime(lite0, "float32", notice=notices.append)
    assert isinstance(first, runtime.KerasRuntime) and isinstance(second, runtime.KerasRuntime)
    assert len(notices) == 1 and "OpenVINO is not installed" in notices[0] and "\n" not in notices[0]
    with pytest.raises(RetrievalError, match="int8 needs OpenVINO"):
        runtime.load_runtime(lite0, "int8")
    monkeypatch.setenv(runtime.RUNTIME_ENV, "openvino")
    with pytest.raises(RetrievalError, match="needs OpenVINO"):
        runtime.load_runtime(lite0, "float32")
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tpu")
    with pytest.raises(RetrievalError, match="CBIR_RUNTIME"):
        runtime.load_runtime(lite0, "float32")


def test_auto_precision_follows_the_gate_and_the_machine(monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "openvino")
    monkeypatch.setattr(runtime, "nncf_available", lambda: True)
    monkeypatch.setattr(runtime, "openvino_capabilities", lambda: {"FP32", "INT8"})
    assert encoder_module.resolve_precision("auto", "vgg16") == "int8"
    assert encoder_module.resolve_precision("auto", "efficientnet-lite0") == "float32"  # int8 fails its gate
    monkeypatch.setattr(runtime, "openvino_capabilities", lambda: {"FP32", "BF16", "INT8"})
    assert encoder_module.resolve_precision("auto", "efficientnet-lite0") == "bfloat16"
    monkeypatch.setattr(runtime, "bfloat16_pays", lambda weights: weights.backbone == "vgg16")  # the timed choice
    assert encoder_module.resolve_precision("auto", "efficientnet-lite0", efficientnet_lite0_weights()) == "float32"
    monkeypatch.setattr(runtime, "bfloat16_pays", lambda weights: True)
    assert encoder_module.resolve_precision("auto", "efficientnet-lite0", efficientnet_lite0_weights()) == "bfloat16"
    monkeypatch.setattr(runtime, "nncf_available", lambda: False)
    assert encoder_module.resolve_precision("auto", "vgg16") == "bfloat16"
    monkeypatch.setenv(runtime.RUNTIME_ENV, "keras")
    monkeypatch.setattr(encoder_module, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(runtime, "gpu_for_tensorflow", lambda: False)
    assert encoder_module.resolve_precision("auto", "vgg16") == "float32"
    monkeypatch.setattr(encoder_module, "cpu_has_bf16", lambda: True)
    assert encoder_module.resolve_precision("auto", "vgg16") == "bfloat16"
    assert encoder_module.resolve_precision("auto", "efficientnet-lite0") == "float32"
    assert encoder_module.resolve_precision("int8") == "int8"


def test_the_bfloat16_speed_trial_runs_once_per_cpu_and_is_remembered(built_cache, lite0, tmp_path, monkeypatch):
    fresh_copy(built_cache, tmp_path, monkeypatch)
    notices = []
    pays = runtime.bfloat16_pays(lite0, notice=notices.append)
    assert any("timing efficientnet-lite0 in bfloat16" in n for n in notices)
    trials = json.loads((tmp_path / "cache" / runtime.SPEED_FILE).read_text())
    (entry,) = trials.values()
    assert entry["float32_ms"] > 0 and entry["bfloat16_ms"] > 0
    assert pays == (entry["bfloat16_ms"] <= runtime.BFLOAT16_MARGIN * entry["float32_ms"])
    # remembered: no model is compiled again, and the stored times decide
    monkeypatch.setattr(runtime.OpenVinoRuntime, "cached", lambda *a, **k: pytest.fail("timed again"))
    key = runtime.speed_trial_key("efficientnet-lite0")
    for bfloat16_ms, expected in ((50.0, True), (95.0, False)):
        trials[key] = {"float32_ms": 100.0, "bfloat16_ms": bfloat16_ms}
        (tmp_path / "cache" / runtime.SPEED_FILE).write_text(json.dumps(trials))
        assert runtime.bfloat16_pays(lite0, notice=notices.append) is expected
    # a damaged record, an unusable time or a FIFO in its place (a read would block) is timed again and replaced
    monkeypatch.undo()
    for name, spoil in (("text", lambda path: path.write_text("{not json")),
                        ("negative", lambda path: path.write_text(json.dumps({key: {"float32_ms": -1, "bfloat16_ms": 5}}))),
                        ("fifo", os.mkfifo)):
        fresh_copy(built_cache, tmp_path / name, monkeypatch)
        spoil(tmp_path / name / "cache" / runtime.SPEED_FILE)
        notices.clear()
        runtime.bfloat16_pays(lite0, notice=notices.append)
        assert any("timing" in n for n in notices), name
        assert key in json.loads((tmp_path / name / "cache" / runtime.SPEED_FILE).read_text()), name
        monkeypatch.undo()
    # a trial that cannot run says so and keeps float32
    fresh_copy(built_cache, tmp_path / "broken", monkeypatch)
    monkeypatch.setitem(runtime.OV_HINTS, "bfloat16", "no-such-precision")
    notices.clear()
    assert runtime.bfloat16_pays(lite0, notice=notices.append) is False
    assert any("trial failed" in n for n in notices)


def test_calibration_sample_is_bounded_seeded_and_order_free():
    paths = [f"img-{i:04d}.jpg" for i in range(1000)]
    sample = encoder_module.calibration_sample(paths)
    assert len(sample) == encoder_module.CALIBRATION_IMAGES and sample == sorted(sample) and set(sample) <= set(paths)
    assert encoder_module.calibration_sample(list(reversed(paths))) == sample
    assert encoder_module.calibration_sample(paths, seed=1) != sample
    assert encoder_module.calibration_sample(paths[:5]) == paths[:5]


def test_int8_is_calibrated_on_the_database_recorded_and_rebuilt_from_it(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(runtime.RUNTIME_ENV, "openvino")
    pytest.importorskip("nncf")
    path = tmp_path / "int8.h5"
    build_index(image_folder, path, backbone="efficientnet-lite0", precision="int8", progress=False)
    database = read_database(path)
    encoder = database.encoder
    assert encoder.precision == "int8"
    calibration = encoder.calibration
    assert calibration["paths"] == sorted(database.paths) and calibration["images"] == len(database.paths)
    assert calibration["seed"] == encoder_module.CALIBRATION_SEED and calibration["digest"].startswith("md5:")
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any(name.endswith("-int8-cal" + calibration["digest"][4:16]) for name in cached), cached

    from retrieval.engine import RetrievalEngine

    # the cached model is gone: the query side calibrates again on the recorded sample and encodes alike
    shutil.rmtree(tmp_path / "cache")
    engine = RetrievalEngine.open(path)
    row = database.paths.index("rocket.jpg")
    assert float(engine.encode(image_folder / "rocket.jpg") @ database.vectors[row]) > 0.999
    engine.close()

    # a calibration image changed since indexing (and no cached model): refused, not silently recalibrated
    shutil.rmtree(tmp_path / "cache")
    shutil.copy(DEMO_DATABASE / "brick" / "original.jpg", image_folder / "rocket.jpg")
    with pytest.raises(RetrievalError, match="calibration images have changed"):
        RetrievalEngine.open(path)


def test_precisions_never_mix_in_one_database(image_folder, tmp_path):
    path = tmp_path / "f32.h5"
    build_index(image_folder, path, backbone="efficientnet-lite0", precision="float32", progress=False)
    for other in ("int8", "bfloat16"):
        with pytest.raises(IndexFileError, match="precision float32; rerun with --rebuild") as caught:
            build_index(image_folder, path, backbone="efficientnet-lite0", precision=other, progress=False)
        assert caught.value.kind == "conflict"
    # through index.py: one error line, non-zero exit
    done = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", str(image_folder), "--index", str(path),
         "--backbone", "efficientnet-lite0", "--precision", "int8"],
        capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "built with precision float32" in errors[0]


def query_modules(path, query, **env) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run query_online.py as a script; an exit hook reports which of the watched modules were imported."""
    hook = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('modules:', ','.join(m for m in ('tensorflow', 'keras', 'openvino') "
        "if m in sys.modules)))\n"
        f"sys.argv = ['query_online.py', '--query', {str(query)!r}, '--index', {str(path)!r}, '-k', '2']\n"
        f"runpy.run_path({str(REPO / 'query_online.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    lines = [line for line in done.stdout.splitlines() if line.startswith("modules:")]
    assert len(lines) == 1, (done.stdout, done.stderr[-2000:])
    return done, set(filter(None, lines[0].removeprefix("modules:").strip().split(",")))


def test_terminal_query_from_a_cached_model_never_imports_tensorflow(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    path = tmp_path / "q.h5"
    build_index(image_folder, path, backbone="efficientnet-lite0", precision="float32", progress=False)  # caches
    done, modules = query_modules(path, image_folder / "rocket.jpg")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rocket.jpg" in done.stdout.splitlines()[1]
    assert modules == {"openvino"}
    # the same query through the Keras runtime does import it (the check can fail)
    done, modules = query_modules(path, image_folder / "rocket.jpg", **{runtime.RUNTIME_ENV: "keras"})
    assert done.returncode == 0 and {"tensorflow", "keras"} <= modules and "openvino" not in modules
