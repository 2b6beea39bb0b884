"""Ground truth for retrieval evaluation: which database images answer which query.

Every format is read into one structure, ``GroundTruth``: a tuple of ``Query(path, relevant, junk, bbox, image)`` with
paths relative to the image folder, POSIX separators. Readers (``GROUND_TRUTH_KINDS``):

* ``folders``  every sub-folder is a relevance group; every image in a group is a query whose relevant set is the rest
  of its folder. Distractors belong to no group, are never queries and never relevant (like Oxford105k's or
  Holidays+Flickr100k's): images directly in the top folder, and everything under a top-level sub-folder whose name
  starts with ``_`` (``_distractors/``). ``folders_with_queries`` is the other protocol of the same layout: queries
  that are not database images (``evaluate.py --queries DIR``: copy detection, a held-out query set); there, the
  images under a top-level ``_`` folder of the query folder are queries with no copy in the database (DISC21's
  queries without a reference: their results can only be false matches, counted by µAP alone).
* ``holidays`` INRIA Holidays: from the official image list (``holidays_images.dat``, as ``holidays_map.py`` reads
  it: a name ending in ``00`` starts a group and is its query, the names after it are its relevant set), or from the
  names ``XXXXYY.jpg`` of the images themselves (the images sharing the first four digits form a group; the
  ``YY == 00`` image is the query). Only the list keeps an image the index lacks in the relevant set.
* ``ukbench``  ``ukbench00000.jpg`` ...: four consecutive numbers (id // 4) form a group; every image is a query.
* ``oxford``   Oxford5k/Paris6k ground-truth folder: ``<name>_<n>_query.txt`` holds ``[oxc1_]<image> x1 y1 x2 y2``
  (the query region in pixels); ``_good.txt`` and ``_ok.txt`` list relevant images, ``_junk.txt`` junk, one name
  (no extension) a line. Paths become ``<image>.jpg``; evaluation matches them to the index by file stem too.
* ``revisited`` Revisited Oxford/Paris (``gnd_roxford5k.pkl``): three protocols, read by
  ``retrieval.evaluation.revisited``.
* ``csv``      a CSV file with header ``query,relevant`` and one pair per row; rows of one query are merged. A query is
  never relevant to itself (self-pairs are dropped).

The path-list readers (``folders_from_paths`` ...) are pure; ``read_*`` take a folder or file and raise
``GroundTruthError`` with a one-line reason for anything malformed.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..errors import RetrievalError
from ..images import list_image_files

GROUND_TRUTH_KINDS = ("folders", "holidays", "ukbench", "oxford", "revisited", "csv")
DISTRACTOR_PREFIX = "_"

HOLIDAYS_NAME = re.compile(r"^(\d{6})\.[A-Za-z]+$")
UKBENCH_NAME = re.compile(r"^ukbench(\d{5})\.[A-Za-z]+$", re.IGNORECASE)
OXFORD_QUERY_FILE = re.compile(r"^(.+_\d+)_query\.txt$")


class GroundTruthError(RetrievalError, ValueError):
    """Ground truth that cannot be used: a missing or malformed file, a list that contradicts itself."""


@dataclass(frozen=True)
class Query:
    """One query: its name, the images that should be found, those to ignore, an optional region of interest, and
    where its image is when it is not a database image.

    ``bbox`` is (x1, y1, x2, y2) in pixels of the query image (Oxford/Paris), or None for the whole image. ``image``
    is None when the query is the database image ``path`` (its stored vector is used, and it is left out of its own
    ranking); otherwise the query's file, relative to the query folder, always encoded afresh and never matched to a
    database row (``--queries``, Revisited Oxford/Paris).
    """

    path: str
    relevant: frozenset[str]
    junk: frozenset[str] = frozenset()
    bbox: tuple[float, float, float, float] | None = None
    image: str | None = None
    unmatched: bool = False  # a query with no copy in the database (``folders_with_queries``): µAP only


@dataclass(frozen=True)
class GroundTruth:
    """The queries of one benchmark, in a stable order; ``kind`` names the protocol (one of ``GROUND_TRUTH_KINDS``)."""

    queries: tuple[Query, ...]
    kind: str

    def __len__(self) -> int:
        return len(self.queries)

    def all_paths(self) -> set[str]:
        """Every path the ground truth mentions (queries, relevant, junk)."""
        paths: set[str] = set()
        for query in self.queries:
            paths.add(query.path)
            paths |= query.relevant | query.junk
        return paths


def _groups_to_queries(groups: dict, queries_of) -> tuple[Query, ...]:
    out = []
    for key in sorted(groups):
        members = sorted(groups[key])
        for path in queries_of(members):
            out.append(Query(path, frozenset(m for m in members if m != path)))
    return tuple(out)


# --------------------------------------------------------------------------- folders


def group_of(path: str) -> str | None:
    """The relevance group of a relative POSIX path in the folders layout: its folder, or None for a distractor (an
    image directly in the top folder or under a top-level ``_`` folder)."""
    parts = PurePosixPath(path).parts
    if len(parts) < 2 or parts[0].startswith(DISTRACTOR_PREFIX):
        return None
    return PurePosixPath(path).parent.as_posix()


def folder_groups(paths: Iterable[str]) -> dict[str, list[str]]:
    """group -> its paths, in input order; distractors are left out."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        group = group_of(path)
        if group is not None:
            groups[group].append(path)
    return groups


