"""File mechanics done one way: atomic replacement, leftovers of killed runs, and checks of paths we read or write.

``atomic_replace(target)`` is the only way this package replaces a file: a temporary file in the same folder
(``.<name>.<random>.tmp``), written by the caller, fsynced, renamed over the target, then the folder fsynced, so after
a crash at any instant the target is the old file or the complete new one. A failure removes the temporary file.
``remove_leftovers(target)`` deletes temporaries that a killed run could not remove.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from .errors import RetrievalError

TEMPORARY_SUFFIX = ".tmp"
NAME_MAX_BYTES = 255


def temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. some network file systems)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def atomic_replace(target: str | os.PathLike, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for the caller to write; on success it replaces ``target`` atomically.

    The caller may write the path by name (h5py, faiss) or open it; it is fsynced here before the rename.
    """
    target = Path(target)
    temporary = temporary_name(target)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_folder(target.parent)


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    with atomic_replace(target, mode=mode) as temporary:
        temporary.write_bytes(data)


def remove_leftovers(target: str | os.PathLike) -> int:
    """Delete ``.<name>.*.tmp`` files beside ``target`` left by killed runs; returns how many were removed."""
    target = Path(target)
    removed = 0
    with contextlib.suppress(OSError):
        for leftover in target.parent.glob(f".{target.name}.*{TEMPORARY_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed += 1
    return removed


def describe_os_error(exc: OSError) -> str:
    """A short reason for an OSError, naming a full disk plainly."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return exc.strerror or str(exc) or type(exc).__name__


def check_name_lengths(path: Path, what: str) -> None:
    """RetrievalError when a component of ``path`` is longer than file systems allow (255 bytes)."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX_BYTES:
            raise RetrievalError(f"{what} {str(path)[:80]}...: a path component is longer than {NAME_MAX_BYTES} bytes")


def check_readable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is an existing regular file (not a FIFO, device or folder); else RetrievalError.

    Reading a FIFO would block forever: special files are refused before anything opens them.
    """
    path = Path(path)
    if not str(path):
        raise RetrievalError(f"empty {what} path")
    check_name_lengths(path, what)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RetrievalError(f"{path}: no such {what}", kind="not_found") from None
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot read the {what} ({describe_os_error(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise RetrievalError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise RetrievalError(f"{path}: not a regular file (a FIFO, socket or device); give a {what}")
    return path


def check_writable_target(path: str | os.PathLike, what: str = "file") -> Path:
    """Check before any work that ``path`` can be created or replaced: the name, the folder, and write access.

    Creates missing parent folders. RetrievalError with the reason otherwise.
    """
    path = Path(path)
    if not str(path) or path.name in ("", ".", ".."):
        raise RetrievalError(f"{what} path {str(path)!r} names no file")
    check_name_lengths(path, what)
    if path.exists() or path.is_symlink():
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise RetrievalError(f"{path}: is a folder; give the path of the {what} to write")
        if not stat.S_ISREG(info.st_mode):
            raise RetrievalError(f"{path}: not a regular file (a FIFO, socket or device)")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot create its folder ({describe_os_error(exc)})") from None
    probe = temporary_name(path)
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise RetrievalError(f"{path}: cannot write there ({describe_os_error(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path
