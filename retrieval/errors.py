"""Errors that reach users as one line: every face catches ``RetrievalError`` and prints ``error: <message>``."""


class RetrievalError(Exception):
    """Base class of every expected, user-facing failure."""


class ImageError(RetrievalError):
    """An image that cannot be used: missing, unreadable, corrupt, truncated, too large, not an image."""


class WeightsError(RetrievalError):
    """Model weights that cannot be found, loaded or trusted."""


class IndexFileError(RetrievalError):
    """A feature database that is missing, corrupt, foreign, of a newer format, or incompatible with a request."""
