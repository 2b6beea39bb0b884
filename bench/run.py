#!/usr/bin/env python3
"""Speed benchmark: this machine's peaks, and each stage beside them, measured side by side in one run.

    python -m bench.run --quick     # smaller runs (a few minutes)
    python -m bench.run             # full run (< 15 minutes on an idle 2-core machine; adds 1M-vector search)

What it measures, all in one process (timings on a shared machine are noisy: compare ratios within a run):

* peaks: GEMM per precision through the runtime the extractor uses (OpenVINO: f32, bf16 where the CPU has it, int8
  after NNCF quantization) and read bandwidth over all cores;
* VGG16 (seeded weights: speed does not depend on the values) at 224: the reference loop (Keras fp32, one
  ``load_img`` + ``predict()`` per image, decode included) beside ``index.py`` end to end (``build_index``: scan,
  decode, forward, pool, write) at every precision this machine runs, with the forward's GFLOP/s as a fraction of
  the GEMM peak; int8/bf16 agreement with fp32 (cosine, top-10 overlap);
* EfficientNet-Lite0 (real ImageNet weights, the demo photos): Keras fp32 beside OpenVINO fp32 (and bf16 / int8 for
  the record), descriptors compared;
* a cold ``query_online.py`` (process start to printed ranking, cached model) beside ``python -c "import tensorflow"``;
* search at N x 512: exact float32 (numpy matmul + top-k), float16 through faiss' QT_fp16, 8-bit through QT_8bit,
  each beside the bandwidth bound (bytes / read bandwidth), with recall@10 against exact float32.

Generates its own images (seeded photo-sized JPEGs) and weights; converted models go to a fresh cache folder, so the
one-off conversion time is measured too. Writes bench/out/speed.md and speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
TARGET_INDEX_SPEEDUP = 8.0
TARGET_LITE0_SPEEDUP = 2.0
TARGET_COLD_QUERY = 0.5
TARGET_FP16_SEARCH = 2.0
TARGET_FP16_RECALL = 0.99
# VGG16 up to block5_conv3: (output side at 224, input channels, output channels) of each 3x3 convolution
VGG16_CONVS = [(224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256), (56, 256, 256),
               (56, 256, 256), (28, 256, 512), (28, 512, 512), (28, 512, 512), (14, 512, 512), (14, 512, 512),
               (14, 512, 512)]
VGG16_GFLOP = sum(2 * side * side * 9 * cin * cout for side, cin, cout in VGG16_CONVS) / 1e9


# ------------------------------------------------------------------------------------------------ inputs


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Seeded 640x480 JPEGs with smooth structure and noise (decode cost like a photo of that size)."""
    from PIL import Image, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((640, 480), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (480, 640, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img-{i:05d}.jpg"
        Image.fromarray(pixels).filter(ImageFilter.SMOOTH).save(path, quality=90)
        paths.append(path)
    return paths


def make_seeded_vgg16(path: Path) -> Path:
    import keras

    keras.utils.set_random_seed(2026)
    keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3)).save_weights(str(path))
    return path