def folders_from_paths(paths: Iterable[str]) -> GroundTruth:
    """Group relative POSIX paths by their folder; see the module docstring. GroundTruthError if there is no group."""
    groups = folder_groups(paths)
    if not groups:
        raise GroundTruthError("folders ground truth: no images in sub-folders (each sub-folder is one group; "
                               f"folders starting with {DISTRACTOR_PREFIX!r} hold distractors)")
    return GroundTruth(_groups_to_queries(groups, lambda members: members), "folders")


def read_folders(root: str | os.PathLike) -> GroundTruth:
    """``folders_from_paths`` of every image under ``root``."""
    return folders_from_paths(_images_in(root, "folders"))


def folders_with_queries(query_paths: Iterable[str], database_paths: Iterable[str]) -> GroundTruth:
    """Queries outside the database: each ``<group>/<name>`` of ``query_paths`` (relative to the query folder) is a
    query encoded from its file, relevant to the database images of ``<group>/`` (the copy-detection protocol: edited
    copies against originals + distractors). Each image under a top-level ``_`` folder (``DIR/_unmatched/...``) is a
    query that has no copy in the database (``Query.unmatched``). Images directly in the query folder are not queries.
    A query whose group has no database image keeps an empty relevant set (``prepare_queries`` skips it, saying so).
    """
    groups = folder_groups(database_paths)
    queries = []
    for path in sorted(query_paths):
        group = group_of(path)
        if group is not None:
            queries.append(Query(path, frozenset(groups.get(group, ())), image=path))
        elif len(PurePosixPath(path).parts) > 1:
            queries.append(Query(path, frozenset(), image=path, unmatched=True))
    if not any(not query.unmatched for query in queries):
        raise GroundTruthError("--queries: no images in sub-folders of the query folder (DIR/<group>/<image>)")
    return GroundTruth(tuple(queries), "folders")


# --------------------------------------------------------------------------- Holidays


