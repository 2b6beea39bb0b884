"""What every command-line face shares: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import RetrievalError

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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