def structured_vectors(count: int, dim: int = 512, seed: int = 0, latent: int = 24) -> np.ndarray:
    """Unit vectors shaped like CNN descriptors: non-negative, low intrinsic dimension (ReLU of a random projection
    of a ``latent``-d Gaussian) plus a little noise. Pure Gaussian vectors would be unrealistically hard for ANN."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(latent, dim)).astype(np.float32)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        block = np.maximum(rng.normal(size=(n, latent)).astype(np.float32) @ basis, 0)
        block += 0.05 * np.abs(rng.normal(size=(n, dim))).astype(np.float32)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def noisy_queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), count)]
    queries = picked + 0.02 * rng.normal(size=picked.shape).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def machine() -> dict:
    name, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from retrieval.models import runtime

    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return {
        "cpu": name, "cores": os.cpu_count(), "isa": [flag for flag in wanted if flag in flags],
        "openvino_capabilities": sorted(runtime.openvino_capabilities()),
        "gpu": "none visible to TensorFlow (the GPU path was not measured)" if not runtime.gpu_for_tensorflow() else "present",
    }


# ------------------------------------------------------------------------------------------------ timing


def best_rate(function, batch: np.ndarray, seconds: float, per_call: float) -> float:
    """Units per second of ``function(batch)`` (``per_call`` units each): the best of repeated calls over
    ``seconds`` (the best, not the mean: other processes on a shared machine only ever slow a call down)."""
    function(batch)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        started = time.perf_counter()
        function(batch)
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
    return per_call / best


def median_s(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class runtime_env:
    """Run a block with ``CBIR_RUNTIME`` set (the extractor reads it when it is built)."""

    def __init__(self, name: str):
        self.name, self.saved = name, None

    def __enter__(self):
        self.saved = os.environ.get("CBIR_RUNTIME")
        os.environ["CBIR_RUNTIME"] = self.name

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("CBIR_RUNTIME", None)
        else:
            os.environ["CBIR_RUNTIME"] = self.saved


# ------------------------------------------------------------------------------------------------ peaks


def gemm_peaks(channels: int, seconds: float, precisions: list[str]) -> dict:
    """GOP/s of the backbones' own kind of GEMM: one 3x3 convolution (``channels`` -> ``channels``, 28x28, batch 8,
    NHWC float32 in like the converted models) compiled by OpenVINO, per precision (int8: NNCF-quantized, as the
    backbones are). A plain MatMul is not what the models run: OpenVINO leaves an int8 MatMul slower than f32 on
    CPUs without VNNI, while its int8 convolutions gain."""
    import logging

    import openvino as ov
    import openvino.opset13 as ops

    from retrieval.models.runtime import OV_HINTS

    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((channels, channels, 3, 3)) / (3 * channels**0.5)).astype(np.float32)
    x = np.abs(rng.standard_normal((8, 28, 28, channels))).astype(np.float32)
    flops = 2 * 8 * 28 * 28 * 9 * channels * channels
    out = {}
    for precision in precisions:
        parameter = ops.parameter([-1, 28, 28, channels], np.float32, name="x")
        nchw = ops.transpose(parameter, ops.constant(np.array([0, 3, 1, 2], np.int64)))
        conv = ops.convolution(nchw, ops.constant(kernel), [1, 1], [1, 1], [1, 1], [1, 1])
        model = ov.Model([ops.relu(conv)], [parameter], "conv3x3")
        if precision == "int8":
            import nncf

            logging.getLogger("nncf").setLevel(logging.ERROR)
            with contextlib.redirect_stdout(io.StringIO()):
                model = nncf.quantize(model, nncf.Dataset([x[:1]]), subset_size=1)
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OV_HINTS[precision]})
        request = compiled.create_infer_request()
        out[precision] = best_rate(lambda b: request.infer([b]), x, seconds, flops) / 1e9
    return out


def read_bandwidth(megabytes: int, seconds: float) -> float:
    """GB/s reading a float32 array with one numpy reduction per core (numpy releases the GIL in it)."""
    array = np.ones(megabytes * (1 << 20) // 4, np.float32)
    cores = os.cpu_count() or 1
    chunks = np.array_split(array, cores)
    with ThreadPoolExecutor(cores) as pool:
        return best_rate(lambda _: list(pool.map(np.add.reduce, chunks)), None, seconds, array.nbytes) / 1e9


# ------------------------------------------------------------------------------------------------ models


def reference_loop(weights_file: Path, paths: list[Path]) -> float:
    """The classic demo's way: Keras VGG16 fp32, one ``load_img`` + ``model.predict`` per image. -> images/s."""
    import keras
    from keras.applications.vgg16 import preprocess_input

    model = keras.applications.VGG16(weights=None, include_top=False, pooling="max", input_shape=(224, 224, 3))
    model.load_weights(str(weights_file))

    def one(path):
        image = keras.utils.load_img(path, target_size=(224, 224))
        x = preprocess_input(np.expand_dims(keras.utils.img_to_array(image), 0))
        feature = model.predict(x, verbose=0)[0]
        return feature / np.linalg.norm(feature)

    one(paths[0])
    started = time.perf_counter()
    for path in paths:
        one(path)
    return len(paths) / (time.perf_counter() - started)


