#!/usr/bin/env python3
"""Speed benchmark: indexing, query and search, measured side by side in one run, printed as ratios.

    python -m bench.run --quick     # < 2 minutes
    python -m bench.run             # < 15 minutes (adds 1M-vector search and a batch-size sweep)

Generates its own images (seeded, photo-sized JPEGs) and seeded VGG16 weights saved to a file (weights do not change
speed). Writes bench/out/speed.md, speed.json and speed.png (search latency against database size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from retrieval.models.backbones import quiet_tensorflow

OUT = REPO / "bench" / "out"


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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


# ------------------------------------------------------------------------------------------------ timing


def images_per_second(function, batch: np.ndarray, minimum_images: int) -> float:
    function(batch)  # warm-up (first call of a shape builds kernels)
    done, started = 0, time.perf_counter()
    while done < minimum_images:
        function(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ parts


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


def bare_forward_rate(extractor, batch_size: int, images: int) -> float:
    """Compiled forward + pooling on already decoded, resized images (no I/O): the model's own throughput."""
    batch = np.random.default_rng(3).integers(0, 255, (batch_size, 224, 224, 3), dtype=np.uint8)
    return images_per_second(extractor.encode_arrays, batch, images)


def server_search_ms(index_path: Path, engine, query_path: Path, requests: int) -> float:
    """Median time of POST /api/search against the real waitress server (loopback HTTP), model warmed at start."""
    import waitress

    from retrieval.web import create_app

    app = create_app(index_path, engine=engine)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    port = server.effective_port
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + query_path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()

    def post():
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/search", data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            json.loads(response.read())

    try:
        return median_ms(post, requests)
    finally:
        server.close()


