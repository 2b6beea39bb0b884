#!/usr/bin/env python3
"""The duplicates finder (``retrieval.search.duplicates``): how well it finds copies, and what it costs at scale.

    .venv/bin/python -m bench.duplicates                      # quality on the copy-detection set + scale 10k/100k/1M
    .venv/bin/python -m bench.duplicates --parts quality      # only the quality tables (about 3 min: indexing)
    .venv/bin/python -m bench.duplicates --parts scale --sizes 10000,100000 --budget 120

**Quality.** The all-vs-all copy-detection set of ``bench/copy_detection.py`` (``bench/out/copy-detection/all``: 60
groups of an original and 7 AugLy edits, 500 distractors in ``_distractors/``), indexed by the real ``index.py`` with
the default settings (EfficientNet-Lite0, classic: max pooling, 224 squash). A group is a top-level folder; pairs inside
a group are positives (60 x 28 = 1,680). Distractors made from one source photo (its tiles, which may overlap, the
whole photo, a colour-changed copy: the set's ``manifest.json`` names each image's source) are copies or parts of one
photo that the set does not label, so their pairs are left out of the precision (``Truth``): counted as false, they
were 352 of the 360 false pairs that verification confirmed. Every other pair is negative. For each cosine
threshold the finder's output is scored two ways: *edges*, the pairs whose score passes the threshold (what
imagededup's ``find_duplicates`` returns), and *groups*, every pair inside one reported group (what a user acting on the
groups would treat as copies; transitivity can add pairs and merge groups). Beside it: imagehash pHash (64-bit, as
imagededup's PHash does), all pairs at a Hamming distance <= d (imagededup's brute force), at each d, its best
printed.

**Scale.** Generated CNN-like vectors (``bench/scale.py``'s generator, 512-d) with 1 % planted near-copies, the whole
k-NN graph (k = 10) built through the memory backend (exact) and a faiss HNSW index, each size and backend in a fresh
process: time, peak memory (tracemalloc: numpy's allocations; VmHWM: the whole process, matrix included) and the
recall of the planted pairs. A run that would exceed ``--budget`` seconds stops after the budget and reports the
rate it reached and the extrapolated total (marked ``~``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "duplicates"
SET = REPO / "bench" / "out" / "copy-detection"
THRESHOLDS = (0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.92, 0.95)
K = 10
SIZES = (10_000, 100_000, 1_000_000)
PLANTED = 0.01


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ quality


def ensure_index() -> Path:
    """The copy-detection set (built if missing) indexed by the real index.py with the default settings."""
    if not (SET / "all").is_dir():
        from bench.copy_detection import build

        log("building the copy-detection set ...")
        build(SET, log=log)
    index = OUT / "all.h5"
    OUT.mkdir(parents=True, exist_ok=True)
    if index.is_file():  # built by an earlier run (delete it to index again)
        log(f"index: {index} (already built)")
        return index
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", str(SET / "all"), "--index", str(index),
         "--preset", "classic", "--backbone", "efficientnet-lite0", "--quiet"],
        capture_output=True, text=True, cwd=REPO,
    )
    if result.returncode != 0:
        raise SystemExit(f"index.py failed:\n{result.stderr}")
    log(f"index: {result.stdout.strip()} ({time.perf_counter() - started:.0f} s)")
    return index


@dataclass(frozen=True)
class Truth:
    """What the set says about each image: its group (``labels``: -1 for a distractor) and the source photo it was
    made from (``sources``: an id, -1 where unknown). A pair inside a group is a positive. A pair of images made from
    one source outside a group (two overlapping tiles of one photo, a photo and a crop of it, a colour-changed copy)
    is *unlabelled*: a copy, or two parts of one photo, that the set does not name, neither right nor wrong. Every
    other pair is a negative."""

    labels: np.ndarray  # int64 (n,)
    sources: np.ndarray  # int64 (n,)

    @property
    def positives(self) -> int:
        counts = np.bincount(self.labels[self.labels >= 0])
        return int((counts * (counts - 1) // 2).sum())

    def positive(self, pairs: np.ndarray) -> np.ndarray:
        a, b = self.labels[pairs[:, 0]], self.labels[pairs[:, 1]]
        return (a == b) & (a >= 0)

    def unlabelled(self, pairs: np.ndarray) -> np.ndarray:
        a, b = self.sources[pairs[:, 0]], self.sources[pairs[:, 1]]
        return (a == b) & (a >= 0) & ~self.positive(pairs)


def truth_of(paths: list[str], manifest: Path | None = None) -> Truth:
    """Group number of each path (its top-level folder; -1 for distractors, folders starting with '_') and its
    source photo from the set's ``manifest.json`` (all -1 where there is none: every non-group pair a negative)."""
    names: dict[str, int] = {}
    labels = np.full(len(paths), -1, np.int64)
    for row, path in enumerate(paths):
        top = path.split("/", 1)[0]
        if "/" in path and not top.startswith("_"):
            labels[row] = names.setdefault(top, len(names))
    manifest = SET / "manifest.json" if manifest is None else manifest
    source_of = {}
    if manifest.is_file():
        source_of = {entry["path"].split("/", 1)[1]: entry.get("source") for entry in json.loads(manifest.read_text())["files"]
                     if entry["path"].startswith("all/")}
    else:
        log(f"{manifest} is missing: pairs of one source photo outside a group count as negatives")
    ids: dict[str, int] = {}
    sources = np.array([ids.setdefault(source_of[path], len(ids)) if source_of.get(path) else -1 for path in paths], np.int64)
    return Truth(labels, sources)


