"""The web face: an application factory, a small JSON API and the search page (``templates/``, ``static/``).

``create_app`` builds a Flask app around one feature database. The model is built and warmed up once, when the app is
made (``RetrievalEngine.open`` -> ``Extractor``); a request only decodes its upload, runs the traced forward function
on one image and does the cosine top-k. Concurrent requests share the engine: it is never mutated, a reload swaps in a
new one.

Routes (see README "Web app and JSON API")::

    GET  /                    the page
    GET  /api/info            database size, backbone, pooling, dimension, build times, limits
    GET  /api/sample?n=       a random sample of the database (what the page shows before a query)
    POST /api/search          multipart field ``image`` (+ optional ``k``, ``offset``): rank the database against it
    GET  /api/search?id=&k=   rank the database against database image ``id``
    GET  /image/<id>          a database image, by its row in the index only (never by a path from the request)
    GET  /thumb/<id>          its thumbnail (JPEG, generated once, LRU-cached)
    GET  /healthz             200 when an index is loaded, 503 when not

Errors are JSON ``{"error": "..."}`` with a 4xx/5xx status. Uploads are limited by ``MAX_CONTENT_LENGTH``, kept in
memory, and judged by decoding their content (``retrieval.images.open_image``), never by their name or declared type.

Live reload: at most once per ``INDEX_CHECK_INTERVAL`` seconds a request stats the index file; when its
(inode, mtime, size) changed (``index.py`` replaces it atomically with ``os.replace``), that request reads the new file
whole (``RetrievalEngine.reopen``, which keeps the extractor when the encoder is unchanged) and swaps the engine in;
one reload runs at a time (a lock) and other requests keep using the previous engine meanwhile. A failed reload is
logged and the previous version keeps being served. A missing index file is not an error here: searches answer 503
until it appears.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from flask import Blueprint, Flask, Request, Response, current_app, jsonify, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from .engine import QueryExpansion, RetrievalEngine
from .errors import ImageError
from .images import open_image
from .rerank import QUERY_EXPANSIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_INDEX_MESSAGE = "no index loaded: build one with index.py"

DEFAULT_CONFIG: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # bytes of one upload request; larger answers 413
    "DEFAULT_K": 10,
    "MAX_K": 200,  # results per request
    "MAX_OFFSET": 10_000,  # deepest rank reachable with "load more"
    "K_CHOICES": (10, 20, 50),
    "SAMPLE_SIZE": 24,  # database images shown before the first query
    "INDEX_CHECK_INTERVAL": 1.0,  # seconds between checks of the index file for a new version
    "THUMB_SIZE": 320,  # longest side of a thumbnail, pixels
    "THUMB_CACHE_ITEMS": 2048,  # thumbnails kept in memory (about 15-30 kB each)
    "IMAGE_ROOT": None,  # image folder the index paths are relative to; None = the folder recorded in the index
    "WEIGHTS_FILE": None,  # weights file for indexes whose weights are not where they were when indexing
    "CACHE_MAX_AGE": 86400,  # seconds a browser may keep an image whose URL names the current index version
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# formats every current browser displays; anything else (TIFF, ...) is served transcoded to PNG
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}

log = logging.getLogger("retrieval.web")
bp = Blueprint("web", __name__)


class ApiError(Exception):
    """An expected failure of a request: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class InMemoryRequest(Request):
    """Uploaded files stay in memory (werkzeug spools files over 500 kB to a temporary file by default).

    ``MAX_CONTENT_LENGTH`` bounds what one request can hold.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of the index file: changes whenever index.py replaces it; None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _version_tag(signature, engine: RetrievalEngine) -> str:
    database = engine.database
    text = f"{signature}|{database.database_id}|{len(database)}|{database.updated_at}|{id(database) if signature is None else ''}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


class LiveIndex:
    """The engine being served and the index file it came from; picks up a new version of the file without a restart.

    ``current()`` returns an (engine, version) pair that a request uses throughout; engines are never mutated, so a
    swap cannot change the data under a running request.
    """

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
        self._next_check = 0.0
        self._failed: tuple | None = None  # signature of a file that could not be read (not retried until it changes)
        self._missing_logged = False
        if engine is None and self.path is not None and self.path.exists():
            signature = _signature(self.path)
            engine = RetrievalEngine.open(self.path, weights_file=weights_file, image_root=image_root)
        else:
            signature = _signature(self.path) if (self.path is not None and engine is not None) else None
        self._signature = signature
        self._state: tuple[RetrievalEngine | None, str] = (
            engine, _version_tag(signature, engine) if engine is not None else ""
        )

    def current(self) -> tuple[RetrievalEngine | None, str]:
        if self.path is not None:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                self.check()
        return self._state

    def check(self) -> bool:
        """Reload when the file changed; True when a new version was swapped in. Never raises for a bad file."""
        if self.path is None or not self._reload_lock.acquire(blocking=False):
            return False  # another request is reloading: keep serving the current version meanwhile
        try:
            signature = _signature(self.path)
            if signature is None:
                if self._state[0] is not None and not self._missing_logged:
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
        old = self._state[0]
        started = time.perf_counter()
        try:
            # read whole into memory (a later replace cannot affect it); the model is reused when the encoder is the same
            engine = RetrievalEngine.reopen(self.path, old, weights_file=self.weights_file, image_root=self.image_root)
        except Exception as exc:  # a failed reload must never stop the server
            self._failed = signature
            log.error("could not load new version of %s (%s); still serving the previous one", self.path, exc)
            return False
        self._failed = None
        self._signature = signature
        self._state = (engine, _version_tag(signature, engine))
        if old is not None:
            self.reloads += 1
        database = engine.database
        log.info(
            "loaded %s: %d images (%s, %s pooling) in %.2f s%s",
            self.path, len(database), database.encoder.backbone, database.encoder.pooling,
            time.perf_counter() - started, " (model reused)" if old is not None and engine.extractor is old.extractor else "",
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


def create_app(
    index_path: str | os.PathLike | None = None,
    *,
    engine: RetrievalEngine | None = None,
    config: Mapping[str, Any] | None = None,
) -> Flask:
    """The web app around the index at ``index_path``.

    ``engine``: an engine already built (tests share one); with ``index_path`` too, it stands for that file's current
    version and the file is watched for new versions. ``index_path`` alone: the engine is built here (model loaded
    and warmed up once); a missing file gives an app that answers 503 until the file appears; an unreadable file
    raises ``IndexFileError``. ``config`` overrides ``DEFAULT_CONFIG`` and Flask settings.
    """
    app = Flask(__name__, template_folder=str(REPO_ROOT / "templates"), static_folder=str(REPO_ROOT / "static"))
    app.request_class = InMemoryRequest
    app.url_map.merge_slashes = False  # "//etc/passwd" is simply not found, not redirected somewhere
    app.config.update(DEFAULT_CONFIG)
    app.config["SECRET_KEY"] = os.environ.get("RETRIEVAL_SECRET_KEY") or secrets.token_hex(32)
    if config:
        app.config.update(config)
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    live = LiveIndex(
        index_path,
        engine,
        image_root=app.config["IMAGE_ROOT"],
        weights_file=app.config["WEIGHTS_FILE"],
        check_interval=app.config["INDEX_CHECK_INTERVAL"],
    )
    thumbs = ThumbnailCache(app.config["THUMB_CACHE_ITEMS"])
    live.listeners.append(thumbs.clear)
    app.extensions["retrieval"] = live
    app.extensions["retrieval.thumbs"] = thumbs

    app.register_blueprint(bp)
    app.after_request(_security_headers)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


# ---------------------------------------------------------------------------------------------------- helpers


def _live() -> LiveIndex:
    return current_app.extensions["retrieval"]


def _engine() -> tuple[RetrievalEngine, str]:
    engine, version = _live().current()
    if engine is None:
        raise ApiError(503, NO_INDEX_MESSAGE, index_loaded=False)
    return engine, version


def _int_param(name: str, default: int | None, low: int, high: int) -> int:
    raw = request.values.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ApiError(400, f"missing parameter {name!r}")
        return default
    raw = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,12}", raw):
        raise ApiError(400, f"{name} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value}")
    return value


def _expansion_param() -> QueryExpansion:
    """Query expansion from ``qe`` (none | avg | alpha), ``qe_top_n`` and ``qe_alpha``; 400 for bad values."""
    method = (request.values.get("qe") or "none").strip()
    if method not in QUERY_EXPANSIONS:
        raise ApiError(400, f"qe must be one of {', '.join(QUERY_EXPANSIONS)}, got {method[:40]!r}")
    top_n = _int_param("qe_top_n", 3, 1, 50)
    raw_alpha = (request.values.get("qe_alpha") or "3").strip()
    try:
        alpha = float(raw_alpha)
    except ValueError:
        raise ApiError(400, f"qe_alpha must be a number, got {raw_alpha[:40]!r}") from None
    if not 0 <= alpha <= 20:
        raise ApiError(400, f"qe_alpha must be between 0 and 20, got {alpha}")
    return QueryExpansion(method, top_n, alpha)


def _item(engine: RetrievalEngine, version: str, row: int) -> dict:
    return {
        "id": row,
        "path": engine.database.paths[row],
        "image_url": url_for("web.image", id=row, v=version),
        "thumb_url": url_for("web.thumb", id=row, v=version),
    }


def _info(engine: RetrievalEngine, version: str) -> dict:
    database, encoder = engine.database, engine.database.encoder
    return {
        "size": len(database),
        "backbone": encoder.backbone,
        "pooling": encoder.pooling,
        "dimension": encoder.dim,
        "weights": encoder.weights_name,
        "precision": encoder.precision,
        "input_size": encoder.input_size,
        "created": database.created_at or None,
        "updated": database.updated_at or None,
        "version": version,
    }


def _limits() -> dict:
    config = current_app.config
    return {
        "default_k": config["DEFAULT_K"],
        "max_k": config["MAX_K"],
        "k_choices": list(config["K_CHOICES"]),
        "max_upload_bytes": config["MAX_CONTENT_LENGTH"],
    }


def _image_error(exc: ImageError) -> ApiError:
    reason = str(exc).removeprefix("upload: ")
    if "too many pixels" in reason or "too large" in reason:
        status = 413
    elif "empty" in reason:
        status = 400
    else:
        status = 415
    return ApiError(status, f"cannot use this file as an image: {reason}")


def _image_file(engine: RetrievalEngine, row: int) -> tuple[Path, os.stat_result]:
    """The file of database row ``row``; 404 for an unknown row, a path that leaves the image folder, a missing file."""
    if not 0 <= row < len(engine):
        raise ApiError(404, f"no database image with id {row}")
    if engine.image_root is None:
        raise ApiError(404, "the image folder of this index is unknown: start the server with --database DIR")
    relative = PurePosixPath(engine.database.paths[row])
    if relative.is_absolute() or ".." in relative.parts or "\\" in str(relative):
        raise ApiError(404, f"no database image with id {row}")
    path = engine.image_root / relative
    try:
        stat = path.stat()
    except OSError:
        raise ApiError(404, f"database image {row} is missing from the image folder") from None
    if not path.is_file():
        raise ApiError(404, f"database image {row} is missing from the image folder")
    return path, stat


def _cacheable(response: Response, etag: str, version: str) -> Response:
    response.set_etag(etag)
    if request.args.get("v") == version:
        response.headers["Cache-Control"] = f"public, max-age={int(current_app.config['CACHE_MAX_AGE'])}"
    else:
        response.headers["Cache-Control"] = "no-cache"  # the id may name another image in the next version
    return response.make_conditional(request)


def _etag(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------- routes


@bp.get("/")
def page():
    engine, version = _live().current()
    info = _info(engine, version) if engine is not None else None
    return render_template("index.html", info=info, limits=_limits(), no_index_message=NO_INDEX_MESSAGE)


@bp.get("/healthz")
def healthz():
    engine, version = _live().current()
    if engine is None:
        return jsonify(status="unavailable", index_loaded=False, error=NO_INDEX_MESSAGE), 503
    return jsonify(status="ok", index_loaded=True, size=len(engine), version=version)


@bp.get("/api/info")
def api_info():
    engine, version = _engine()
    return jsonify({**_info(engine, version), "limits": _limits()})


@bp.get("/api/sample")
def api_sample():
    engine, version = _engine()
    n = _int_param("n", current_app.config["SAMPLE_SIZE"], 1, current_app.config["MAX_K"])
    rows = sorted(random.sample(range(len(engine)), min(n, len(engine))))
    return jsonify(
        items=[_item(engine, version, row) for row in rows], total=len(engine), version=version
    )


@bp.route("/api/search", methods=["GET", "POST"])
def api_search():
    started = time.perf_counter()
    config = current_app.config
    k = _int_param("k", config["DEFAULT_K"], 1, config["MAX_K"])
    offset = _int_param("offset", 0, 0, config["MAX_OFFSET"])
    expansion = _expansion_param()
    engine, version = _engine()
    encode_ms = 0.0
    if request.method == "POST":
        upload = request.files.get("image")
        if upload is None:
            raise ApiError(400, "missing file field 'image': send the image as multipart/form-data field 'image'")
        data = upload.read()
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        try:
            vector = engine.extractor.encode_source(data)
        except ImageError as exc:
            raise _image_error(exc) from None
        encode_ms = (time.perf_counter() - started) * 1000
        query: dict = {"type": "upload", "bytes": len(data)}
    else:
        if request.args.get("id") is None:
            raise ApiError(400, "give a query: POST an image as field 'image', or GET /api/search?id=<database id>")
        raw = request.args["id"].strip()
        if not re.fullmatch(r"[0-9]{1,12}", raw):
            raise ApiError(400, f"id must be a database id (a non-negative integer), got {raw[:40]!r}")
        row = int(raw)
        asked_version = request.args.get("v")
        if asked_version and asked_version != version:
            raise ApiError(409, "the database has been updated since this id was shown: reload the page", version=version)
        if row >= len(engine):
            raise ApiError(404, f"no database image with id {row}")
        vector = engine.database.vectors[row]
        query = {"type": "database", **_item(engine, version, row)}
    searched = time.perf_counter()
    hits = engine.search_vector(vector, offset + k, expansion)[offset:]
    search_ms = (time.perf_counter() - searched) * 1000
    results = [{**hit.as_dict(), **_item(engine, version, hit.id)} for hit in hits]
    return jsonify(
        query=query,
        k=k,
        offset=offset,
        qe=expansion.method,
        results=results,
        total=len(engine),
        has_more=offset + len(results) < len(engine),
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        timing={"encode_ms": round(encode_ms, 2), "search_ms": round(search_ms, 3)},
        version=version,
    )


@bp.get("/image/<int:id>")
def image(id: int):
    engine, version = _engine()
    path, stat = _image_file(engine, id)
    tag = _etag("image", engine.database.paths[id], stat.st_size, stat.st_mtime_ns)
    if tag in request.if_none_match:
        return _cacheable(Response(status=304), tag, version)
    try:
        data = path.read_bytes()
        from PIL import Image

        with Image.open(io.BytesIO(data)) as probe:
            mimetype = BROWSER_FORMATS.get(probe.format or "")
        if mimetype is None:  # e.g. TIFF: decode safely and send a PNG
            out = io.BytesIO()
            open_image(data).save(out, format="PNG")
            data, mimetype = out.getvalue(), "image/png"
    except (OSError, ImageError, ValueError, SyntaxError):
        raise ApiError(404, f"database image {id} cannot be read") from None
    return _cacheable(Response(data, mimetype=mimetype), tag, version)


@bp.get("/thumb/<int:id>")
def thumb(id: int):
    engine, version = _engine()
    path, stat = _image_file(engine, id)
    size = int(current_app.config["THUMB_SIZE"])
    key = (version, id, stat.st_size, stat.st_mtime_ns, size)
    tag = _etag("thumb", engine.database.paths[id], *key)
    if tag in request.if_none_match:
        return _cacheable(Response(status=304), tag, version)
    cache: ThumbnailCache = current_app.extensions["retrieval.thumbs"]
    data = cache.get(key)
    if data is None:
        try:
            picture = open_image(path, draft_size=size)
        except ImageError:
            raise ApiError(404, f"database image {id} cannot be read") from None
        from PIL import Image

        picture.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=84, optimize=True, progressive=True)
        data = out.getvalue()
        cache.put(key, data)
    return _cacheable(Response(data, mimetype="image/jpeg"), tag, version)


# ---------------------------------------------------------------------------------------------------- responses


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "application/json" or response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _api_error(exc: ApiError):
    return jsonify(error=exc.message, **exc.extra), exc.status


def _http_error(exc: HTTPException):
    if exc.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
        message = f"file too large: the limit is {limit / 1024 / 1024:.0f} MB"
    elif exc.code == 404:
        message = "not found"
    else:
        message = (exc.description or exc.name).strip()
    response = jsonify(error=message)
    response.status_code = exc.code or 500
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected_error(exc: Exception):
    if current_app.debug:
        raise exc  # --debug: let the Werkzeug debugger show it
    log.exception("unexpected error in %s %s", request.method, request.path)
    return jsonify(error="internal server error"), 500
