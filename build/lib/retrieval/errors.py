"""Errors that reach users as one line: every face catches ``RetrievalError`` and prints ``error: <message>``.

Each error class carries a ``kind`` (what went wrong, not where); the faces map a kind to an exit status
(``retrieval.cli``) or an HTTP status (``retrieval.web``), never the message text.
"""

KINDS = ("invalid", "not_found", "conflict", "too_large", "unsupported", "unavailable", "corrupt")
"""invalid: a bad request or option; not_found: a missing file, id or collection; conflict: the request contradicts
the existing state (another encoder, an older index version); too_large: over a size limit; unsupported: not a format
that can be used; unavailable: a service, model or index that cannot be reached now; corrupt: stored data that fails
its checks."""


class RetrievalError(Exception):
    """Base class of every expected, user-facing failure."""

    kind = "invalid"

    def __init__(self, message: str = "", *, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"unknown error kind {kind!r}")
            self.kind = kind


class ImageError(RetrievalError):
    """An image that cannot be used: missing, unreadable, corrupt, truncated, too large, not an image."""

    kind = "unsupported"


class WeightsError(RetrievalError):
    """Model weights that cannot be found, loaded or trusted."""

    kind = "unavailable"


class IndexFileError(RetrievalError):
    """A feature database that is missing, corrupt, foreign, of a newer format, or incompatible with a request."""

    kind = "invalid"


class BackendError(RetrievalError):
    """A search backend (faiss files, a Milvus collection or server) that cannot be used now."""

    kind = "unavailable"
