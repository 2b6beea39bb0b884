"""The live index behind the web app: the engine being served, its version, hot reload, and the thumbnail cache.

This is the resource lifecycle, kept apart from the routes (as Flask's tutorial keeps ``db.py`` apart from its
blueprints): a request takes a *lease* on the current version (``lease()``, released at teardown by ``init_app``), so
a reload never changes the data under a running request, and a replaced engine is closed (its backend connection
released) once its last request is done.

Reload: at most once per ``check_interval`` seconds a request stats the index file; when its (inode, mtime, size)
changed (``index.py`` replaces it atomically), that request reads the new file whole (``RetrievalEngine.open`` with
``previous``, which keeps the extractor when the encoder is unchanged) and swaps it in; one reload runs at a time and
other requests keep using the previous version meanwhile. A failed reload is logged and the previous version keeps
being served. A missing index file is not an error: searches answer 503 until it appears.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, g

from ..engine import RetrievalEngine

log = logging.getLogger("retrieval.web")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of the index file: changes whenever index.py replaces it; None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def version_tag(signature, engine: RetrievalEngine) -> str:
    database = engine.database
    text = f"{signature}|{database.database_id}|{len(database)}|{database.updated_at}|{id(database) if signature is None else ''}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass(eq=False)
class Served:
    """One served version: the engine, its version tag, and how many requests hold it."""

    engine: RetrievalEngine | None
    version: str
    users: int = 0
    retired: bool = False


NOTHING = Served(None, "")


def warmed(engine: RetrievalEngine) -> RetrievalEngine:
    """``engine`` with what its first verified search would build built now, at load, not on a request: the
    visual-word search over its local features (``retrieval.search.visual_words``: 0.3 s at 10,000 images from the
    words stored in the file, ~3 s where they are learned now)."""
    if engine.pipeline.can_verify:
        _ = engine.pipeline.words
    return engine


class LiveIndex:
    """The engine being served and the index file it came from; picks up a new version of the file without a restart."""

    def __init__(
        self,
        index_path: str | os.PathLike | None,
        engine: RetrievalEngine | None,
        *,
        image_root: str | os.PathLike | None = None,
        weights_file: str | os.PathLike | None = None,
        check_interval: float = 1.0,
    ):
        self.path = Path(index_path) if index_path is not None else None
        self.image_root = image_root
        self.weights_file = weights_file
        self.check_interval = float(check_interval)
        self.reloads = 0  # successful swaps after the first load
        self.listeners: list = []  # called with no arguments after each swap
        self._reload_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._next_check = 0.0
        self._failed: tuple | None = None  # signature of a file that could not be read (not retried until it changes)
        self._missing_logged = False
        signature = None
        if engine is None and self.path is not None and self.path.exists():
            signature = file_signature(self.path)
            engine = warmed(RetrievalEngine.open(self.path, weights_file=weights_file, image_root=image_root))
        elif self.path is not None and engine is not None:
            signature = file_signature(self.path)
        self._signature = signature
        self._served = Served(engine, version_tag(signature, engine)) if engine is not None else NOTHING

    # ------------------------------------------------------------------ leases

    def current(self) -> tuple[RetrievalEngine | None, str]:
        """The version to serve now (checking the file for a new one at most every ``check_interval`` seconds)."""
        self._maybe_check()
        served = self._served
        return served.engine, served.version

    def acquire(self) -> Served:
        self._maybe_check()
        with self._lease_lock:
            served = self._served
            served.users += 1
            return served

    def release(self, served: Served) -> None:
        with self._lease_lock:
            served.users -= 1
            closing = served.retired and served.users == 0
        if closing and served.engine is not None:
            served.engine.close()

    def _maybe_check(self) -> None:
        if self.path is not None:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                self.check()

    # ------------------------------------------------------------------ reload

    def check(self) -> bool:
        """Reload when the file changed; True when a new version was swapped in. Never raises for a bad file."""
        if self.path is None or not self._reload_lock.acquire(blocking=False):
            return False  # another request is reloading: keep serving the current version meanwhile
        try:
            signature = file_signature(self.path)
            if signature is None:
                if self._served.engine is not None and not self._missing_logged:
                    log.warning("index file %s is gone; still serving the version loaded before", self.path)
                self._missing_logged = True
                return False
            self._missing_logged = False
            if signature == self._signature or signature == self._failed:
                return False
            return self._load(signature)
        finally:
            self._reload_lock.release()

    def _load(self, signature) -> bool:
        old = self._served
        started = time.perf_counter()
        try:
            engine = warmed(RetrievalEngine.open(
                self.path, weights_file=self.weights_file, image_root=self.image_root, previous=old.engine
            ))
        except Exception as exc:  # a failed reload must never stop the server
            self._failed = signature
            log.error("could not load new version of %s (%s); still serving the previous one", self.path, exc)
            return False
        self._failed = None
        self._signature = signature
        with self._lease_lock:
            self._served = Served(engine, version_tag(signature, engine))
            old.retired = True
            close_old = old.users == 0
        if close_old and old.engine is not None:
            old.engine.close()
        if old.engine is not None:
            self.reloads += 1
        database = engine.database
        reused = old.engine is not None and engine.extractor is old.engine.extractor
        log.info(
            "loaded %s: %d images (%s, %s pooling) in %.2f s%s", self.path, len(database), database.encoder.backbone,
            database.encoder.pooling, time.perf_counter() - started, " (model reused)" if reused else "",
        )
        for listener in list(self.listeners):
            listener()
        return True


class ThumbnailCache:
    """A bounded, thread-safe LRU of encoded thumbnails."""

    def __init__(self, max_items: int):
        self.max_items = max(0, int(max_items))
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def init_app(app: Flask, live: LiveIndex, thumbs: ThumbnailCache) -> None:
    """Attach the live index and the cache to ``app``; leases taken by ``lease()`` are released at teardown."""
    live.listeners.append(thumbs.clear)
    app.extensions["retrieval"] = live
    app.extensions["retrieval.thumbs"] = thumbs

    @app.teardown_request
    def _release(_exc=None):
        served = g.pop("retrieval_served", None)
        if served is not None:
            live.release(served)


def lease(app: Flask) -> Served:
    """The version this request uses from start to end (the same one on every call within the request)."""
    served = g.get("retrieval_served")
    if served is None:
        served = app.extensions["retrieval"].acquire()
        g.retrieval_served = served
    return served
