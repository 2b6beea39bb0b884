#!/usr/bin/env python3
"""Query latency with copy search and verification, through the real server.py over HTTP, at 10,000 images.

    python -m bench.verification            # 10,000 images, 60 queries per mode (about 10 minutes on 2 cores)
    python -m bench.verification --quick    # 2,000 images, 20 queries per mode

The database: the copy-detection set's references (``bench/copy_detection.py``, 60 originals + 500 distractors)
indexed by index.py ``--preset copy-detection``, then grown to the target size by repeating those rows under new paths
(global vectors and regions with a little noise so that no two rows tie, local features as they are). What a query
costs depends on the database size through the global and regional search (linear in the rows) and on the
verification of a fixed top 100, so repeated rows measure the same work as distinct images would.

Queries: the set's edited copies (screenshots, crops, captions...), uploaded as files by ``POST /api/search`` on one
keep-alive connection, one at a time, as the page does. Three modes side by side on the same queries: classic (the
same rows without copy features: one global vector per image), copy search without verification (``verify=0``: global
vector, query windows and regions), and copy search with verification (the preset's default); and the last again with
the same copies uploaded photo-sized (enlarged to ``PHOTO_SIDE`` px on their longest side, JPEG), as a phone sends
them. Reports p50 / p95 wall time per request and the server's own ``took_ms``, the ratios to classic, and bytes per
image of the stored copy features. Writes bench/out/verification.md (and .json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from bench.run import machine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
NOISE = 0.01  # per-coordinate noise added to repeated vectors (then re-normalised): no ties, same neighbourhoods
PHOTO_SIDE = 4032  # photo-sized uploads: the copies enlarged to a 12-megapixel phone photo's longest side


def run(*args, timeout: int = 3600) -> None:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, args[:2]))} failed: {done.stderr.strip().splitlines()[-1:]}")


def grown(database, count: int, seed: int = 0):
    """``database`` repeated to ``count`` rows under new paths, vectors and regions jittered; copy features kept."""
    from retrieval.indexing.commit import with_visual_words
    from retrieval.storage.copy_features import CopyFeatures
    from retrieval.vectors import l2_normalize

    rng = np.random.default_rng(seed)
    source, repeat = np.arange(count) % len(database), np.arange(count) // len(database)

    def jitter(rows, again: int) -> np.ndarray:
        rows = np.asarray(rows, np.float32)
        return l2_normalize(rows + rng.normal(scale=NOISE, size=rows.shape).astype(np.float32)) if again else rows

    copies = database.copies
    vectors = np.stack([jitter(database.vectors[s], r) for s, r in zip(source, repeat)])
    regions = [jitter(copies.regions_of(int(s)), r) for s, r in zip(source, repeat)]
    local = [copies.local_of(int(s)) for s in source]
    paths = [database.paths[s] if r == 0 else f"_repeat{r:03d}/{database.paths[s]}" for s, r in zip(source, repeat)]
    order = np.argsort(paths, kind="stable")
    fields = dict(database.__dict__)
    fields.update(
        vectors=vectors[order].astype(database.vectors.dtype), paths=[paths[i] for i in order],
        file_sizes=np.asarray(database.file_sizes)[source][order],
        file_mtimes_ns=np.asarray(database.file_mtimes_ns)[source][order],
        image_sizes=None if database.image_sizes is None else np.asarray(database.image_sizes)[source][order],
        copies=with_visual_words(CopyFeatures.assemble(
            [regions[i] for i in order], [local[i] for i in order], database.encoder.dim,
            verify_default=copies.verify_default, pages=[copies.is_page(int(source[i])) for i in order],
        )),  # with its visual words, as index.py stores them at this size
        database_id="",
    )
    return type(database)(**fields)


def grown_classic(database, count: int):
    fields = dict(grown(database, count).__dict__)
    fields.update(copies=None, database_id="")
    return type(database)(**fields)


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def search(self, path: Path, verify: str | None) -> tuple[float, dict]:
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        query = "/api/search?k=10" + (f"&verify={verify}" if verify is not None else "")
        started = time.perf_counter()
        self.connection.request("POST", query, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = self.connection.getresponse()
        payload = json.loads(response.read())
        wall = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise SystemExit(f"error: the server answered {response.status}: {payload.get('error')}")
        return wall, payload


def photo_sized(queries: list[Path], folder: Path) -> list[Path]:
    """``queries`` enlarged (bicubic) so that their longest side is ``PHOTO_SIDE``, as JPEG files (quality 90) in
    ``folder``: what an upload from a phone costs to decode and read, with the same content."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, path in enumerate(queries):
        image = Image.open(path).convert("RGB")
        scale = PHOTO_SIDE / max(image.size)
        target = folder / f"{n:03d}-{path.stem}.jpg"
        image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(target)
    return out


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def measure(url: str, queries: list[Path], verify: str | None, warmup: int = 3) -> dict:
    client = Client(url)
    for path in queries[:warmup]:
        client.search(path, verify)
    walls, server, encode, search, verified = [], [], [], [], 0
    for path in queries:
        wall, payload = client.search(path, verify)
        walls.append(wall)
        server.append(payload["took_ms"])
        encode.append(payload["timing"]["encode_ms"])
        search.append(payload["timing"]["search_ms"])
        verified += any(hit.get("verified") for hit in payload["results"])
    return {"p50_ms": statistics.median(walls), "p95_ms": percentile(walls, 95), "server_p50_ms": statistics.median(server),
            "encode_p50_ms": statistics.median(encode), "search_p50_ms": statistics.median(search),
            "queries": len(queries), "queries_with_a_verified_hit": verified}