def score_pairs(pairs: np.ndarray, truth: Truth) -> dict:
    """Precision over the labelled pairs (``Truth``), recall over the positives; ``unlabelled``: how many pairs were
    left out of the precision."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    unlabelled = truth.unlabelled(pairs)
    judged = pairs[~unlabelled]
    tp = int(truth.positive(judged).sum())
    precision = tp / len(judged) if len(judged) else 1.0
    recall = tp / truth.positives
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"predicted": int(len(pairs)), "unlabelled": int(unlabelled.sum()), "tp": tp, "precision": precision,
            "recall": recall, "f1": f1}


def group_pairs(components: list[list[int]]) -> np.ndarray:
    """Every pair inside each component (what acting on the reported groups treats as copies)."""
    out = []
    for members in components:
        m = np.asarray(members, np.int64)
        i, j = np.triu_indices(len(m), 1)
        out.append(np.stack([m[i], m[j]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), np.int64)


def evaluate_pairs(pairs: np.ndarray, truth: Truth) -> dict:
    from retrieval.search.duplicates import connected_components

    labels = truth.labels
    components = connected_components(pairs)
    return {
        "edges": score_pairs(pairs, truth),
        "groups": score_pairs(group_pairs(components), truth),
        "found_groups": len(components),
        "largest": max((len(c) for c in components), default=0),
        "pure_groups": int(sum(len({labels[r] for r in c}) == 1 and labels[c[0]] >= 0 for c in components)),
    }


def phash_rows(root: Path, paths: list[str]) -> tuple[np.ndarray, float]:
    """imagehash pHash (8x8 = 64 bits) of every image, decoded by the project's decoder: uint64 (N,), seconds."""
    import imagehash

    from retrieval.images import open_image

    started = time.perf_counter()
    out = np.empty(len(paths), np.uint64)
    for row, path in enumerate(paths):
        bits = imagehash.phash(open_image(root / path)).hash.ravel()
        out[row] = int("".join("1" if bit else "0" for bit in bits), 2)
    return out, time.perf_counter() - started


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair a < b at Hamming distance <= max_distance (brute force, as imagededup's BruteForce)."""
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(distances <= max_distance, 1))
    return np.stack([i, j], axis=1).astype(np.int64)


