#!/usr/bin/env python3
"""Scale benchmark: the search backends on generated vectors, and Ray extraction against one process.

    python -m bench.scale --quick     # 100k vectors (< 3 minutes on 2 cores)
    python -m bench.scale             # 100k and 1M vectors

Search: for each backend (memory = exact numpy, faiss HNSW, faiss IVF-Flat, Milvus Lite HNSW, a Milvus standalone\nserver HNSW on loopback) its build time, the
memory it adds to a process that already holds the matrix (peak while building, and resident after), its size on
disk, single-query latency p50/p95 (one query per call, as the server searches) and recall@10 against exact search.
Each backend runs in a fresh subprocess, so memory figures are its own. The structures are built by the project's own
code (``FaissBackend.build``, ``MilvusBackend.prepare``), searched through the backends the engine uses. The Milvus\nserver's memory is its own processes', not counted in RSS.

Vectors look like CNN descriptors rather than Gaussian noise: non-negative, of low intrinsic dimension (ReLU of a
random 24-d latent projected to 512-d, plus small noise), L2-normalised; queries come from the same distribution
(none is in the database).

Extraction: index.py's path (``build_index``, EfficientNet-Lite0) over the same photo folder, one process against
``--ray`` on a local Ray instance; wall time includes what each needs to start (Ray: the instance and the actors'
models). Prints one Markdown table and writes bench/out/scale.md (and scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
DIM, LATENT, K, QUERIES = 512, 24, 10, 200
BACKENDS = ("memory", "faiss-hnsw", "faiss-ivf", "milvus-lite-hnsw", "milvus-server-hnsw")


# ------------------------------------------------------------------------------------------------ data


def cnn_like_vectors(count: int, seed: int, block: int = 100_000) -> np.ndarray:
    """float32 (count, 512): ReLU(z W + b) + small noise, z ~ N(0, I_24), unit rows. W, b fixed (seed 0)."""
    basis_rng = np.random.default_rng(0)
    weights = basis_rng.normal(size=(LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    bias = basis_rng.normal(scale=0.3, size=DIM).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), np.float32)
    for start in range(0, count, block):
        n = min(block, count - start)
        x = np.maximum(rng.standard_normal((n, LATENT), dtype=np.float32) @ weights + bias, 0)
        x += np.abs(rng.normal(scale=0.02, size=(n, DIM))).astype(np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_truth(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ matrix.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def folder_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


# ------------------------------------------------------------------------------------------------ one backend


def run_backend(backend: str, data: Path, queries_file: Path, truth_file: Path, work: Path) -> dict:
    """In a fresh process: build ``backend`` over the matrix, search every query, measure."""
    matrix = np.load(data)
    queries, truth = np.load(queries_file), np.load(truth_file)
    base_rss = rss_mb()
    started = time.perf_counter()
    disk = 0.0
    detail = ""
    if backend == "memory":
        from retrieval.search.backends.memory import MemoryBackend

        index = MemoryBackend(matrix)
    elif backend.startswith("faiss"):
        from retrieval.search.backends.faiss import FaissBackend

        index = FaissBackend.build(matrix, backend.split("-")[1])
        index.save(work / "bench.h5", "x")
        disk = sum(folder_mb(p) for p in work.glob("bench.h5.x.faiss*"))
        detail = ", ".join(f"{k} {v}" for k, v in index.settings.items() if k != "kind")
    else:
        index, disk, detail = milvus_index(backend, matrix, work)
    build_s = time.perf_counter() - started
    latencies, found = [], []
    for query, expected in zip(queries, truth):
        t0 = time.perf_counter()
        rows, _ = index.search(query, K)
        latencies.append((time.perf_counter() - t0) * 1000)
        found.append(len(set(rows.tolist()) & set(expected.tolist())) / K)
    latencies.sort()
    return {
        "backend": backend,
        "vectors": int(matrix.shape[0]),
        "build_s": build_s,
        "rss_added_mb": max(0.0, rss_mb() - base_rss),
        "matrix_mb": matrix.nbytes / 2**20,
        "disk_mb": disk,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
        "recall10": float(np.mean(found)),
        "detail": detail,
    }


def milvus_index(backend: str, matrix: np.ndarray, work: Path):
    """(open backend, disk MB, settings) of a Milvus collection filled by the project's own sync: Milvus Lite in this
    process, or a Milvus standalone server started here (tools/milvus_server.py, data in ``work``)."""
    from retrieval.descriptors.encoder import EncoderConfig
    from retrieval.search.backends import BackendRequest, SyncJob
    from retrieval.search.backends.milvus import MilvusBackend
    from retrieval.storage.database import FeatureDatabase

    index_path = work / "bench.h5"
    options = {}
    if backend == "milvus-server-hnsw":
        from tools.milvus_server import MilvusServer, find_server_executable

        os.environ.setdefault("MILVUS_SERVER_VENV", str(REPO / ".milvus-server"))  # scripts/setup.sh --dev makes it
        server = MilvusServer(find_server_executable() or "milvus-server", work / "milvus-data")
        server.start()
        import atexit

        atexit.register(server.stop)
        options["milvus_uri"] = server.uri
    record = BackendRequest("milvus", options).resolve(index_path, None)
    encoder = EncoderConfig("synthetic", "none", "md5:0", "none", "max", 224, "squash-bicubic", "float32", DIM)
    count = matrix.shape[0]
    database = FeatureDatabase(
        encoder=encoder, vectors=matrix, paths=[f"img/{i:07d}.jpg" for i in range(count)],
        file_sizes=np.ones(count, np.int64), file_mtimes_ns=np.ones(count, np.int64), database_id="x",
        search_backend=record,
    )
    MilvusBackend.prepare(SyncJob(index_path, database, "x", matrix, notice=lambda line: None), record)
    index = MilvusBackend.open(index_path, database, matrix, record)
    disk = folder_mb(work / "bench.h5.milvus.db") if backend == "milvus-lite-hnsw" else folder_mb(work / "milvus-data")
    detail = ", ".join(f"{k} {v}" for k, v in {**record["index_params"], **record["search_params"]}.items())
    return index, disk, detail


def search_part(sizes: list[int], timeout: int, backends=BACKENDS) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        queries = cnn_like_vectors(QUERIES, seed=99)
        np.save(tmp / "queries.npy", queries)
        for size in sizes:
            started = time.perf_counter()
            matrix = cnn_like_vectors(size, seed=1)
            np.save(tmp / "data.npy", matrix)
            np.save(tmp / "truth.npy", exact_truth(matrix, queries))
            del matrix
            print(f"{size:,} vectors generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            for backend in backends:
                work = tmp / backend
                work.mkdir()
                command = [sys.executable, "-m", "bench.scale", "--worker", backend, "--data", str(tmp / "data.npy"),
                           "--queries", str(tmp / "queries.npy"), "--truth", str(tmp / "truth.npy"), "--work", str(work)]
                try:
                    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
                except subprocess.TimeoutExpired:
                    rows.append({"backend": backend, "vectors": size, "error": f"over {timeout} s"})
                    print(f"  {backend}: over {timeout} s", file=sys.stderr)
                    continue
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                if result.returncode != 0:
                    rows.append({"backend": backend, "vectors": size, "error": result.stderr.strip().splitlines()[-1]})
                    print(f"  {backend}: failed: {result.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {backend}: build {row['build_s']:.1f} s, p50 {row['p50_ms']:.2f} ms, "
                      f"recall@10 {row['recall10']:.3f}", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------ extraction


def extraction_part(copies: int) -> list[dict]:
    """build_index over the demo photos (``copies`` copies of each), one process against Ray on this machine."""
    from retrieval.indexing import build_index
    from retrieval.indexing import extract as extract_stage

    stamps: dict = {}
    original = extract_stage.encoded_batches

    def timed_batches(plan):
        """index.py's own batches, through a generator that notes when the first and last results come."""
        files, batches, mode = original(plan)

        def timed():
            count = 0
            for items in batches:
                if count == 0:
                    stamps.update(first=time.perf_counter(), first_count=len(items))
                count += len(items)
                yield items
            stamps.update(end=time.perf_counter(), count=count)
        return files, timed(), mode

    extract_stage.encoded_batches = timed_batches
    os.environ.setdefault("RETRIEVAL_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        photos = sorted(p for p in (REPO / "database").rglob("*.jpg"))
        for copy in range(copies):
            for i, photo in enumerate(photos):
                shutil.copy(photo, folder / f"{copy:02d}-{i:03d}.jpg")
        for mode in ("one process", "ray (local)"):
            started = time.perf_counter()
            report = build_index(
                folder, Path(tmp) / f"{mode.split()[0]}.h5", backbone="efficientnet-lite0", progress=False,
                notice=lambda line: None, ray="local" if mode.startswith("ray") else None,
            )
            wall = time.perf_counter() - started
            steady = (stamps["count"] - stamps["first_count"]) / max(stamps["end"] - stamps["first"], 1e-9)
            rows.append({
                "mode": mode, "images": report.extracted, "wall_s": wall, "wall_img_s": report.extracted / wall,
                "extract_s": report.extract_seconds, "extract_img_s": report.extracted / max(report.extract_seconds, 1e-9),
                "first_result_s": stamps["first"] - started, "steady_img_s": steady,
            })
            print(f"  extraction, {mode}: {report.extracted} images in {wall:.1f} s", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------ report


def table(search: list[dict], extraction: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## Scale benchmark ({os.cpu_count()} CPUs, {cpu}; {DIM}-d CNN-like vectors, {QUERIES} queries, k = {K})",
        "",
        "| vectors | backend | build s | RSS MB added | disk MB | p50 ms | p95 ms | recall@10 | settings |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in search:
        if "error" in row:
            lines.append(f"| {row['vectors']:,} | {row['backend']} | failed: {row['error']} | | | | | | |")
            continue
        lines.append(
            f"| {row['vectors']:,} | {row['backend']} | {row['build_s']:.1f} | {row['rss_added_mb']:.0f} | "
            f" {row['disk_mb']:.0f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
            f"{row['recall10']:.3f} | {row['detail']} |"
        )
    if search:
        matrix = {row["vectors"]: row["matrix_mb"] for row in search if "matrix_mb" in row}
        lines.append("")
        lines.append("RSS MB added: resident memory of the process after building and searching, above the matrix "
                     "itself, which every backend's process holds (and the HDF5 file keeps): "
                     + ", ".join(f"{mb:.0f} MB at {n:,}" for n, mb in matrix.items()) + ". Milvus Lite 3.2 is a "
                     "pure-Python engine in the process (its own copy of the data; each search also walks every row "
                     "in Python to mask deleted ones, so its latency grows with N): the numbers of a Milvus server "
                     "differ; its recall is the index's.")
    if extraction:
        base = extraction[0]
        lines += [
            "",
            f"| extraction ({base['images']} photos, EfficientNet-Lite0) | wall s | img/s (wall) | first result after s "
            "| img/s after the first result | wall vs one process |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in extraction:
            lines.append(
                f"| {row['mode']} | {row['wall_s']:.1f} | {row['wall_img_s']:.1f} | {row['first_result_s']:.1f} | "
                f"{row['steady_img_s']:.1f} | {row['wall_s'] / base['wall_s']:.2f}x |"
            )
        lines.append("")
        lines.append("Wall: the whole build_index run. First result: one process builds its model, Ray starts a local "
                     "instance, its actor builds the model and the first batch comes back. After that: the steady rate.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Search backends and Ray extraction at scale.")
    parser.add_argument("--quick", action="store_true", help="100k vectors only (< 3 minutes)")
    parser.add_argument("--sizes", help="comma-separated vector counts (default: 100000 with --quick, else 100000,1000000)")
    parser.add_argument("--copies", type=int, help="copies of the demo photos for the extraction part (default 2 with --quick, else 4)")
    parser.add_argument("--no-extraction", action="store_true", help="skip the Ray extraction part")
    parser.add_argument("--update", action="store_true",
                        help="merge into bench/out/scale.json: rows measured now replace the same (vectors, backend) rows")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per backend and size (default 3600)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_backend(args.worker, args.data, args.queries, args.truth, args.work)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([100_000] if args.quick else [100_000, 1_000_000])
    started = time.perf_counter()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    search = search_part(sizes, args.timeout, backends)
    extraction = [] if args.no_extraction else extraction_part(args.copies or (2 if args.quick else 4))
    if args.update and (OUT / "scale.json").exists():
        earlier = json.loads((OUT / "scale.json").read_text(encoding="utf-8"))
        measured = {(row["vectors"], row["backend"]) for row in search}
        search = sorted(
            [row for row in earlier["search"] if (row["vectors"], row["backend"]) not in measured] + search,
            key=lambda row: (row["vectors"], BACKENDS.index(row["backend"])),
        )
        extraction = extraction or earlier["extraction"]
    text = table(search, extraction)
    text += f"\n\n`python -m bench.scale {' '.join(argv if argv is not None else sys.argv[1:])}`, {time.perf_counter() - started:.0f} s."
    if args.update:
        text += " Rows it did not measure come from the earlier runs kept in bench/out/scale.json."
    text += "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.md").write_text(text, encoding="utf-8")
    (OUT / "scale.json").write_text(json.dumps({"search": search, "extraction": extraction}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