def served(index: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """server.py on a free port around ``index``; (process, base URL) once it listens."""
    log_path = work / f"{index.stem}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "server.py", "--port", "0", "--index", str(index), "--threads", "4"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (match := re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log_path.read_text(errors="replace"))):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"error: server.py did not start; see {log_path}")
        time.sleep(0.2)
    return process, match.group(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images, 20 queries per mode")
    parser.add_argument("--size", type=int, help="database images (default 10,000; 2,000 with --quick)")
    parser.add_argument("--queries", type=int, help="queries per mode (default 60; 20 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the set and the indexes)")
    args = parser.parse_args(argv)
    size = args.size or (2_000 if args.quick else 10_000)
    count = args.queries or (20 if args.quick else 60)

    from retrieval.storage.database import read_database, write_database

    work = Path(tempfile.mkdtemp(prefix="bench-verification-"))
    print(f"work folder: {work}{'' if args.keep else ' (removed at the end; --keep keeps it)'}", flush=True)
    try:
        run("-m", "bench.copy_detection", work / "set", *(["--quick"] if args.quick else []))
        references, queries_dir = work / "set" / "references", work / "set" / "queries"
        print("indexing the references with --preset copy-detection ...", flush=True)
        started = time.perf_counter()
        run("index.py", "--database", references, "--index", work / "copies.h5", "--preset", "copy-detection",
            "--backbone", "efficientnet-lite0", "--quiet")
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
        base = read_database(work / "copies.h5")
        write_database(work / "copies-grown.h5", grown(base, size))
        write_database(work / "classic-grown.h5", grown_classic(base, size))
        grown_db = read_database(work / "copies-grown.h5")
        stored = {"local_kb_per_image": grown_db.copies.local_bytes_per_image() / 1024,
                  "regions_kb_per_image": grown_db.copies.region_bytes_per_image() / 1024}
        rng = np.random.default_rng(0)
        edits = sorted(queries_dir.rglob("*.jpg"))
        queries = [edits[i] for i in sorted(rng.choice(len(edits), size=min(count, len(edits)), replace=False))]

        photos = photo_sized(queries, work / "photo-sized")
        rows = []
        for label, index, verify, uploads in (
            ("classic (global MAX only)", work / "classic-grown.h5", None, queries),
            ("copy search, no verification (verify=0)", work / "copies-grown.h5", "0", queries),
            ("copy search + verification (the preset's default)", work / "copies-grown.h5", None, queries),
            (f"the same, photo-sized uploads ({PHOTO_SIDE:,} px JPEG)", work / "copies-grown.h5", None, photos),
        ):
            print(f"{label} ...", flush=True)
            process, url = served(index, work)
            try:
                rows.append({"mode": label, **measure(url, uploads, verify)})
            finally:
                process.terminate()
                process.wait(timeout=30)
            print(f"  {rows[-1]}", flush=True)
        classic = rows[0]["p50_ms"]
        cpu = machine()
        lines = [
            f"Query latency through server.py over HTTP, {size:,} images, {len(queries)} edited copies as uploads, one at a "
            f"time; {cpu['cpu']}, {cpu['cores']} cores; EfficientNet-Lite0 in {base.encoder.precision} (`auto`).",
            "",
            "| mode | p50 ms | p95 ms | server p50 ms (encode + search) | p50 / classic | queries with a verified hit |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(f"| {row['mode']} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['server_p50_ms']:.0f} ({row['encode_p50_ms']:.0f} + {row['search_p50_ms']:.0f}) | "
                         f"{row['p50_ms'] / classic:.2f}x | {row['queries_with_a_verified_hit']}/{row['queries']} |")
        lines += ["", f"Stored per image: local features {stored['local_kb_per_image']:.1f} KB, regions "
                  f"{stored['regions_kb_per_image']:.1f} KB."]
        text = "\n".join(lines)
        print(text)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "verification.md").write_text(text + "\n")
        (OUT / "verification.json").write_text(json.dumps({"size": size, "rows": rows, "stored": stored}, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # the grown files are hundreds of MB
    return 0


if __name__ == "__main__":
    sys.exit(main())