def quality_part() -> dict:
    from retrieval.search.backends.memory import MemoryBackend
    from retrieval.search.duplicates import DuplicateFinder
    from retrieval.search.pipeline import searched_matrix
    from retrieval.storage.database import read_database

    index = ensure_index()
    database = read_database(index)
    truth = truth_of(database.paths)
    labels, positives = truth.labels, truth.positives
    log(f"{len(database)} images, {int((labels >= 0).sum())} in {labels.max() + 1} groups, {positives} positive pairs")
    matrix = searched_matrix(database.vectors, database.whitening)
    started = time.perf_counter()
    finder = DuplicateFinder(database, MemoryBackend(matrix), matrix, k=K, cache=None)
    graph_s = time.perf_counter() - started
    cnn = []
    for threshold in THRESHOLDS:
        pairs, _ = finder.graph.pairs(threshold)
        cnn.append({"threshold": threshold, **evaluate_pairs(pairs, truth),
                    "saturated": finder.graph.saturated(threshold)})
    # the same with every pair scored (no k limit): what k = 10 loses
    scores = matrix @ matrix.T
    np.fill_diagonal(scores, -np.inf)
    full = {}
    for threshold in THRESHOLDS:
        i, j = np.nonzero(np.triu(scores >= threshold, 1))
        full[threshold] = evaluate_pairs(np.stack([i, j], axis=1), truth)
    edits = edit_names(database.paths)
    per_edit = {str(t): edit_recall(finder.graph.pairs(t)[0], labels, edits) for t in THRESHOLDS}
    false_kinds = {str(t): false_pair_kinds(finder.graph.pairs(t)[0], truth, edits) for t in THRESHOLDS}
    hashes, hash_s = phash_rows(SET / "all", database.paths)
    phash = [{"distance": d, **evaluate_pairs(hamming_pairs(hashes, d), truth)} for d in range(0, 33, 2)]
    verified = verified_part()
    return {"images": len(database), "positives": positives, "graph_s": graph_s, "phash_s": hash_s, "verified": verified,
            "cnn": cnn, "all_pairs": {str(t): v for t, v in full.items()}, "phash": phash,
            "per_edit": per_edit, "false_kinds": false_kinds}


VERIFY_THRESHOLDS = (0.5, 0.6, 0.7, 0.78, 0.85)


def verified_part() -> dict | None:
    """The same set indexed with ``--preset copy-detection`` (local features): pairs at each threshold, then
    confirmed by ``find_duplicates.py --verify``'s stage (``LocalFeatureVerifier``). Verified once at the lowest
    threshold; a higher threshold keeps the verdicts of its pairs."""
    from retrieval.search.backends.memory import MemoryBackend
    from retrieval.search.duplicates import DuplicateFinder, LocalFeatureVerifier
    from retrieval.search.pipeline import searched_matrix
    from retrieval.storage.database import read_database

    index = OUT / "all-copy.h5"
    if not index.is_file():
        result = subprocess.run(
            [sys.executable, str(REPO / "index.py"), "--database", str(SET / "all"), "--index", str(index),
             "--preset", "copy-detection", "--backbone", "efficientnet-lite0", "--quiet"],
            capture_output=True, text=True, cwd=REPO,
        )
        if result.returncode != 0:
            log(f"index.py --preset copy-detection failed: {result.stderr.strip().splitlines()[-1:]}")
            return None
    database = read_database(index)
    truth = truth_of(database.paths)
    matrix = searched_matrix(database.vectors, database.whitening)
    finder = DuplicateFinder(database, MemoryBackend(matrix), matrix, k=K, cache=None, image_root=SET / "all")
    verifier = LocalFeatureVerifier(database, finder.graph)
    lowest, _ = finder.graph.pairs(min(VERIFY_THRESHOLDS))
    started = time.perf_counter()
    verdict = verifier(lowest)
    seconds = time.perf_counter() - started
    confirmed = {(int(a), int(b)) for (a, b), ok in zip(lowest, verdict) if ok}
    rows = []
    for threshold in VERIFY_THRESHOLDS:
        pairs, _ = finder.graph.pairs(threshold)
        kept = np.array([p for p in pairs.tolist() if tuple(p) in confirmed], np.int64).reshape(-1, 2)
        rows.append({"threshold": threshold, "plain": evaluate_pairs(pairs, truth),
                     "verified": evaluate_pairs(kept, truth)})
    return {"pairs_verified": int(len(lowest)), "seconds": seconds, "rows": rows}


def edit_names(paths: list[str]) -> list[str]:
    """The edit of each image from its file name (``<group>/<edit>.jpg``); distractors are ``distractor``."""
    return ["distractor" if path.startswith("_") else path.rsplit("/", 1)[-1].rsplit(".", 1)[0] for path in paths]


def edit_recall(pairs: np.ndarray, labels: np.ndarray, edits: list[str]) -> dict:
    """Per edit type: the share of (original, edit) pairs of one group found as an edge."""
    found = {(int(a), int(b)) for a, b in pairs}
    original = {int(labels[row]): row for row, edit in enumerate(edits) if edit == "original"}
    hits: dict[str, list[bool]] = {}
    for row, edit in enumerate(edits):
        if labels[row] >= 0 and edit != "original":
            a, b = sorted((original[int(labels[row])], row))
            hits.setdefault(edit, []).append((a, b) in found)
    return {edit: float(np.mean(values)) for edit, values in sorted(hits.items())}


