"""The command-line faces (``index``, ``query``, ``server``, ``evaluate``: each a ``main(argv)`` that the top-level
scripts and the console scripts call) and what they share: one-line errors, exit codes, argument types."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import RetrievalError
from ..files import describe_os_error

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def run(main: Callable[[], int | None]) -> int:
    """Call ``main``; a RetrievalError becomes ``error: <message>`` on stderr and exit 1, Ctrl-C exit 130."""
    try:
        return main() or 0
    except RetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the system refused something no check foresaw (a disk filled up meanwhile)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return EXIT_ERROR


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def name_value(text: str) -> tuple[str, float]:
    """argparse type for NAME=VALUE (a number)."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), finite_float(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def number_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite numbers, e.g. 1,0.707,0.5."""
    try:
        values = tuple(finite_float(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,0.707,0.5, got {text!r}") from None
    return values


def cutoff_list(text: str) -> list[int]:
    """argparse type: ``1,5,10`` -> [1, 5, 10], every value >= 1."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every k must be at least 1, got {text!r}")
    return sorted(set(values))


def nonempty_path(text: str) -> str:
    """argparse type: a path that is not empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return text
