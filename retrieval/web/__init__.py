"""The web face: the application factory, security headers and error handlers (``routes`` has the routes, ``live``
the served index and its reload).

``create_app`` builds a Flask app around one feature database. The model is built and warmed up once, when the app is
made; a request only decodes its upload, encodes it and searches (``RetrievalEngine``). Concurrent requests share the
engine: it is never mutated, a reload swaps in a new one.

Errors are JSON ``{"error": "..."}``; the status follows the error's kind (``STATUS_OF_KIND``), never its text.
Uploads are limited by ``MAX_UPLOAD_BYTES``, kept in memory, and judged by decoding their content
(``retrieval.images.open_image``), never by their name or declared type.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from flask import Flask, Request, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.formparser import FormDataParser

from ..engine import RetrievalEngine
from ..errors import RetrievalError
from .live import LiveIndex, ThumbnailCache, init_app
from .routes import STATUS_OF_KIND, ApiError, bp

REPO_ROOT = Path(__file__).resolve().parents[2]
MULTIPART_OVERHEAD = 64 * 1024  # bytes of a request beyond its file: boundaries, headers, small fields

DEFAULT_CONFIG: dict[str, Any] = {
    "MAX_UPLOAD_BYTES": 20 * 1024 * 1024,  # bytes of one uploaded image; larger answers 413
    "MAX_FORM_PARTS": 50,  # multipart parts of one request (werkzeug's default is 1000)
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

log = logging.getLogger("retrieval.web")


def utf8_part_headers(body: bytes, boundary: bytes) -> bytes:
    """A multipart body whose part headers are valid UTF-8: a header line that is not (a file name in another
    encoding) is read as Latin-1 instead. Werkzeug would otherwise drop the whole part, and the upload with it."""
    delimiter = b"--" + boundary
    pieces = body.split(delimiter)
    for i, piece in enumerate(pieces[1:], 1):
        head, separator, rest = piece.partition(b"\r\n\r\n")
        if not separator:
            continue
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            lines = []
            for line in head.split(b"\r\n"):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    line = line.decode("latin-1").encode("utf-8")
                lines.append(line)
            pieces[i] = b"\r\n".join(lines) + separator + rest
    return delimiter.join(pieces)


class LenientFormDataParser(FormDataParser):
    def _parse_multipart(self, stream, mimetype, content_length, options):
        boundary = options.get("boundary", "").encode("ascii", "replace")
        if boundary:
            body = utf8_part_headers(stream.read(), boundary)
            stream, content_length = io.BytesIO(body), len(body)
        return super()._parse_multipart(stream, mimetype, content_length, options)


class InMemoryRequest(Request):
    """Uploaded files stay in memory (werkzeug spools files over 500 kB to a temporary file by default), and a part
    whose file name is not UTF-8 is still read. ``MAX_CONTENT_LENGTH`` bounds what one request can hold."""

    form_data_parser_class = LenientFormDataParser

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def page_folders() -> tuple[Path, Path]:
    """(templates, static): the checkout's top-level folders, or the copies installed with the package."""
    if (REPO_ROOT / "templates").is_dir() and (REPO_ROOT / "static").is_dir():
        return REPO_ROOT / "templates", REPO_ROOT / "static"
    here = Path(__file__).resolve().parent
    return here / "templates", here / "static"


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
    templates, static = page_folders()
    app = Flask(__name__, template_folder=str(templates), static_folder=str(static))
    app.request_class = InMemoryRequest
    app.url_map.merge_slashes = False  # "//etc/passwd" is simply not found, not redirected somewhere
    app.config.update(DEFAULT_CONFIG)
    app.config["SECRET_KEY"] = os.environ.get("RETRIEVAL_SECRET_KEY") or secrets.token_hex(32)
    if config:
        app.config.update(config)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_BYTES"]) + MULTIPART_OVERHEAD
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    live = LiveIndex(
        index_path,
        engine,
        image_root=app.config["IMAGE_ROOT"],
        weights_file=app.config["WEIGHTS_FILE"],
        check_interval=app.config["INDEX_CHECK_INTERVAL"],
    )
    init_app(app, live, ThumbnailCache(app.config["THUMB_CACHE_ITEMS"]))
    app.register_blueprint(bp)
    app.after_request(security_headers)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(RetrievalError, _retrieval_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "application/json" or response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _api_error(exc: ApiError):
    return jsonify(error=exc.message, **exc.extra), exc.status


def _retrieval_error(exc: RetrievalError):
    status = STATUS_OF_KIND.get(exc.kind, 500)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.path, exc)
    return jsonify(error=str(exc)), status


def _http_error(exc: HTTPException):
    if exc.code == 413:
        config = current_app.config
        if (request.content_length or 0) > config["MAX_CONTENT_LENGTH"]:
            message = f"file too large: the limit is {config['MAX_UPLOAD_BYTES'] / 1024 / 1024:.0f} MB"
        else:
            message = f"request has too many form fields (at most {config['MAX_FORM_PARTS']})"
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