def false_pair_kinds(pairs: np.ndarray, truth: Truth, edits: list[str]) -> dict:
    """The edges that are not positives, by what they join: two images of one source photo outside a group
    (unlabelled, not counted as false), two screenshots (a shared frame), two distractors, or anything else."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    counts = {"same source": 0, "screenshot-screenshot": 0, "distractor-distractor": 0, "other": 0}
    unlabelled = truth.unlabelled(pairs)
    for (a, b), positive, same_source in zip(pairs.tolist(), truth.positive(pairs), unlabelled):
        if positive:
            continue
        if same_source:
            counts["same source"] += 1
        elif "screenshot" in edits[a] and "screenshot" in edits[b]:
            counts["screenshot-screenshot"] += 1
        elif truth.labels[a] < 0 and truth.labels[b] < 0:
            counts["distractor-distractor"] += 1
        else:
            counts["other"] += 1
    return counts


# ------------------------------------------------------------------------------------------------ scale


def vmhwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """Start VmHWM again from the current resident size (Linux: ``echo 5 > /proc/self/clear_refs``), so the peak
    measured is the finder's, not the vector generator's."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def planted_vectors(count: int) -> tuple[np.ndarray, np.ndarray]:
    """CNN-like unit vectors with ``PLANTED`` of them replaced by near-copies of others: (matrix, planted pairs)."""
    from bench.scale import cnn_like_vectors

    matrix = cnn_like_vectors(count, seed=16)
    rng = np.random.default_rng(16)
    copies = int(count * PLANTED)
    targets = rng.choice(count, size=2 * copies, replace=False)
    originals, copied = targets[:copies], targets[copies:]
    noisy = matrix[originals] + rng.normal(scale=0.01, size=(copies, matrix.shape[1])).astype(np.float32)
    matrix[copied] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return matrix, np.sort(np.stack([originals, copied], axis=1), axis=1)


