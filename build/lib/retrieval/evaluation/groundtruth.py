"""Ground truth for retrieval evaluation: which database images answer which query.

Every format is read into one structure, ``GroundTruth``: a tuple of ``Query(path, relevant, junk, bbox)`` with paths
relative to the image folder, POSIX separators. Readers (``GROUND_TRUTH_KINDS``):

* ``folders``  every sub-folder is a relevance group; every image in a group is a query whose relevant set is the rest
  of its folder. Images directly in the top folder belong to no group: distractors, never queries.
* ``holidays`` INRIA Holidays names ``XXXXYY.jpg`` (six digits): the images sharing the first four digits (id // 100)
  form a group; the ``YY == 00`` image is the group's query, the others its relevant set.
* ``ukbench``  ``ukbench00000.jpg`` ...: four consecutive numbers (id // 4) form a group; every image is a query.
* ``oxford``   Oxford5k/Paris6k ground-truth folder: ``<name>_<n>_query.txt`` holds ``[oxc1_]<image> x1 y1 x2 y2``
  (the query region in pixels); ``_good.txt`` and ``_ok.txt`` list relevant images, ``_junk.txt`` junk, one name
  (no extension) a line. Paths become ``<image>.jpg``; evaluation matches them to the index by file stem too.
* ``csv``      a CSV file with header ``query,relevant`` and one pair per row; rows of one query are merged. A query is
  never relevant to itself (self-pairs are dropped).

The path-list readers (``folders_from_paths`` ...) are pure; ``read_*`` take a folder or file and raise
``RetrievalError`` with a one-line reason for anything malformed.
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

GROUND_TRUTH_KINDS = ("folders", "holidays", "ukbench", "oxford", "csv")

HOLIDAYS_NAME = re.compile(r"^(\d{6})\.[A-Za-z]+$")
UKBENCH_NAME = re.compile(r"^ukbench(\d{5})\.[A-Za-z]+$", re.IGNORECASE)
OXFORD_QUERY_FILE = re.compile(r"^(.+_\d+)_query\.txt$")


@dataclass(frozen=True)
class Query:
    """One query: its image, the images that should be found, those to ignore, and an optional region of interest.

    ``bbox`` is (x1, y1, x2, y2) in pixels of the query image (Oxford/Paris), or None for the whole image.
    """

    path: str
    relevant: frozenset[str]
    junk: frozenset[str] = frozenset()
    bbox: tuple[float, float, float, float] | None = None


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


def folders_from_paths(paths: Iterable[str]) -> GroundTruth:
    """Group relative POSIX paths by their folder; see the module docstring. Raises RetrievalError if no group."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        parent = PurePosixPath(path).parent.as_posix()
        if parent != ".":
            groups[parent].append(path)
    if not groups:
        raise RetrievalError("folders ground truth: no images in sub-folders (each sub-folder is one group)")
    return GroundTruth(_groups_to_queries(groups, lambda members: members), "folders")


def read_folders(root: str | os.PathLike) -> GroundTruth:
    """``folders_from_paths`` of every image under ``root``."""
    return folders_from_paths(_images_in(root, "folders"))


# --------------------------------------------------------------------------- Holidays