def holidays_from_paths(paths: Iterable[str]) -> GroundTruth:
    """INRIA Holidays groups from file names (anywhere in the tree); other names raise GroundTruthError."""
    groups: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        match = HOLIDAYS_NAME.match(PurePosixPath(path).name)
        if not match:
            raise GroundTruthError(f"holidays ground truth: {path!r} is not named like 100000.jpg (six digits)")
        groups[int(match.group(1)) // 100].append(path)
    if not groups:
        raise GroundTruthError("holidays ground truth: no images")

    def queries_of(members):
        return [m for m in members if int(HOLIDAYS_NAME.match(PurePosixPath(m).name).group(1)) % 100 == 0]

    queries = _groups_to_queries(groups, queries_of)
    if not queries:
        raise GroundTruthError("holidays ground truth: no query images (names ending in 00, like 100000.jpg)")
    return GroundTruth(queries, "holidays")


def read_holidays_list(path: str | os.PathLike) -> GroundTruth:
    """The official INRIA list (``holidays_images.dat``: one image name a line, in order), read as ``holidays_map.py``
    reads it: a name whose number ends in 00 starts a group and is its query; the names that follow, up to the next
    query, are its relevant set. Names stay bare (``100001.jpg``) and match the index by file stem, and an image the
    index lacks stays relevant (counted as missed), as in the official script."""
    path = Path(path)
    names: list[str] = []
    queries: list[tuple[str, list[str]]] = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        match = HOLIDAYS_NAME.match(name)
        if not match:
            raise GroundTruthError(f"{path}:{number}: expected an image name like 100000.jpg, got {name[:80]!r}")
        names.append(name)
        if int(match.group(1)) % 100 == 0:
            queries.append((name, []))
        elif not queries:
            raise GroundTruthError(f"{path}:{number}: {name} comes before the first query (a name ending in 00)")
        else:
            queries[-1][1].append(name)
    if not queries:
        raise GroundTruthError(f"{path}: no image names (expected the Holidays list, one name like 100000.jpg a line)")
    if len(set(names)) != len(names):
        raise GroundTruthError(f"{path}: an image is listed more than once")
    return GroundTruth(tuple(Query(name, frozenset(relevant)) for name, relevant in queries), "holidays")


def read_holidays(path: str | os.PathLike) -> GroundTruth:
    """``read_holidays_list`` of a file, or ``holidays_from_paths`` of the images in a folder."""
    if Path(path).is_file():
        return read_holidays_list(path)
    return holidays_from_paths(_images_in(path, "holidays"))


# --------------------------------------------------------------------------- UKBench


def ukbench_from_paths(paths: Iterable[str]) -> GroundTruth:
    """UKBench groups of four from file names (anywhere in the tree); other names raise GroundTruthError."""
    groups: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        match = UKBENCH_NAME.match(PurePosixPath(path).name)
        if not match:
            raise GroundTruthError(f"ukbench ground truth: {path!r} is not named like ukbench00000.jpg")
        groups[int(match.group(1)) // 4].append(path)
    if not groups:
        raise GroundTruthError("ukbench ground truth: no images")
    return GroundTruth(_groups_to_queries(groups, lambda members: members), "ukbench")


def read_ukbench(root: str | os.PathLike) -> GroundTruth:
    return ukbench_from_paths(_images_in(root, "ukbench"))


# --------------------------------------------------------------------------- Oxford / Paris


def read_oxford(folder: str | os.PathLike) -> GroundTruth:
    """Oxford5k / Paris6k ground-truth folder -> one query per ``*_query.txt``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GroundTruthError(f"{folder}: no such ground-truth folder")
    names = sorted(p.name for p in folder.iterdir() if OXFORD_QUERY_FILE.match(p.name))
    if not names:
        raise GroundTruthError(f"{folder}: no *_query.txt files (expected Oxford/Paris ground truth)")
    queries = []
    for name in names:
        base = OXFORD_QUERY_FILE.match(name).group(1)
        image, bbox = _parse_oxford_query(folder / name)
        good, ok, junk = (_read_name_list(folder / f"{base}_{part}.txt") for part in ("good", "ok", "junk"))
        queries.append(Query(f"{image}.jpg", frozenset(f"{n}.jpg" for n in good | ok), frozenset(f"{n}.jpg" for n in junk), bbox))
    return GroundTruth(tuple(queries), "oxford")


def _parse_oxford_query(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    text = _read_text(path)
    fields = text.split()
    if len(fields) != 5:
        raise GroundTruthError(f"{path}: expected '<image> x1 y1 x2 y2', got {text.strip()[:80]!r}")
    image = fields[0].removeprefix("oxc1_")
    try:
        x1, y1, x2, y2 = (float(v) for v in fields[1:])
    except ValueError:
        raise GroundTruthError(f"{path}: the query box must be four numbers, got {' '.join(fields[1:])!r}") from None
    if not (x2 > x1 >= 0 and y2 > y1 >= 0):
        raise GroundTruthError(f"{path}: empty or negative query box ({x1}, {y1}, {x2}, {y2})")
    return image, (x1, y1, x2, y2)


def _read_name_list(path: Path) -> set[str]:
    names = set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) != 1 or "/" in name or "\\" in name:
            raise GroundTruthError(f"{path}:{number}: expected one image name a line, got {name[:80]!r}")
        names.add(name)
    return names


# --------------------------------------------------------------------------- CSV


def read_csv(path: str | os.PathLike) -> GroundTruth:
    """CSV with header ``query,relevant`` (UTF-8, optional BOM); further columns are ignored. Queries in file order."""
    path = Path(path)
    text = _read_text(path)
    rows = csv.reader(text.splitlines())
    try:
        header = [cell.strip().lower() for cell in next(rows)]
    except StopIteration:
        raise GroundTruthError(f"{path}: empty CSV file (expected a header 'query,relevant')") from None
    except csv.Error as exc:
        raise GroundTruthError(f"{path}: not a readable CSV file ({exc})") from None
    if "query" not in header or "relevant" not in header:
        raise GroundTruthError(f"{path}: the header must name the columns 'query' and 'relevant', got {','.join(header)!r}")
    query_col, relevant_col = header.index("query"), header.index("relevant")
    relevant: dict[str, set[str]] = {}
    try:
        for number, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(query_col, relevant_col):
                raise GroundTruthError(f"{path}:{number}: expected a query and a relevant path, got {','.join(row)[:80]!r}")
            query = _clean_relative(row[query_col], f"{path}:{number}")
            target = _clean_relative(row[relevant_col], f"{path}:{number}")
            group = relevant.setdefault(query, set())
            if target != query:
                group.add(target)
    except csv.Error as exc:
        raise GroundTruthError(f"{path}: not a readable CSV file ({exc})") from None
    if not relevant:
        raise GroundTruthError(f"{path}: no query,relevant rows after the header")
    return GroundTruth(tuple(Query(q, frozenset(r)) for q, r in relevant.items()), "csv")


def _clean_relative(value: str, where: str) -> str:
    """A relative POSIX path from user text: backslashes become slashes, './' is dropped; '..' and absolute refused."""
    text = value.strip().replace("\\", "/")
    if not text:
        raise GroundTruthError(f"{where}: empty path")
    path = PurePosixPath(text)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", text) or ".." in path.parts:
        raise GroundTruthError(f"{where}: paths must be relative to the image folder, got {value.strip()!r}")
    return path.as_posix()


# --------------------------------------------------------------------------- shared


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GroundTruthError(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise GroundTruthError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise GroundTruthError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _images_in(root: str | os.PathLike, kind: str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise GroundTruthError(f"{root}: no such image folder for the {kind} ground truth")
    paths = list_image_files(root)
    if not paths:
        raise GroundTruthError(f"{root}: no image files for the {kind} ground truth")
    return paths


FROM_PATHS = {"folders": folders_from_paths, "holidays": holidays_from_paths, "ukbench": ukbench_from_paths}
"""Kinds that can be derived from a list of image paths alone (e.g. the paths stored in an index)."""


def read_ground_truth(kind: str, path: str | os.PathLike) -> GroundTruth:
    """Read ground truth of ``kind`` from ``path`` (an image folder, the Holidays list, the Oxford gt folder, or the
    CSV file). ``revisited`` has three protocols: ``retrieval.evaluation.revisited.load_revisited_gnd`` reads it."""
    readers = {"folders": read_folders, "holidays": read_holidays, "ukbench": read_ukbench, "oxford": read_oxford, "csv": read_csv}
    if kind not in readers:
        known = ", ".join(k for k in GROUND_TRUTH_KINDS if k in readers)
        raise GroundTruthError(f"unknown ground truth kind {kind!r} for read_ground_truth; choose from {known}")
    return readers[kind](path)