def precision_agreement(paths: list[Path]) -> dict:
    """bf16 against fp32 descriptors of real images with real weights (EfficientNet-Lite0): cosine and top-10 overlap."""
    from retrieval.models.backbones import efficientnet_lite0_weights
    from retrieval.descriptors.encoder import new_encoder_config
    from retrieval.descriptors.extractor import Extractor
    from retrieval.images import load_for_backbone

    weights = efficientnet_lite0_weights()
    arrays = [load_for_backbone(p, 224) for p in paths]
    vectors = {}
    for precision in ("float32", "bfloat16"):
        extractor = Extractor(new_encoder_config(weights, "max", precision), weights)
        vectors[precision] = np.concatenate([extractor.encode_arrays(arrays[i : i + 16]) for i in range(0, len(arrays), 16)])
    cosines = np.sum(vectors["float32"] * vectors["bfloat16"], axis=1)
    overlap = []
    for i in range(len(paths)):
        top32 = np.argsort(-(vectors["float32"] @ vectors["float32"][i]))[:10]
        top16 = np.argsort(-(vectors["bfloat16"] @ vectors["bfloat16"][i]))[:10]
        overlap.append(len(set(top32) & set(top16)) / 10)
    return {"images": len(paths), "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()), "top10_overlap": float(np.mean(overlap))}


def vgg_agreement(weights_file: Path, arrays: list[np.ndarray], bf16_extractor) -> float:
    from retrieval.models.backbones import custom_weights
    from retrieval.descriptors.encoder import new_encoder_config
    from retrieval.descriptors.extractor import Extractor

    weights = custom_weights("vgg16", weights_file)
    fp32 = Extractor(new_encoder_config(weights, "max", "float32"), weights)
    a, b = fp32.encode_arrays(arrays), bf16_extractor.encode_arrays(arrays)
    return float(np.min(np.sum(a * b, axis=1)))


def search_part(sizes: list[int], hnsw_sizes: list[int], queries: int = 200) -> list[dict]:
    """Exact float32 / float16 and HNSW latency and recall@10 at each database size."""
    from retrieval.vectors import top_k
    from retrieval.vector_index import ExactIndex, HnswIndex

    rows = []
    for size in sizes:
        vectors = structured_vectors(size)
        qs = noisy_queries(vectors, queries)
        exact = ExactIndex(vectors)
        truth = [set(top_k(vectors, q, 10)[0]) for q in qs]
        row = {"n": size, "exact_ms": median_ms(lambda: exact.search(qs[0], 10), 30)}
        half = ExactIndex(vectors.astype(np.float16))
        row["float16_ms"] = median_ms(lambda: half.search(qs[0], 10), 5)
        row["float16_recall10"] = float(np.mean([len(set(half.search(q, 10)[0]) & t) / 10 for q, t in zip(qs[:20], truth)]))
        full_sort = median_ms(lambda: np.argsort(-(vectors @ qs[0]))[:10], 5)
        row["full_sort_ms"] = full_sort
        if size in hnsw_sizes:
            started = time.perf_counter()
            graph = HnswIndex.build(vectors)
            row["hnsw_build_s"] = time.perf_counter() - started
            latencies = []
            found = []
            for q, t in zip(qs, truth):
                begun = time.perf_counter()
                result = graph.search(q, 10)[0]
                latencies.append((time.perf_counter() - begun) * 1000)
                found.append(len(set(result) & t) / 10)
            row["hnsw_ms"] = statistics.median(latencies)
            row["hnsw_recall10"] = float(np.mean(found))
        rows.append(row)
        print(f"  search n={size:,}: {row}", flush=True)
    return rows


def memory_part(size: int, folder: Path) -> dict:
    """Peak Python-visible allocation while reading a database of ``size`` x 512, against the matrix itself."""
    from retrieval.descriptors.encoder import EncoderConfig
    from retrieval.storage.database import FeatureDatabase, read_database, write_database

    vectors = structured_vectors(size, seed=5)
    encoder = EncoderConfig("vgg16", "bench", "md5:0", "block5_conv3", "max", 224, "squash-bicubic", "float32", 512)
    results = {}
    for dtype in ("float32", "float16"):
        path = folder / f"memory-{dtype}.h5"
        write_database(path, FeatureDatabase(encoder, vectors.astype(dtype), [f"{i}.jpg" for i in range(size)],
                                             np.zeros(size, np.int64), np.zeros(size, np.int64)))
        tracemalloc.start()
        database = read_database(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[dtype] = {"matrix_mb": database.vectors.nbytes / 1e6, "peak_mb": peak / 1e6}
        del database
    return results


# ------------------------------------------------------------------------------------------------ report


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    from retrieval.vector_index import HNSW_EF_SEARCH, HNSW_M

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    sizes = [r["n"] for r in rows]
    axis.plot(sizes, [r["exact_ms"] for r in rows], "o-", label="exact float32 (argpartition)")
    axis.plot(sizes, [r["float16_ms"] for r in rows], "s-", label="exact float16 storage")
    axis.plot(sizes, [r["full_sort_ms"] for r in rows], "x--", label="full sort (reference)")
    hnsw = [r for r in rows if "hnsw_ms" in r]
    if hnsw:
        axis.plot([r["n"] for r in hnsw], [r["hnsw_ms"] for r in hnsw], "^-", label=f"faiss HNSW (M={HNSW_M}, ef={HNSW_EF_SEARCH})")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("database size (512-d vectors)")
    axis.set_ylabel("single-query latency, ms (median)")
    axis.set_title("Search latency, k=10")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (< 2 minutes)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size to compare at (default: the extractor default)")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from retrieval.models.backbones import custom_weights
    from retrieval.engine import RetrievalEngine
    from retrieval.descriptors.encoder import new_encoder_config, resolve_precision
    from retrieval.descriptors.extractor import DEFAULT_BATCH_SIZE, Extractor
    from retrieval.indexing import build_index
    from retrieval.images import load_for_backbone

    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    quick = args.quick
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-"))
    results: dict = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count()}}
    try:
        print("preparing images and seeded VGG16 weights ...", flush=True)
        images = make_images(work / "images", 48 if quick else 160)
        weights_file = make_seeded_vgg16(work / "seeded_vgg16.weights.h5")
        weights = custom_weights("vgg16", weights_file)
        precision = resolve_precision("auto", "vgg16")
        results["precision"] = precision
        extractor = Extractor(new_encoder_config(weights, "max", precision), weights)

        print("reference loop (fp32, one predict() per image) ...", flush=True)
        reference = reference_loop(weights_file, images[: 8 if quick else 24])
        print("bare compiled forward ...", flush=True)
        bare = bare_forward_rate(extractor, batch_size, 32 if quick else 64)
        fp32_extractor = Extractor(new_encoder_config(weights, "max", "float32"), weights)
        bare_fp32 = bare_forward_rate(fp32_extractor, batch_size, 16 if quick else 48)
        del fp32_extractor
        sweep = {}
        if not quick:
            for size in (1, 4, 8, 16, 32):
                sweep[size] = bare_forward_rate(extractor, size, max(32, size * 2))
                print(f"  batch {size}: {sweep[size]:.1f} img/s", flush=True)
        print("end-to-end indexing ...", flush=True)
        report = build_index(work / "images", work / "bench.h5", backbone="vgg16", weights_file=weights_file,
                             precision=precision, batch_size=batch_size, progress=False, notice=lambda _: None)
        end_to_end = report.extracted / report.extract_seconds
        print("query: bare forward of one image against the server's median request ...", flush=True)
        query = load_for_backbone(images[0], 224)[None]
        forward_one = median_ms(lambda: extractor.encode_arrays(query), 15 if quick else 30)
        engine = RetrievalEngine.open(work / "bench.h5")
        request_ms = server_search_ms(work / "bench.h5", engine, images[0], 50)
        print("bf16 against fp32 ...", flush=True)
        demo = sorted((REPO / "database").rglob("*.jpg"))
        agreement = precision_agreement(demo)
        agreement["vgg16_seeded_cosine_min"] = vgg_agreement(weights_file, [load_for_backbone(p, 224) for p in images[:8]], extractor)
        print("search ...", flush=True)
        sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
        hnsw_sizes = [100_000] if quick else [100_000, 1_000_000]
        search_rows = search_part(sizes, hnsw_sizes)
        memory = memory_part(100_000, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results.update({
        "batch_size": batch_size,
        "reference_img_s": reference,
        "bare_forward_img_s": bare,
        "bare_forward_fp32_img_s": bare_fp32,
        "end_to_end_img_s": end_to_end,
        "batch_sweep_img_s": sweep,
        "forward_one_ms": forward_one,
        "server_request_ms": request_ms,
        "agreement": agreement,
        "search": search_rows,
        "memory": memory,
        "seconds": time.perf_counter() - started,
    })
    table = markdown(results)
    print("\n" + table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.md").write_text(table + "\n", encoding="utf-8")
    (OUT / "speed.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_plot(search_rows, OUT / "speed.png")
    print(f"\nwritten: {OUT / 'speed.md'}, speed.json, speed.png ({results['seconds']:.0f} s)")
    return 0


def markdown(r: dict) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    speedup = r["end_to_end_img_s"] / r["reference_img_s"]
    efficiency = r["end_to_end_img_s"] / r["bare_forward_img_s"]
    query_ratio = r["server_request_ms"] / r["forward_one_ms"]
    largest = r["search"][-1]
    lines = [
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; VGG16 224x224, precision {r['precision']}, batch {r['batch_size']}.",
        "",
        "| measure | value | ratio | target |",
        "|---|---|---|---|",
        f"| reference loop (fp32, one `predict()` per image) | {r['reference_img_s']:.2f} img/s | 1.0x | |",
        f"| bare compiled forward, fp32, batch {r['batch_size']} | {r['bare_forward_fp32_img_s']:.2f} img/s | {r['bare_forward_fp32_img_s'] / r['reference_img_s']:.1f}x | |",
        f"| bare compiled forward, {r['precision']}, batch {r['batch_size']} | {r['bare_forward_img_s']:.2f} img/s | {r['bare_forward_img_s'] / r['reference_img_s']:.1f}x | |",
        f"| end-to-end indexing (decode, resize, forward, pool, checkpoint) | {r['end_to_end_img_s']:.2f} img/s | **{speedup:.1f}x** reference | >= 8x: {verdict(speedup >= 8)} |",
        f"| pipeline efficiency: end-to-end / bare forward | | **{efficiency:.0%}** | >= 85%: {verdict(efficiency >= 0.85)} |",
        f"| one bare forward pass, one image | {r['forward_one_ms']:.1f} ms | 1.0x | |",
        f"| server search request (median of 50, HTTP) | {r['server_request_ms']:.1f} ms | **{query_ratio:.2f}x** forward | <= 1.5x: {verdict(query_ratio <= 1.5)} |",
    ]
    for row in r["search"]:
        lines.append(f"| exact search, {row['n']:,} x 512 float32 (full sort: {row['full_sort_ms']:.1f} ms) | {row['exact_ms']:.2f} ms | | |")
    lines.append(f"| exact search at {largest['n']:,} | {largest['exact_ms']:.1f} ms | | <= ~100 ms at 1M: {verdict(largest['n'] < 1_000_000 or largest['exact_ms'] <= 100)} |")
    for row in r["search"]:
        if "hnsw_ms" in row:
            ok = row["hnsw_ms"] < 2 and row["hnsw_recall10"] >= 0.95
            lines.append(
                f"| faiss HNSW at {row['n']:,} (build {row['hnsw_build_s']:.0f} s) | {row['hnsw_ms']:.2f} ms, recall@10 {row['hnsw_recall10']:.3f} | "
                f"{row['exact_ms'] / row['hnsw_ms']:.0f}x faster than exact | < 2 ms, >= 0.95: {verdict(ok)} |"
            )
    lines.append(f"| float16 storage at {largest['n']:,}: recall@10 vs float32 | {largest['float16_recall10']:.3f} ({largest['float16_ms']:.1f} ms) | | |")
    for dtype, m in r["memory"].items():
        lines.append(f"| loading 100,000 x 512 {dtype}: peak allocation / matrix | {m['peak_mb']:.0f} MB / {m['matrix_mb']:.0f} MB | {m['peak_mb'] / m['matrix_mb']:.2f}x | one matrix, no copies |")
    a = r["agreement"]
    lines.append(
        f"| bf16 vs fp32, EfficientNet-Lite0 ImageNet weights, {a['images']} demo photos | cosine min {a['cosine_min']:.4f}, mean {a['cosine_mean']:.4f}; top-10 overlap {a['top10_overlap']:.3f} | | |"
    )
    lines.append(f"| bf16 vs fp32, VGG16 seeded weights | cosine min {a['vgg16_seeded_cosine_min']:.5f} | | |")
    if r["batch_sweep_img_s"]:
        sweep = ", ".join(f"{size}: {rate:.1f}" for size, rate in r["batch_sweep_img_s"].items())
        lines.append(f"| batch-size sweep, bare forward img/s | {sweep} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
