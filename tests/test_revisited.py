"""Revisited Oxford/Paris: the restricted reader of gnd_*.pkl, the Easy/Medium/Hard protocols, and evaluate.py end to
end on a small set of real photos with a synthetic gnd file, cross-checked against revisitop's compute_map."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import pickletools
import shutil
import struct

import numpy as np
import pytest

from conftest import DEMO_DATABASE
from retrieval.errors import RetrievalError
from retrieval.evaluation import revisited
from retrieval.evaluation.groundtruth import GroundTruthError

# --------------------------------------------------------------------------- files shaped like the real ones

VARIANTS = ("lists", "ndarrays", "numpy-scalars", "int32-float32", "concatenated")


def make_gnd(n_images=120, n_queries=9, seed=0) -> dict:
    """Plain-Python content like gnd_roxford5k.pkl: disjoint easy / hard / junk, some queries without hard or easy."""
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(n_queries):
        picked = rng.permutation(n_images)[: int(rng.integers(3, n_images // 4))]
        n_easy = 0 if q % 7 == 5 else int(rng.integers(0, len(picked)))
        n_hard = 0 if q % 5 == 3 else int(rng.integers(0, len(picked) - n_easy + 1))
        x1, y1 = float(np.round(rng.uniform(0, 300), 1)), float(np.round(rng.uniform(0, 300), 1))
        gnd.append({
            "bbx": [x1, y1, x1 + float(np.round(rng.uniform(20, 700), 1)), y1 + float(np.round(rng.uniform(20, 700), 1))],
            "easy": sorted(int(v) for v in picked[:n_easy]),
            "hard": sorted(int(v) for v in picked[n_easy : n_easy + n_hard]),
            "junk": sorted(int(v) for v in picked[n_easy + n_hard :]),
        })
    return {"gnd": gnd, "imlist": [f"landmark_{i:06d}" for i in range(n_images)],
            "qimlist": [f"landmark_q{q:06d}" for q in range(n_queries)]}


def as_variant(raw: dict, variant: str) -> dict:
    """The same content with the Python / numpy types a writer might have used."""
    lists = {"lists": list, "ndarrays": lambda v: np.array(v, dtype=np.int64),
             "numpy-scalars": lambda v: [np.int64(x) for x in v], "int32-float32": lambda v: np.array(v, dtype=np.int32),
             "concatenated": lambda v: np.concatenate([[], v])}[variant]  # np.concatenate of [] and ints: float64
    box = {"lists": list, "ndarrays": np.array, "numpy-scalars": lambda b: [np.float64(x) for x in b],
           "int32-float32": lambda b: np.array(b, dtype=np.float32), "concatenated": tuple}[variant]
    out = {"imlist": list(raw["imlist"]), "qimlist": list(raw["qimlist"])}
    if variant == "int32-float32":
        out["imlist"], out["qimlist"] = np.array(raw["imlist"]), np.array(raw["qimlist"])
    out["gnd"] = [{"bbx": box(e["bbx"]), **{key: lists(e[key]) for key in ("easy", "hard", "junk")}} for e in raw["gnd"]]
    return out


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: bytes and ASCII text as (SHORT_)BINSTRING."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_binstring(self, data: bytes, original):
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(original)

    def save_bytes(self, obj):
        self.save_binstring(obj, obj)

    def save_str(self, obj):
        try:
            data = obj.encode("ascii")
        except UnicodeEncodeError:
            return pickle._Pickler.save_str(self, obj)
        self.save_binstring(data, obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


# written by numpy 1.26.4 (numpy.core names): imlist a_000000..2, qimlist q0, bbx (1.5, 2, 30.25, 40) float64,
# easy [0], hard [2], junk [] int64 arrays; protocol 2 (with _codecs.encode and __builtin__.bytes) and protocol 5
NUMPY1_PICKLES = {
    2: "gAJ9cQAoWAYAAABpbWxpc3RxAV1xAihYCAAAAGFfMDAwMDAwcQNYCAAAAGFfMDAwMDAxcQRYCAAAAGFfMDAwMDAycQVlWAcAAABxaW1saXN0"
       "cQZdcQdYAgAAAHEwcQhhWAMAAABnbmRxCV1xCn1xCyhYAwAAAGJieHEMY251bXB5LmNvcmUubXVsdGlhcnJheQpfcmVjb25zdHJ1Y3QKcQ1j"
       "bnVtcHkKbmRhcnJheQpxDksAhXEPY19jb2RlY3MKZW5jb2RlCnEQWAEAAABicRFYBgAAAGxhdGluMXEShnETUnEUh3EVUnEWKEsBSwSFcRdj"
       "bnVtcHkKZHR5cGUKcRhYAgAAAGY4cRmJiIdxGlJxGyhLA1gBAAAAPHEcTk5OSv////9K/////0sAdHEdYoloEFghAAAAAAAAAAAAw7g/AAAA"
       "AAAAAEAAAAAAAEA+QAAAAAAAAERAcR5oEoZxH1JxIHRxIWJYBAAAAGVhc3lxImgNaA5LAIVxI2gUh3EkUnElKEsBSwGFcSZoGFgCAAAAaThx"
       "J4mIh3EoUnEpKEsDaBxOTk5K/////0r/////SwB0cSpiiWgQWAgAAAAAAAAAAAAAAHEraBKGcSxScS10cS5iWAQAAABoYXJkcS9oDWgOSwCF"
       "cTBoFIdxMVJxMihLAUsBhXEzaCmJaBBYCAAAAAIAAAAAAAAAcTRoEoZxNVJxNnRxN2JYBAAAAGp1bmtxOGgNaA5LAIVxOWgUh3E6UnE7KEsB"
       "SwCFcTxoKYljX19idWlsdGluX18KYnl0ZXMKcT0pUnE+dHE/YnVhdS4=",
    5: "gAWVfAEAAAAAAAB9lCiMBmltbGlzdJRdlCiMCGFfMDAwMDAwlIwIYV8wMDAwMDGUjAhhXzAwMDAwMpRljAdxaW1saXN0lF2UjAJxMJRhjANn"
       "bmSUXZR9lCiMA2JieJSMEm51bXB5LmNvcmUubnVtZXJpY5SMC19mcm9tYnVmZmVylJOUKJYgAAAAAAAAAAAAAAAAAPg/AAAAAAAAAEAAAAAA"
       "AEA+QAAAAAAAAERAlIwFbnVtcHmUjAVkdHlwZZSTlIwCZjiUiYiHlFKUKEsDjAE8lE5OTkr/////Sv////9LAHSUYksEhZSMAUOUdJRSlIwE"
       "ZWFzeZRoDyiWCAAAAAAAAAAAAAAAAAAAAJRoE4wCaTiUiYiHlFKUKEsDaBdOTk5K/////0r/////SwB0lGJLAYWUaBp0lFKUjARoYXJklGgP"
       "KJYIAAAAAAAAAAIAAAAAAAAAlGghSwGFlGgadJRSlIwEanVua5RoDyiWAAAAAAAAAACUaCFLAIWUaBp0lFKUdWF1Lg==",
}


def same_content(gt: revisited.RevisitedGroundTruth, raw: dict) -> None:
    assert gt.images == tuple(raw["imlist"]) and [q.name for q in gt.queries] == list(raw["qimlist"])
    for query, entry in zip(gt.queries, raw["gnd"]):
        for key in ("easy", "hard", "junk"):
            got = getattr(query, key)
            assert got.dtype == np.int64 and not got.flags.writeable
            np.testing.assert_array_equal(got, entry[key])
        assert all(type(v) is float for v in query.bbox)
        np.testing.assert_allclose(query.bbox, entry["bbx"], rtol=1e-6)  # float32 variant: 1e-7 relative


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reads_what_numpy_2_writes(tmp_path, variant, protocol):
    raw = make_gnd(seed=protocol)
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(as_variant(raw, variant), protocol=protocol))
    same_content(revisited.load_revisited_gnd(path), raw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reads_python_2_style_pickles(variant):
    raw = make_gnd(n_images=80, n_queries=6, seed=9)
    data = py2_dumps(as_variant(raw, variant))
    assert "SHORT_BINSTRING" in {op.name for op, _, _ in pickletools.genops(data)}
    same_content(revisited.parse_revisited_gnd(revisited.restricted_loads(data)), raw)


@pytest.mark.parametrize("protocol", sorted(NUMPY1_PICKLES))
def test_reads_what_numpy_1_wrote(protocol):
    data = base64.b64decode(NUMPY1_PICKLES[protocol])
    assert b"numpy.core." in data
    gt = revisited.parse_revisited_gnd(revisited.restricted_loads(data))
    assert gt.images == ("a_000000", "a_000001", "a_000002") and gt.queries[0].bbox == (1.5, 2.0, 30.25, 40.0)
    assert gt.queries[0].easy.tolist() == [0] and gt.queries[0].hard.tolist() == [2] and gt.queries[0].junk.size == 0


class Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_refuses_os_system_without_running_it(tmp_path, protocol):
    marker = tmp_path / "RAN"
    command = f"touch {marker}"
    data = pickle.dumps(Payload(os.system, command), protocol=protocol)
    (tmp_path / "evil.pkl").write_bytes(data)
    with pytest.raises(GroundTruthError, match=r"evil.pkl: refusing to load: the pickle asks for (posix|nt|os)\.system"):
        revisited.load_revisited_gnd(tmp_path / "evil.pkl")
    hidden = as_variant(make_gnd(n_images=50, n_queries=4), "ndarrays")
    hidden["gnd"][3]["junk"] = Payload(os.system, command)
    with pytest.raises(GroundTruthError, match="system"):
        revisited.restricted_loads(pickle.dumps(hidden, protocol=protocol))
    assert not marker.exists()
    os.system(command)  # the payload is real: run, it does create the marker
    assert marker.exists()


@pytest.mark.parametrize(
    "data, message",
    [
        (pickle.dumps(Payload(eval, "1+1"), 2), "asks for __builtin__.eval"),
        (pickle.dumps(Payload(eval, "1+1"), 3), "asks for builtins.eval"),
        (pickle.dumps(Payload(np.load, "x.npy"), 4), "numpy.*load"),
        (pickle.dumps(Payload(getattr, b"x", "decode"), 4), "builtins.getattr"),
        (pickle.dumps(np.array([1, "a"], dtype=object), 4), "object array|numpy dtype 'O8'"),
        (pickle.dumps(np.zeros(2, dtype=[("a", "i4")]), 4), "dtype"),
        (pickle.dumps(np.ma.masked_array([1, 2]), 4), "numpy.ma.core._mareconstruct"),
        (pickle.dumps(np.dtype("i8"), 4), "bare DType"),
        (pickle.dumps(np.array(["2020-01-01"], dtype="M8[D]"), 4), "numpy dtype 'M8'"),
        (pickle.dumps(np.array([1j]), 4), "numpy dtype 'c16'"),
        (b"cnumpy\nndarray\n(I3\ntR.", "malformed pickle: TypeError"),  # calling the ndarray marker
        (b"c_codecs\nencode\n(Vx\nVutf-7\ntR.", "_codecs.encode other than for latin-1"),
        (b"cnumpy._core.multiarray\n_reconstruct\n(Vx\n(I0\ntVb\ntR.", "other than a numpy.ndarray"),
        (b"\x80\x02P0\n.", "persistent id"),
        (b"", "truncated or empty"),
        (b"not a pickle at all", "malformed pickle"),
    ],
)
def test_refuses_everything_else(data, message):
    with pytest.raises(GroundTruthError, match=message):
        revisited.restricted_loads(data)


def test_the_allowed_globals_are_exactly_these():
    assert revisited.ALLOWED_GLOBAL_NAMES == (
        "__builtin__.bytes", "_codecs.encode", "builtins.bytes", "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar", "numpy._core.numeric._frombuffer", "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy.core.numeric._frombuffer", "numpy.dtype", "numpy.ndarray",
    )


def small_gnd():
    return {
        "imlist": ["a_000000", "a_000001", "a_000002", "a_000003"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": [1.5, 2.0, 30.25, 40.0], "easy": [0], "hard": [1, 2], "junk": [3]},
            {"bbx": [0, 0, 10, 10], "easy": [], "hard": [3], "junk": []},
        ],
        "extra": "ignored",
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("qimlist"), "missing key\\(s\\) 'qimlist'"),
        (lambda d: d["qimlist"].append("q2"), "'gnd' has 2 entries but 'qimlist' has 3"),
        (lambda d: d["qimlist"].__setitem__(1, "a_000001"), "query image 'a_000001' is also in 'imlist'"),
        (lambda d: d["imlist"].append("a_000000"), "lists an image more than once"),
        (lambda d: d["imlist"].__setitem__(1, "../etc/passwd"), "not a plain image name"),
        (lambda d: d["gnd"][0].pop("hard"), r"gnd\[0\] \(q0\): missing 'hard'"),
        (lambda d: d["gnd"][0].update(ok=[1]) or d["gnd"][0].pop("easy"), "old-protocol file with 'ok'"),
        (lambda d: d["gnd"][1].update(easy=[4]), r"gnd\[1\] \(q1\): easy\[0\] = 4 is outside 0..3"),
        (lambda d: d["gnd"][1].update(junk=[1.5]), "must be an integer image index, got 1.5"),
        (lambda d: d["gnd"][1].update(junk=[True]), "must be an integer image index, got True"),
        (lambda d: d["gnd"][1].update(hard=[2, 2]), "hard lists an image more than once"),
        (lambda d: d["gnd"][0].update(junk=[2]), "image 2 is both hard and junk"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), "bbx must be four numbers"),
        (lambda d: d["gnd"][0].update(bbx=[5, 2, 5, 4]), "empty or negative bbx"),
        (lambda d: d["gnd"][0].update(bbx=[0, 0, float("nan"), 4]), "finite"),
        (lambda d: d.update(gnd=[]) or d.update(qimlist=[]), "no queries"),
    ],
)
def test_validation_errors(change, message):
    data = small_gnd()
    change(data)
    with pytest.raises(GroundTruthError, match=message):
        revisited.parse_revisited_gnd(data, source="gnd.pkl")


def test_load_errors(tmp_path):
    with pytest.raises(GroundTruthError, match="no such file"):
        revisited.load_revisited_gnd(tmp_path / "missing.pkl")
    with pytest.raises(GroundTruthError, match="is a folder"):
        revisited.load_revisited_gnd(tmp_path)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(GroundTruthError, match="list.pkl: expected a dict"):
        revisited.load_revisited_gnd(tmp_path / "list.pkl")
    assert issubclass(GroundTruthError, RetrievalError)


def test_easy_medium_hard_as_revisitop_builds_them():
    gt = revisited.parse_revisited_gnd(small_gnd())
    queries = {"q0.jpg", "q1.jpg"}  # query images are junk for every query: they are not database images
    want = {
        "easy": [({"a_000000.jpg"}, {"a_000003.jpg", "a_000001.jpg", "a_000002.jpg"}), (set(), {"a_000003.jpg"})],
        "medium": [({"a_000000.jpg", "a_000001.jpg", "a_000002.jpg"}, {"a_000003.jpg"}), ({"a_000003.jpg"}, set())],
        "hard": [({"a_000001.jpg", "a_000002.jpg"}, {"a_000003.jpg", "a_000000.jpg"}), ({"a_000003.jpg"}, set())],
    }
    for name, expected in want.items():
        truth = gt.protocol(name)
        assert truth.kind == "revisited"
        for query, (relevant, junk) in zip(truth.queries, expected):
            assert query.relevant == relevant and query.junk == junk | queries
            assert query.image == query.path and query.path in queries
    assert gt.protocol("easy").queries[0].bbox == (1.5, 2.0, 30.25, 40.0)
    with pytest.raises(GroundTruthError, match="unknown Revisited protocol 'extreme'"):
        gt.protocol("extreme")


# --------------------------------------------------------------------------- end to end


def revisitop_compute_map(ranks, gnd, kappas):
    """revisitop's compute_map, transcribed: ranks (n_db, n_queries); per query ok / junk index lists. Queries with
    no ok are left out of the means. Returns (mAP, mP@k)."""
    aps, prs = [], []
    for i, query in enumerate(gnd):
        ok, junk = np.array(query["ok"]), np.array(query["junk"])
        if ok.size == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[:, i], ok))
        junk_at = np.flatnonzero(np.isin(ranks[:, i], junk))
        pos = pos - np.array([np.sum(junk_at < p) for p in pos], dtype=np.int64)
        ap = sum(((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / (2 * ok.size) for j, r in enumerate(pos))
        aps.append(ap)
        pos = pos + 1
        prs.append([np.sum(pos <= min(pos.max(), k)) / min(pos.max(), k) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


@pytest.fixture(scope="module")
def revisited_set(tmp_path_factory):
    """jpg/ with 3 landmarks (a query photo + views), 3 other photos, all indexed (query photos too), and a gnd file:
    views 1-2 easy, view 3 hard (clock: none, so Hard leaves it out), one other photo junk; the coffee box runs past
    the right border (padded black, as revisitop crops)."""
    from PIL import Image

    from retrieval.indexing import build_index

    root = tmp_path_factory.mktemp("revisited")
    jpg = root / "jpg"
    jpg.mkdir()
    imlist, qimlist, gnd = [], [], []
    for other in ("astronaut", "brick", "camera"):
        shutil.copy(DEMO_DATABASE / other / "original.jpg", jpg / f"other_{other}.jpg")
        imlist.append(f"other_{other}")
    for number, landmark in enumerate(("coffee", "rocket", "clock")):
        query = f"{landmark}_query"
        shutil.copy(DEMO_DATABASE / landmark / "original.jpg", jpg / f"{query}.jpg")
        qimlist.append(query)
        views = []
        for view in (1, 2, 3):
            name = f"{landmark}_{view:06d}"
            shutil.copy(DEMO_DATABASE / landmark / f"view-0{view}.jpg", jpg / f"{name}.jpg")
            imlist.append(name)
            views.append(len(imlist) - 1)
        width, height = Image.open(jpg / f"{query}.jpg").size
        bbx = [10.5, 20.0, width + 40.0, height - 5.5] if landmark == "coffee" else [0.0, 0.0, width * 0.8, height * 0.9]
        gnd.append({"bbx": bbx, "easy": views[:2], "hard": [] if landmark == "clock" else views[2:], "junk": [number]})
    gnd_path = root / "gnd_rtest.pkl"
    gnd_path.write_bytes(pickle.dumps({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, protocol=2))
    index = root / "index.h5"
    build_index(jpg, index, backbone="efficientnet-lite0", progress=False)
    return index, gnd_path


def test_revisited_end_to_end_matches_revisitop(revisited_set, tmp_path, capsys):
    from retrieval.cli.evaluate import main
    from retrieval.engine import RetrievalEngine
    from retrieval.evaluation.protocol import PathResolver, crop_to_box
    from retrieval.images import open_image

    index, gnd_path = revisited_set
    out_json = tmp_path / "revisited.json"
    assert main(["--index", str(index), "--ground-truth", "revisited", "--gt-path", str(gnd_path), "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    assert "revisited ground truth: easy 3, medium 3, hard 2 queries evaluated, 1 skipped" in out
    assert "skipped query (hard): clock_query.jpg: no relevant images in the ground truth" in err
    assert "12 of the 12 database images (imlist) are in the index, 3 query images in it are left out as junk, 0 other" in out
    assert "AP: trapezoid (as revisitop compute_map); P@k: revisitop mP@k" in out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("metric")))
    assert lines[header].split() == ["metric", "easy", "medium", "hard"]
    assert [line.split()[0] for line in lines[header + 1 : header + 6]] == ["mAP", "mP@1", "mP@5", "mP@10", "queries"]
    report = json.loads(out_json.read_text("utf-8"))

    # the official computation: database = imlist only, queries cropped with PIL and encoded, ranks by similarity
    gt = revisited.load_revisited_gnd(gnd_path)
    engine = RetrievalEngine.open(index)
    resolver = PathResolver(engine.database.paths)
    rows = [resolver.row(name) for name in gt.images]
    database = engine.database.vectors[rows]
    crops = [crop_to_box(open_image(engine.image_root / f"{q.name}.jpg"), q.bbox) for q in gt.queries]
    assert crops[0].getpixel((crops[0].width - 1, 0)) == (0, 0, 0)  # the coffee box runs past the border: padded
    queries = engine.encode_images(crops)
    engine.close()
    ranks = np.argsort(-(database @ queries.T), axis=0, kind="stable")
    for name in revisited.PROTOCOLS:
        protocol = [{"ok": list(q.easy) if name == "easy" else (list(q.easy) + list(q.hard) if name == "medium" else list(q.hard)),
                     "junk": list(q.junk) + (list(q.hard) if name == "easy" else list(q.easy) if name == "hard" else [])}
                    for q in gt.queries]
        official_map, official_pr = revisitop_compute_map(ranks, protocol, [1, 5, 10])
        metrics = report["protocols"][name]["metrics"]
        assert metrics["mAP"] == pytest.approx(official_map, abs=1e-6), name
        assert [metrics["P@1"], metrics["P@5"], metrics["P@10"]] == pytest.approx(list(official_pr), abs=1e-6), name


def test_one_protocol_and_a_missing_query_image(revisited_set, tmp_path, capsys):
    from retrieval.cli.evaluate import main

    index, gnd_path = revisited_set
    queries = tmp_path / "queries"  # --queries: the query images elsewhere; only one of them is there
    queries.mkdir()
    shutil.copy(DEMO_DATABASE / "rocket" / "original.jpg", queries / "rocket_query.jpg")
    code = main(["--index", str(index), "--ground-truth", "revisited", "--gt-path", str(gnd_path), "--protocol", "hard",
                 "--queries", str(queries)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "revisited ground truth: 1 queries evaluated, 2 skipped" in out and "coffee_query.jpg" in err
    assert out.splitlines()[-6].split() == ["metric", "hard"]