def holidays_from_paths(paths: Iterable[str]) -> GroundTruth:
    """INRIA Holidays groups from file names (anywhere in the tree); other names raise RetrievalError."""
    groups: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        match = HOLIDAYS_NAME.match(PurePosixPath(path).name)
        if not match:
            raise RetrievalError(f"holidays ground truth: {path!r} is not named like 100000.jpg (six digits)")
        groups[int(match.group(1)) // 100].append(path)
    if not groups:
        raise RetrievalError("holidays ground truth: no images")

    def queries_of(members):
        return [m for m in members if int(HOLIDAYS_NAME.match(PurePosixPath(m).name).group(1)) % 100 == 0]

    queries = _groups_to_queries(groups, queries_of)
    if not queries:
        raise RetrievalError("holidays ground truth: no query images (names ending in 00, like 100000.jpg)")
    return GroundTruth(queries, "holidays")


def read_holidays(root: str | os.PathLike) -> GroundTruth:
    return holidays_from_paths(_images_in(root, "holidays"))


# --------------------------------------------------------------------------- UKBench


def ukbench_from_paths(paths: Iterable[str]) -> GroundTruth:
    """UKBench groups of four from file names (anywhere in the tree); other names raise RetrievalError."""
    groups: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        match = UKBENCH_NAME.match(PurePosixPath(path).name)
        if not match:
            raise RetrievalError(f"ukbench ground truth: {path!r} is not named like ukbench00000.jpg")
        groups[int(match.group(1)) // 4].append(path)
    if not groups:
        raise RetrievalError("ukbench ground truth: no images")
    return GroundTruth(_groups_to_queries(groups, lambda members: members), "ukbench")


def read_ukbench(root: str | os.PathLike) -> GroundTruth:
    return ukbench_from_paths(_images_in(root, "ukbench"))


# --------------------------------------------------------------------------- Oxford / Paris


def read_oxford(folder: str | os.PathLike) -> GroundTruth:
    """Oxford5k / Paris6k ground-truth folder -> one query per ``*_query.txt``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RetrievalError(f"{folder}: no such ground-truth folder")
    names = sorted(p.name for p in folder.iterdir() if OXFORD_QUERY_FILE.match(p.name))
    if not names:
        raise RetrievalError(f"{folder}: no *_query.txt files (expected Oxford/Paris ground truth)")
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
        raise RetrievalError(f"{path}: expected '<image> x1 y1 x2 y2', got {text.strip()[:80]!r}")
    image = fields[0].removeprefix("oxc1_")
    try:
        x1, y1, x2, y2 = (float(v) for v in fields[1:])
    except ValueError:
        raise RetrievalError(f"{path}: the query box must be four numbers, got {' '.join(fields[1:])!r}") from None
    if not (x2 > x1 >= 0 and y2 > y1 >= 0):
        raise RetrievalError(f"{path}: empty or negative query box ({x1}, {y1}, {x2}, {y2})")
    return image, (x1, y1, x2, y2)


def _read_name_list(path: Path) -> set[str]:
    names = set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) != 1 or "/" in name or "\\" in name:
            raise RetrievalError(f"{path}:{number}: expected one image name a line, got {name[:80]!r}")
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
        raise RetrievalError(f"{path}: empty CSV file (expected a header 'query,relevant')") from None
    except csv.Error as exc:
        raise RetrievalError(f"{path}: not a readable CSV file ({exc})") from None
    if "query" not in header or "relevant" not in header:
        raise RetrievalError(f"{path}: the header must name the columns 'query' and 'relevant', got {','.join(header)!r}")
    query_col, relevant_col = header.index("query"), header.index("relevant")
    relevant: dict[str, set[str]] = {}
    try:
        for number, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(query_col, relevant_col):
                raise RetrievalError(f"{path}:{number}: expected a query and a relevant path, got {','.join(row)[:80]!r}")
            query = _clean_relative(row[query_col], f"{path}:{number}")
            target = _clean_relative(row[relevant_col], f"{path}:{number}")
            group = relevant.setdefault(query, set())
            if target != query:
                group.add(target)
    except csv.Error as exc:
        raise RetrievalError(f"{path}: not a readable CSV file ({exc})") from None
    if not relevant:
        raise RetrievalError(f"{path}: no query,relevant rows after the header")
    return GroundTruth(tuple(Query(q, frozenset(r)) for q, r in relevant.items()), "csv")


def _clean_relative(value: str, where: str) -> str:
    """A relative POSIX path from user text: backslashes become slashes, './' is dropped; '..' and absolute refused."""
    text = value.strip().replace("\\", "/")
    if not text:
        raise RetrievalError(f"{where}: empty path")
    path = PurePosixPath(text)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", text) or ".." in path.parts:
        raise RetrievalError(f"{where}: paths must be relative to the image folder, got {value.strip()!r}")
    return path.as_posix()


# --------------------------------------------------------------------------- shared


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RetrievalError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RetrievalError(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise RetrievalError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _images_in(root: str | os.PathLike, kind: str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"{root}: no such image folder for the {kind} ground truth")
    paths = list_image_files(root)
    if not paths:
        raise RetrievalError(f"{root}: no image files for the {kind} ground truth")
    return paths


FROM_PATHS = {"folders": folders_from_paths, "holidays": holidays_from_paths, "ukbench": ukbench_from_paths}
"""Kinds that can be derived from a list of image paths alone (e.g. the paths stored in an index)."""


def read_ground_truth(kind: str, path: str | os.PathLike) -> GroundTruth:
    """Read ground truth of ``kind`` from ``path`` (an image folder, the Oxford gt folder, or the CSV file)."""
    readers = {"folders": read_folders, "holidays": read_holidays, "ukbench": read_ukbench, "oxford": read_oxford, "csv": read_csv}
    if kind not in readers:
        raise RetrievalError(f"unknown ground truth kind {kind!r}; choose from {', '.join(GROUND_TRUTH_KINDS)}")
    return readers[kind](path)
