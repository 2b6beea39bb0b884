from pathlib import Path

import pytest

from retrieval.errors import RetrievalError
from retrieval.evaluation.groundtruth import (
    GroundTruth,
    GroundTruthError,
    Query,
    folders_from_paths,
    folders_with_queries,
    group_of,
    holidays_from_paths,
    read_csv,
    read_ground_truth,
    read_oxford,
    ukbench_from_paths,
)


def touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def by_path(gt: GroundTruth) -> dict[str, Query]:
    return {q.path: q for q in gt.queries}


def test_folders_from_paths_and_from_disk(tmp_path):
    gt = folders_from_paths(["cat/1.jpg", "cat/2.jpg", "dog/a/1.jpg", "dog/a/2.png", "dog/3.jpg", "stray.jpg"])
    queries = by_path(gt)
    assert gt.kind == "folders" and len(gt) == 5  # stray.jpg (top level) is a distractor, not a query
    assert queries["cat/1.jpg"].relevant == {"cat/2.jpg"}
    assert queries["dog/a/2.png"].relevant == {"dog/a/1.jpg"}  # nested folders are their own groups
    assert queries["dog/3.jpg"].relevant == frozenset()  # alone in its group
    assert queries["cat/1.jpg"].junk == frozenset() and queries["cat/1.jpg"].bbox is None
    assert gt.all_paths() == {"cat/1.jpg", "cat/2.jpg", "dog/a/1.jpg", "dog/a/2.png", "dog/3.jpg"}
    root = touch(tmp_path, "x/é 1.jpg", "x/2.JPG", "notes.txt", "x/.hidden.jpg")
    disk = read_ground_truth("folders", root)
    assert by_path(disk) == {
        "x/2.JPG": Query("x/2.JPG", frozenset({"x/é 1.jpg"})),
        "x/é 1.jpg": Query("x/é 1.jpg", frozenset({"x/2.JPG"})),
    }
    with pytest.raises(RetrievalError, match="no images in sub-folders"):
        folders_from_paths(["a.jpg"])
    with pytest.raises(RetrievalError, match="no such image folder"):
        read_ground_truth("folders", tmp_path / "missing")


def test_distractor_folders_are_in_no_group():
    paths = ["cat/1.jpg", "cat/2.jpg", "_distractors/x.jpg", "_more/sub/y.jpg", "top.jpg", "dog/_b/1.jpg", "dog/_b/2.jpg"]
    assert [group_of(p) for p in paths] == ["cat", "cat", None, None, None, "dog/_b", "dog/_b"]
    gt = folders_from_paths(paths)
    assert [q.path for q in gt.queries] == ["cat/1.jpg", "cat/2.jpg", "dog/_b/1.jpg", "dog/_b/2.jpg"]
    assert gt.all_paths() == {"cat/1.jpg", "cat/2.jpg", "dog/_b/1.jpg", "dog/_b/2.jpg"}  # distractors: never named
    with pytest.raises(GroundTruthError, match="folders starting with '_' hold distractors"):
        folders_from_paths(["_distractors/a.jpg", "b.jpg"])


def test_folders_with_queries_outside_the_database():
    database = ["g1/original.jpg", "g2/original.jpg", "g2/other.jpg", "_distractors/d1.jpg"]
    queries = ["g2/crop.jpg", "g1/original.jpg", "g3/flip.jpg", "loose.jpg", "_x/y.jpg"]
    gt = folders_with_queries(queries, database)
    assert gt.queries == (
        Query("_x/y.jpg", frozenset(), image="_x/y.jpg", unmatched=True),  # under a "_" folder: no copy in the database
        Query("g1/original.jpg", frozenset({"g1/original.jpg"}), image="g1/original.jpg"),  # same name, still a file
        Query("g2/crop.jpg", frozenset({"g2/original.jpg", "g2/other.jpg"}), image="g2/crop.jpg"),
        Query("g3/flip.jpg", frozenset(), image="g3/flip.jpg"),  # its group has no database image
    )
    for only in (["loose.jpg"], ["loose.jpg", "_x/y.jpg"]):  # none in a group: nothing to score
        with pytest.raises(GroundTruthError, match="no images in sub-folders of the query folder"):
            folders_with_queries(only, database)


def test_holidays_official_list_keeps_images_the_index_lacks(tmp_path):
    listing = tmp_path / "holidays_images.dat"
    listing.write_text("100000.jpg\n100001.jpg\n100002.jpg\n\n100100.jpg\n100101.jpg\n100200.jpg\n")
    gt = read_ground_truth("holidays", listing)
    assert gt.kind == "holidays" and gt.queries == (
        Query("100000.jpg", frozenset({"100001.jpg", "100002.jpg"})),
        Query("100100.jpg", frozenset({"100101.jpg"})),
        Query("100200.jpg", frozenset()),
    )
    for text, message in [
        ("100001.jpg\n100000.jpg\n", "comes before the first query"),
        ("100000.jpg\nholiday.jpg\n", "holidays_images.dat:2: expected an image name like 100000.jpg"),
        ("100000.jpg\n100001.jpg\n100001.jpg\n", "listed more than once"),
        ("\n", "no image names"),
    ]:
        listing.write_text(text)
        with pytest.raises(GroundTruthError, match=message):
            read_ground_truth("holidays", listing)
    assert issubclass(GroundTruthError, RetrievalError) and issubclass(GroundTruthError, ValueError)


