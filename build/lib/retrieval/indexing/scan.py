"""Stage 1: what is in the image folder (relative path -> size and modification time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RetrievalError
from ..files import describe_os_error
from ..images import IMAGE_EXTENSIONS, list_image_files


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


@dataclass
class Scan:
    """The image files found (relative POSIX path -> stat) and those skipped with a reason."""

    root: Path
    stats: dict[str, FileStat]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def scan_folder(root: Path) -> Scan:
    """Every image file under ``root``; files that cannot be stat'ed or whose name is not valid UTF-8 are skipped
    (the database stores UTF-8 paths). RetrievalError for a missing folder or one without images."""
    if not root.exists():
        raise RetrievalError(f"{root}: no such folder", kind="not_found")
    if not root.is_dir():
        raise RetrievalError(f"{root}: not a folder")
    stats, skipped = {}, []
    for rel in list_image_files(root):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            skipped.append((shown, "file name is not valid UTF-8: rename it to index it"))
            continue
        try:
            info = (root / rel).stat()
        except OSError as exc:
            skipped.append((rel, f"cannot read ({describe_os_error(exc)})"))
            continue
        stats[rel] = FileStat(info.st_size, info.st_mtime_ns)
    if not stats:
        raise RetrievalError(f"{root}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Scan(root, stats, skipped)