def extractor_for(weights, precision: str, runtime_name: str, image_root: Path | None = None):
    """(extractor, seconds to build it) with the given runtime; int8 calibrated on ``image_root``'s images."""
    from retrieval.descriptors.encoder import new_encoder_config, with_calibration
    from retrieval.descriptors.extractor import Extractor
    from retrieval.indexing.scan import scan_folder

    encoder = new_encoder_config(weights, "max", precision)
    if precision == "int8":
        encoder = with_calibration(encoder, image_root, list(scan_folder(image_root).stats))
    with runtime_env(runtime_name):
        started = time.perf_counter()
        extractor = Extractor(encoder, weights, image_root=image_root, notice=lambda _: None)
        return extractor, time.perf_counter() - started


def forward_rate(extractor, arrays: np.ndarray, seconds: float) -> float:
    """Forward + pooling of decoded, resized images (no I/O), img/s: the model's own throughput."""
    return best_rate(extractor.encode_arrays, arrays, seconds, len(arrays))


def index_end_to_end(folder: Path, index_path: Path, weights_file: Path | None, backbone: str, precision: str,
                     runtime_name: str) -> float:
    """img/s of a full ``build_index`` (what index.py runs: scan, plan, model from the cache, decode on worker
    threads, forward, pool, write the file), wall time of the whole call."""
    from retrieval.indexing import build_index

    options = dict(backbone=backbone, precision=precision, progress=False, notice=lambda _: None, rebuild=True)
    if weights_file is not None:
        options["weights_file"] = weights_file
    with runtime_env(runtime_name):
        started = time.perf_counter()
        report = build_index(folder, index_path, **options)
        return report.total / (time.perf_counter() - started)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Cosine of matching descriptors and the mean overlap of every image's top-10 (all-vs-all) under both."""
    cosines = np.sum(a * b, axis=1)
    k = min(10, len(a))
    top_a = np.argsort(-(a @ a.T), axis=1)[:, :k]
    top_b = np.argsort(-(b @ b.T), axis=1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)])
    return {"cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()), "top10_overlap": float(overlap)}


def encode_all(extractor, arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([extractor.encode_arrays(arrays[i : i + 16]) for i in range(0, len(arrays), 16)])


def runtime_rows(label, weights, calibration_folder, batch, arrays, seconds, capabilities, end_to_end) -> list[dict]:
    """One row per runtime x precision this CPU has (Keras fp32, OpenVINO fp32/bf16/int8): forward images/s on
    ``batch``, first build s, ``end_to_end(runtime, precision)`` images/s (None: not measured), and agreement of the
    vectors of ``arrays`` with Keras fp32's."""
    runs = [("keras", "float32"), ("openvino", "float32")]
    if "BF16" in capabilities:
        runs.append(("openvino", "bfloat16"))
    if "INT8" in capabilities:
        runs.append(("openvino", "int8"))
    rows, vectors = [], {}
    for runtime_name, precision in runs:
        print(f"  {label} {runtime_name} {precision} ...", flush=True)
        extractor, build_s = extractor_for(weights, precision, runtime_name, calibration_folder)
        row = {"runtime": runtime_name, "precision": precision,
               "forward_img_s": forward_rate(extractor, batch, seconds), "first_build_s": build_s}
        vectors[(runtime_name, precision)] = encode_all(extractor, arrays)
        del extractor
        rate = end_to_end(runtime_name, precision)
        if rate is not None:
            row["end_to_end_img_s"] = rate
        rows.append(row)
        print(f"    {row}", flush=True)
    reference = vectors[("keras", "float32")]
    for row in rows:
        row["agreement_with_keras_fp32"] = agreement(reference, vectors[(row["runtime"], row["precision"])])
    return rows


def vgg16_part(work: Path, quick: bool, seconds: float, capabilities: set[str]) -> dict:
    from retrieval.images import load_for_backbone
    from retrieval.models.backbones import custom_weights

    folder = work / "vgg-images"
    images = make_images(folder, 24 if quick else 64)
    weights_file = make_seeded_vgg16(work / "seeded_vgg16.weights.h5")
    weights = custom_weights("vgg16", weights_file)
    arrays = [load_for_backbone(p, 224) for p in images]
    batch = np.stack(arrays[:16])
    result = {"images": len(images), "gflop_per_image": VGG16_GFLOP}
    print("  VGG16 reference loop (Keras fp32, one predict() per image, decode included) ...", flush=True)
    result["reference_img_s"] = reference_loop(weights_file, images[: 6 if quick else 16])
    result["rows"] = runtime_rows(
        "VGG16", weights, folder, batch, arrays[:32], seconds, capabilities,
        lambda runtime_name, precision: index_end_to_end(
            folder, work / f"vgg-{runtime_name}-{precision}.h5", weights_file, "vgg16", precision, runtime_name
        ),
    )
    return result


def lite0_part(work: Path, quick: bool, seconds: float, capabilities: set[str]) -> dict:
    from retrieval.images import load_for_backbone
    from retrieval.models.backbones import efficientnet_lite0_weights

    weights = efficientnet_lite0_weights()
    demo = sorted((REPO / "database").rglob("*.jpg"))
    folder = work / "lite0-images"
    for path in demo:
        target = folder / path.relative_to(REPO / "database")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    arrays = [load_for_backbone(p, 224) for p in demo]
    batch = np.stack(arrays[:16])
    rows = runtime_rows(
        "EfficientNet-Lite0", weights, folder, batch, arrays, seconds, capabilities,
        lambda runtime_name, precision: index_end_to_end(
            folder, work / f"lite0-{runtime_name}-{precision}.h5", None, "efficientnet-lite0", precision, runtime_name
        ) if precision == "float32" or not quick else None,
    )
    return {"images": len(demo), "rows": rows}


# ------------------------------------------------------------------------------------------------ cold query


def cold_query(work: Path, repeats: int) -> dict:
    """Wall time of a fresh ``query_online.py`` (model cached) against ``python -c "import tensorflow"``,
    interleaved, medians."""
    from retrieval.indexing import build_index

    folder = work / "lite0-images"
    index_path = work / "cold.h5"
    with runtime_env("auto"):
        build_index(folder, index_path, backbone="efficientnet-lite0", precision="float32", progress=False,
                    notice=lambda _: None)
    query = sorted(folder.rglob("*.jpg"))[0]
    env = {**os.environ, "CBIR_RUNTIME": "auto", "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = {
        "query": [sys.executable, str(REPO / "query_online.py"), "--query", str(query), "--index", str(index_path), "-k", "5"],
        "import_tensorflow": [sys.executable, "-c", "import tensorflow"],
        "query_keras": [sys.executable, str(REPO / "query_online.py"), "--query", str(query), "--index", str(index_path), "-k", "5"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            run_env = {**env, "CBIR_RUNTIME": "keras"} if name == "query_keras" else env
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600)
            times[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed: {done.stderr[-500:]}")
    return {name: statistics.median(values) for name, values in times.items()} | {"repeats": repeats}


# ------------------------------------------------------------------------------------------------ search


def search_part(size: int, queries: int, bandwidth_gb_s: float) -> dict:
    """One-query latency at ``size`` x 512: exact float32 (numpy), float16 (faiss QT_fp16, the memory backend's
    path), 8-bit (faiss QT_8bit), each with recall@10 against exact float32 and its bandwidth bound."""
    import faiss

    from retrieval.search.backends.memory import MemoryBackend

    vectors = structured_vectors(size)
    qs = noisy_queries(vectors, queries)
    exact = MemoryBackend(vectors)
    truth = exact.search_batch(qs, 10)[0]
    half = MemoryBackend(vectors.astype(np.float16))
    half.search_batch(qs[:1], 10)  # builds its scanner
    eight = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    eight.train(vectors[:: max(1, size // 100_000)])
    for start in range(0, size, 65_536):
        eight.add(vectors[start : start + 65_536])

    def eight_search(q):
        return eight.search(q, 10)[1], None

    rows = {}
    for name, search, nbytes in (
        ("float32 exact (numpy matmul + top-k)", lambda q: exact.search_batch(q, 10), vectors.nbytes),
        ("float16 (faiss QT_fp16)", lambda q: half.search_batch(q, 10), vectors.nbytes // 2),
        ("8-bit (faiss QT_8bit)", eight_search, vectors.nbytes // 4),
    ):
        latencies = []
        found = []
        for i in range(queries):
            started = time.perf_counter()
            result = search(qs[i : i + 1])[0][0]
            latencies.append(time.perf_counter() - started)
            found.append(len(set(result.tolist()) & set(truth[i].tolist())) / 10)
        ms = 1000 * statistics.median(latencies)
        rows[name] = {"ms": ms, "recall10": float(np.mean(found)), "bytes": nbytes,
                      "bound_ms": 1000 * nbytes / (bandwidth_gb_s * 1e9)}
        print(f"  search {size:,}: {name}: {rows[name]}", flush=True)
    return {"n": size, "queries": queries, "rows": rows}


# ------------------------------------------------------------------------------------------------ report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: peaks,vgg16,lite0,cold,search")
    args = parser.parse_args(argv)
    quick = args.quick
    skip = set(filter(None, args.skip.split(",")))
    from retrieval.models.backbones import quiet_tensorflow
    from retrieval.models import runtime

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-"))
    os.environ["CBIR_MODEL_CACHE"] = str(work / "model-cache")  # conversions are measured, never taken from before
    os.environ.setdefault("RETRIEVAL_OFFLINE", "1")
    seconds = 2.0 if quick else 6.0
    results: dict = {"machine": machine(), "quick": quick}
    capabilities = set(results["machine"]["openvino_capabilities"])
    if not runtime.nncf_available():
        capabilities.discard("INT8")
    from retrieval.descriptors.encoder import resolve_precision

    results["auto"] = {backbone: resolve_precision("auto", backbone) for backbone in ("vgg16", "efficientnet-lite0")}
    print(f"machine: {results['machine']}; auto precision: {results['auto']}", flush=True)
    try:
        if "peaks" not in skip:
            print("peaks ...", flush=True)
            precisions = ["float32"] + [p for p, cap in (("bfloat16", "BF16"), ("int8", "INT8")) if cap in capabilities]
            results["gemm_gop_s"] = gemm_peaks(256 if quick else 512, seconds / 2, precisions)
            results["read_gb_s"] = read_bandwidth(256 if quick else 1024, seconds / 2)
            print(f"  GEMM GOP/s {results['gemm_gop_s']}, read {results['read_gb_s']:.1f} GB/s", flush=True)
        quiet_tensorflow()
        if "vgg16" not in skip:
            print("VGG16 ...", flush=True)
            results["vgg16"] = vgg16_part(work, quick, seconds, capabilities)
        if "lite0" not in skip:
            print("EfficientNet-Lite0 ...", flush=True)
            results["lite0"] = lite0_part(work, quick, seconds, capabilities)
        if "cold" not in skip and "lite0" not in skip:
            print("cold query ...", flush=True)
            results["cold_query_s"] = cold_query(work, 2 if quick else 3)
        if "search" not in skip:
            print("search ...", flush=True)
            results["search"] = search_part(100_000 if quick else 1_000_000, 20 if quick else 50,
                                            results.get("read_gb_s") or read_bandwidth(256, 1.0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    table = markdown(results)
    print("\n" + table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.md").write_text(table + "\n", encoding="utf-8")
    (OUT / "speed.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"\nwritten: {OUT / 'speed.md'}, speed.json ({results['seconds']:.0f} s)")
    return 0


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, ISA {' '.join(m['isa']) or '?'}; OpenVINO CPU capabilities "
        f"{', '.join(m['openvino_capabilities']) or 'none (not installed)'}; GPU: {m['gpu']}. "
        f"`--precision auto` picks: VGG16 {r['auto']['vgg16']}, EfficientNet-Lite0 {r['auto']['efficientnet-lite0']}."
        + (" (quick run)" if r["quick"] else ""),
        "",
    ]
    targets = []
    peaks = r.get("gemm_gop_s", {})
    if peaks:
        lines += ["| peak (OpenVINO, this CPU) | value |", "|---|---|"]
        lines.append("| (GEMM = a 3x3 convolution as VGG16 runs them, NNCF-quantized for int8) | |")
        for precision, rate in peaks.items():
            lines.append(f"| GEMM {precision} | {rate:.0f} GOP/s |")
        lines += [f"| memory read, all cores | {r['read_gb_s']:.1f} GB/s |", ""]
    if "vgg16" in r:
        v = r["vgg16"]
        ref = v["reference_img_s"]
        lines += [
            f"VGG16 at 224 (seeded weights, {v['images']} photo-sized JPEGs, {v['gflop_per_image']:.1f} GFLOP/image "
            "to block5_conv3):",
            "",
            "| runtime, precision | forward img/s | forward GFLOP/s (of GEMM peak) | index.py end to end img/s | x reference loop | cosine vs Keras fp32 min / mean | top-10 overlap | first run (conversion) |",
            "|---|---|---|---|---|---|---|---|",
            f"| reference loop: Keras fp32, one `predict()` per image, decode included | | | {ref:.2f} | 1.0x | | | |",
        ]
        for row in v["rows"]:
            gflops = row["forward_img_s"] * v["gflop_per_image"]
            peak = peaks.get(row["precision"])
            share = f" ({gflops / peak:.0%})" if peak else ""
            a = row["agreement_with_keras_fp32"]
            lines.append(
                f"| {row['runtime']} {row['precision']} | {row['forward_img_s']:.2f} | {gflops:.0f}{share} | "
                f"{row['end_to_end_img_s']:.2f} | {row['end_to_end_img_s'] / ref:.1f}x | {a['cosine_min']:.4f} / "
                f"{a['cosine_mean']:.4f} | {a['top10_overlap']:.3f} | {row['first_build_s']:.0f} s |"
            )
        chosen = [row for row in v["rows"] if row["precision"] == r["auto"]["vgg16"] and row["runtime"] == "openvino"]
        if chosen:
            speedup = chosen[0]["end_to_end_img_s"] / ref
            targets.append(f"| index.py end to end, VGG16 {r['auto']['vgg16']} (auto) vs the reference loop | "
                           f"{speedup:.1f}x | >= {TARGET_INDEX_SPEEDUP:.0f}x | {verdict(speedup >= TARGET_INDEX_SPEEDUP)} |")
        lines.append("")
    if "lite0" in r:
        l0 = r["lite0"]
        rows = {(row["runtime"], row["precision"]): row for row in l0["rows"]}
        keras = rows[("keras", "float32")]
        lines += [
            f"EfficientNet-Lite0 at 224 (real ImageNet weights, the {l0['images']} demo photos):",
            "",
            "| runtime, precision | forward img/s | x Keras fp32 | index.py end to end img/s | x Keras fp32 | cosine vs Keras fp32 min / mean | top-10 overlap |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in l0["rows"]:
            a = row["agreement_with_keras_fp32"]
            end = row.get("end_to_end_img_s")
            end_text = f"{end:.1f} | {end / keras['end_to_end_img_s']:.2f}x" if end else " | "
            lines.append(
                f"| {row['runtime']} {row['precision']} | {row['forward_img_s']:.1f} | "
                f"{row['forward_img_s'] / keras['forward_img_s']:.2f}x | {end_text} | {a['cosine_min']:.5f} / "
                f"{a['cosine_mean']:.5f} | {a['top10_overlap']:.3f} |"
            )
        ov = rows.get(("openvino", "float32"))
        if ov:
            speedup = ov["end_to_end_img_s"] / keras["end_to_end_img_s"]
            same = ov["agreement_with_keras_fp32"]["cosine_min"] >= 0.9999 and ov["agreement_with_keras_fp32"]["top10_overlap"] == 1.0
            targets.append(f"| EfficientNet-Lite0 index.py end to end, OpenVINO fp32 vs Keras fp32 (same results: "
                           f"{'yes' if same else 'no'}) | {speedup:.2f}x | >= {TARGET_LITE0_SPEEDUP:.0f}x | "
                           f"{verdict(speedup >= TARGET_LITE0_SPEEDUP and same)} |")
        lines.append("")
    if "cold_query_s" in r:
        c = r["cold_query_s"]
        ratio = c["query"] / c["import_tensorflow"]
        lines += [
            f"Cold terminal query (python start to printed ranking, demo database, median of {c['repeats']}):",
            "",
            "| command | seconds | x `import tensorflow` |",
            "|---|---|---|",
            f"| `python -c \"import tensorflow\"` | {c['import_tensorflow']:.2f} | 1.00x |",
            f"| `query_online.py`, cached OpenVINO model | {c['query']:.2f} | {ratio:.2f}x |",
            f"| `query_online.py`, CBIR_RUNTIME=keras | {c['query_keras']:.2f} | {c['query_keras'] / c['import_tensorflow']:.2f}x |",
            "",
        ]
        targets.append(f"| cold query_online.py vs bare TensorFlow import | {ratio:.2f}x | <= {TARGET_COLD_QUERY}x | "
                       f"{verdict(ratio <= TARGET_COLD_QUERY)} |")
    if "search" in r:
        s = r["search"]
        lines += [
            f"Search, one query at a time, {s['n']:,} x 512 (median of {s['queries']}; recall@10 against exact float32):",
            "",
            "| storage, search | ms | bandwidth bound ms | x bound | recall@10 |",
            "|---|---|---|---|---|",
        ]
        for name, row in s["rows"].items():
            lines.append(f"| {name} | {row['ms']:.1f} | {row['bound_ms']:.1f} | {row['ms'] / row['bound_ms']:.1f}x | {row['recall10']:.3f} |")
        fp32 = s["rows"]["float32 exact (numpy matmul + top-k)"]
        fp16 = s["rows"]["float16 (faiss QT_fp16)"]
        ratio = fp16["ms"] / fp32["ms"]
        targets.append(f"| float16 search at {s['n']:,} x 512 vs fp32 exact; recall@10 | {ratio:.2f}x; "
                       f"{fp16['recall10']:.3f} | <= {TARGET_FP16_SEARCH:.0f}x; >= {TARGET_FP16_RECALL} | "
                       f"{verdict(ratio <= TARGET_FP16_SEARCH and fp16['recall10'] >= TARGET_FP16_RECALL)}"
                       f"{'' if s['n'] >= 1_000_000 else ' (at the quick size)'} |")
        lines.append("")
    if targets:
        lines += ["| target (issue 14) | measured | target | |", "|---|---|---|---|", *targets]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