def scale_one(backend: str, count: int, budget: float) -> dict:
    """In a fresh process: the k-NN graph of ``count`` generated vectors through ``backend``, bounded by ``budget`` s."""
    import faiss

    from retrieval.search.backends.faiss import HNSW_EF_CONSTRUCTION, HNSW_M, FaissBackend, add_blocks
    from retrieval.search.backends.memory import MemoryBackend
    from retrieval.search.duplicates import BATCH, connected_components, search_neighbours

    matrix, planted = planted_vectors(count)
    reset_peak()
    base_mb = vmhwm_mb()
    row = {"backend": backend, "vectors": count, "matrix_mb": matrix.nbytes / 2**20}
    tracemalloc.start()
    started = time.perf_counter()
    build_s, built = 0.0, count
    if backend == "memory":
        opened = MemoryBackend(matrix)
    else:
        index = faiss.IndexHNSWFlat(matrix.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        step = 65_536
        for start in range(0, count, step):
            add_blocks(index, matrix[start : start + step])
            if time.perf_counter() - started > budget / 2 and start + step < count:
                built = start + step
                break
        build_s = time.perf_counter() - started
        opened = FaissBackend(index, np.arange(index.ntotal, dtype=np.int64), {"kind": "hnsw", "ef_search": 256})
        opened.kind = "faiss-hnsw"
    row["build_s"] = build_s
    row["built"] = built
    searched = 0
    rows = np.full((count, K), -1, np.int64)
    scores = np.full((count, K), -np.inf, np.float32)
    search_started = time.perf_counter()
    chunk = BATCH * 4
    limit = np.arange(min(count, built))
    while searched < len(limit):
        part = limit[searched : searched + chunk]
        rows[part], scores[part] = search_neighbours(opened, matrix, part, K)
        searched += len(part)
        if time.perf_counter() - started > budget:
            break
    search_s = time.perf_counter() - search_started
    row["searched"] = searched
    row["search_s"] = search_s
    complete = searched == count and built == count
    row["complete"] = complete
    if complete:
        from retrieval.search.duplicates import NeighbourGraph

        group_started = time.perf_counter()
        pairs, _ = NeighbourGraph(rows, scores).pairs(0.9)
        components = connected_components(pairs)
        row["group_s"] = time.perf_counter() - group_started
        found = {(int(a), int(b)) for a, b in pairs}
        row["planted_recall"] = float(np.mean([(int(a), int(b)) in found for a, b in planted]))
        row["groups"] = len(components)
        row["total_s"] = time.perf_counter() - started
    else:
        build_total = build_s * (count / built) ** 1.1 if built < count else build_s  # HNSW build grows ~ N log N
        row["total_s"] = build_total + search_s * count / max(searched, 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row["traced_peak_mb"] = peak / 2**20
    row["rss_peak_mb"] = vmhwm_mb()
    row["rss_before_mb"] = base_mb
    return row


def scale_part(sizes, budget: float) -> list[dict]:
    rows = []
    for count in sizes:
        for backend in ("memory", "faiss-hnsw"):
            log(f"scale: {backend} at {count:,} vectors (budget {budget:.0f} s) ...")
            result = subprocess.run(
                [sys.executable, "-m", "bench.duplicates", "--one", backend, str(count), "--budget", str(budget)],
                capture_output=True, text=True, cwd=REPO,
            )
            if result.returncode != 0:
                log(result.stderr[-2000:])
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            log(f"  {json.dumps(row)}")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ tables


def _f(x: float) -> str:
    return f"{x:.3f}"


def quality_tables(q: dict) -> list[str]:
    lines = [
        f"Copy-detection set, all-vs-all: {q['images']} images, {q['positives']} positive pairs; EfficientNet-Lite0 "
        f"classic, k = {K}; graph {q['graph_s']:.2f} s, pHash of every image {q['phash_s']:.1f} s (decode included).",
        "",
        "| method | threshold | edges P | edges R | edges F1 | groups P | groups R | groups F1 | groups found | pure | largest | saturated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in q["cnn"]:
        e, g = row["edges"], row["groups"]
        lines.append(f"| CNN cosine | {row['threshold']:.2f} | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} | "
                     f"{_f(g['precision'])} | {_f(g['recall'])} | {_f(g['f1'])} | {row['found_groups']} | {row['pure_groups']} | "
                     f"{row['largest']} | {row['saturated']} |")
    chosen = max(q["cnn"], key=lambda r: (round(r["groups"]["f1"], 3), r["threshold"]))
    phash_best = max(r["groups"]["f1"] for r in q["phash"])
    decision = (f"Default threshold: {chosen['threshold']:.2f}, the best F1 of the pairs inside the reported groups "
                f"(what a user acting on the groups treats as copies): {chosen['groups']['f1']:.3f} against pHash's best "
                f"{phash_best:.3f}. Lower thresholds chain groups together through shared screenshot frames "
                "(the largest group grows to hundreds); higher ones lose the cropped, rotated and overlaid "
                "copies faster than they gain precision.")
    best = max(q["phash"], key=lambda r: r["edges"]["f1"])
    best_groups = max(q["phash"], key=lambda r: r["groups"]["f1"])
    for row in sorted({id(best): best, id(best_groups): best_groups}.values(), key=lambda r: r["distance"]):
        e, g = row["edges"], row["groups"]
        lines.append(f"| pHash (64 bit) | Hamming <= {row['distance']} | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} | "
                     f"{_f(g['precision'])} | {_f(g['recall'])} | {_f(g['f1'])} | {row['found_groups']} | {row['pure_groups']} | "
                     f"{row['largest']} | |")
    imagededup = next(r for r in q["phash"] if r["distance"] == 10)
    e, g = imagededup["edges"], imagededup["groups"]
    lines.append(f"| pHash, imagededup's default | Hamming <= 10 | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} | "
                 f"{_f(g['precision'])} | {_f(g['recall'])} | {_f(g['f1'])} | {imagededup['found_groups']} | "
                 f"{imagededup['pure_groups']} | {imagededup['largest']} | |")
    edits = sorted(next(iter(q["per_edit"].values())))
    lines += ["", "Recall of (original, edit) pairs by edit type, and what the false pairs join (CNN cosine, k = 10).", "",
              "| threshold | " + " | ".join(edits) + " | unlabelled: same source | false: screenshot-screenshot | "
              "distractor-distractor | other |",
              "|---|" + "---|" * (len(edits) + 4)]
    for threshold, recall in q["per_edit"].items():
        kinds = q["false_kinds"][threshold]
        lines.append(f"| {float(threshold):.2f} | " + " | ".join(f"{recall[e]:.2f}" for e in edits) +
                     f" | {kinds['same source']} | {kinds['screenshot-screenshot']} | {kinds['distractor-distractor']} | "
                     f"{kinds['other']} |")
    lines += ["", decision]
    if q.get("verified"):
        v = q["verified"]
        lines += ["", f"With --verify (index built with --preset copy-detection: regions + local features; its own cosine "
                      f"scores): {v['pairs_verified']} pairs verified in {v['seconds']:.0f} s.", "",
                  "| threshold | plain groups P | plain groups R | plain groups F1 | verified edges P | verified edges R | "
                  "verified groups P | verified groups R | verified groups F1 | largest | unlabelled verified edges |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in v["rows"]:
            p, e, g = row["plain"]["groups"], row["verified"]["edges"], row["verified"]["groups"]
            lines.append(f"| {row['threshold']:.2f} | {_f(p['precision'])} | {_f(p['recall'])} | {_f(p['f1'])} | "
                         f"{_f(e['precision'])} | {_f(e['recall'])} | {_f(g['precision'])} | {_f(g['recall'])} | "
                         f"{_f(g['f1'])} | {row['verified']['largest']} | {e['unlabelled']} |")
    lines += ["", "Every pair scored (no k limit), CNN cosine: what k = 10 leaves out.", "",
              "| threshold | edges P | edges R | groups P | groups R |", "|---|---|---|---|---|"]
    for threshold, row in q["all_pairs"].items():
        lines.append(f"| {float(threshold):.2f} | {_f(row['edges']['precision'])} | {_f(row['edges']['recall'])} | "
                     f"{_f(row['groups']['precision'])} | {_f(row['groups']['recall'])} |")
    return lines


def scale_table(rows: list[dict]) -> list[str]:
    lines = [
        "| vectors | backend | build s | graph s | total s | traced peak MB | process peak MB (at start; matrix) | planted-pair recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = "" if row["complete"] else "~"
        graph_s = row["search_s"] * row["vectors"] / max(row["searched"], 1)
        note = "" if row["complete"] else f" (ran {row['searched']:,} of {row['vectors']:,} searches, built {row['built']:,})"
        recall = f"{row['planted_recall']:.3f}" if "planted_recall" in row else "-"
        lines.append(f"| {row['vectors']:,} | {row['backend']} | {row['build_s']:.1f} | {mark}{graph_s:.1f}{note} | "
                     f"{mark}{row['total_s']:.1f} | {row['traced_peak_mb']:.0f} | {row['rss_peak_mb']:.0f} "
                     f"({row['rss_before_mb']:.0f}; {row['matrix_mb']:.0f}) | {recall} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Precision/recall and scale of the duplicates finder.")
    parser.add_argument("--parts", default="quality,scale", help="quality, scale or both (default)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="vector counts of the scale part")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds one scale run may take before it extrapolates")
    parser.add_argument("--tables", action="store_true", help="print the tables of the last run's JSON files again")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(scale_one(args.one[0], int(args.one[1]), args.budget)))
        return 0
    if args.tables:
        saved = {}
        for name in ("duplicates.json", "duplicates-scale.json", "duplicates-quality.json"):  # the latest part wins
            if (OUT / name).is_file():
                saved.update(json.loads((OUT / name).read_text()))
        if "quality" in saved:
            print("\n".join(quality_tables(saved["quality"])) + "\n")
        if "scale" in saved:
            print("\n".join(scale_table(saved["scale"])))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    results: dict = {}
    lines = [f"# Duplicates finder ({open('/proc/cpuinfo').read().count('processor')} CPUs)", ""]
    if "quality" in parts:
        results["quality"] = quality_part()
        lines += quality_tables(results["quality"]) + [""]
        print("\n".join(lines), flush=True)
    if "scale" in parts:
        results["scale"] = scale_part([int(s) for s in args.sizes.split(",")], args.budget)
        table = scale_table(results["scale"])
        lines += table
        print("\n".join(table))
    name = "duplicates" if parts >= {"quality", "scale"} else "duplicates-" + "-".join(sorted(parts))
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2, default=lambda o: o.item()) + "\n")
    log(f"written {OUT / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