def test_holidays_groups_by_id_div_100_and_queries_end_in_00():
    gt = holidays_from_paths(["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg", "sub/100200.jpg"])
    queries = by_path(gt)
    assert list(queries) == ["100000.jpg", "100100.jpg", "sub/100200.jpg"]
    assert queries["100000.jpg"].relevant == {"100001.jpg", "100002.jpg"}
    assert queries["100100.jpg"].relevant == {"100101.jpg"}
    assert queries["sub/100200.jpg"].relevant == frozenset()
    with pytest.raises(RetrievalError, match="'holiday.jpg' is not named like 100000.jpg"):
        holidays_from_paths(["100000.jpg", "holiday.jpg"])
    with pytest.raises(RetrievalError, match="no query images"):
        holidays_from_paths(["100001.jpg"])


def test_ukbench_groups_of_four_every_image_a_query():
    names = [f"ukbench{i:05d}.jpg" for i in range(6)]
    gt = ukbench_from_paths(names)
    queries = by_path(gt)
    assert len(gt) == 6
    assert queries["ukbench00002.jpg"].relevant == {"ukbench00000.jpg", "ukbench00001.jpg", "ukbench00003.jpg"}
    assert queries["ukbench00005.jpg"].relevant == {"ukbench00004.jpg"}
    with pytest.raises(RetrievalError, match="not named like ukbench00000.jpg"):
        ukbench_from_paths(["ukbench1.jpg"])


def write_oxford(folder: Path, base="all_souls_1", query="oxc1_all_souls_000013 136.5 34.1 648.5 955.9\n"):
    folder.mkdir(exist_ok=True)
    (folder / f"{base}_query.txt").write_text(query)
    (folder / f"{base}_good.txt").write_text("all_souls_000013\nall_souls_000026\n")
    (folder / f"{base}_ok.txt").write_text("all_souls_000040\n\n")
    (folder / f"{base}_junk.txt").write_text("all_souls_000091\n")
    return folder


def test_oxford_files(tmp_path):
    gt = read_oxford(write_oxford(tmp_path / "gt"))
    assert gt.kind == "oxford"
    assert gt.queries == (
        Query(
            "all_souls_000013.jpg",
            frozenset({"all_souls_000013.jpg", "all_souls_000026.jpg", "all_souls_000040.jpg"}),
            frozenset({"all_souls_000091.jpg"}),
            (136.5, 34.1, 648.5, 955.9),
        ),
    )


def test_oxford_errors(tmp_path):
    with pytest.raises(RetrievalError, match="no such ground-truth folder"):
        read_oxford(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrievalError, match="no \\*_query.txt"):
        read_oxford(tmp_path / "empty")
    folder = write_oxford(tmp_path / "bad_box", query="oxc1_all_souls_000013 136.5 x 648.5 955.9")
    with pytest.raises(RetrievalError, match="four numbers"):
        read_oxford(folder)
    folder = write_oxford(tmp_path / "flat_box", query="all_souls_000013 10 10 10 20")
    with pytest.raises(RetrievalError, match="empty or negative"):
        read_oxford(folder)
    folder = write_oxford(tmp_path / "no_junk")
    (folder / "all_souls_1_junk.txt").unlink()
    with pytest.raises(RetrievalError, match="all_souls_1_junk.txt: no such file"):
        read_oxford(folder)


def test_csv_groups_rows_by_query(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text(
        "\ufeffquery,relevant\n"
        "q/1.jpg,a.jpg\n"
        "\n"
        "q\\2.jpg,b.jpg\n"
        "q/1.jpg,./c.jpg\n"
        "q/1.jpg,q/1.jpg\n",
        encoding="utf-8",
    )
    gt = read_ground_truth("csv", path)
    assert gt.queries == (Query("q/1.jpg", frozenset({"a.jpg", "c.jpg"})), Query("q/2.jpg", frozenset({"b.jpg"})))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty CSV"),
        ("query,target\na,b\n", "must name the columns 'query' and 'relevant'"),
        ("query,relevant\n", "no query,relevant rows"),
        ("query,relevant\na.jpg\n", r"gt.csv:2: expected a query and a relevant path"),
        ("query,relevant\na.jpg,../b.jpg\n", "relative to the image folder"),
        ("query,relevant\n/etc/x.jpg,b.jpg\n", "relative to the image folder"),
        ("query,relevant\na.jpg, \n", "gt.csv:2: empty path"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "gt.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RetrievalError, match=message):
        read_csv(path)


def test_csv_missing_or_binary_and_unknown_kind(tmp_path):
    with pytest.raises(RetrievalError, match="no such file"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00query")
    with pytest.raises(RetrievalError, match="not UTF-8"):
        read_csv(tmp_path / "bin.csv")
    with pytest.raises(RetrievalError, match="unknown ground truth kind 'trec'"):
        read_ground_truth("trec", tmp_path)
    with pytest.raises(GroundTruthError, match="unknown ground truth kind 'revisited'.*choose from folders"):
        read_ground_truth("revisited", tmp_path)
