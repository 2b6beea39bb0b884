"""The routes of the web app: the page, the JSON API, database images and thumbnails. Request parsing is here; the
engine does encode + search; errors are ``ApiError`` or ``RetrievalError`` whose kind picks the HTTP status.

    GET  /                    the page
    GET  /api/info            database size, backbone, pooling, dimension, build times, limits
    GET  /api/folders         the database's sub-folders with their image counts (what the folder filter offers)
    GET  /api/sample?n=       a random sample of the database (what the page shows before a query); ``folder=``
    POST /api/search          multipart field ``image`` (+ optional ``k``, ``offset``, ``folder``): rank the database
    GET  /api/search?id=&k=   rank the database against database image ``id``
    GET  /image/<id>          a database image, by its row in the index only (never by a path from the request);
                              ``?download=1``: its original bytes as an attachment
    GET  /thumb/<id>          its thumbnail (JPEG, generated once, LRU-cached)
    GET  /healthz             200 when an index is loaded, 503 when not
    GET  /api/duplicates?threshold=&k=&limit=&verify=   groups of duplicate images (``retrieval.search.duplicates``);
                              the neighbour graph is computed once per served version and k, so another threshold is
                              instant; ``verify`` as for a search (default: the database's), verdicts kept per graph

The folder filter (``folder=a/b``) keeps the engine as it is: the route asks the engine for more ranked hits than the
page needs and keeps those under the folder, at most ``FOLDER_SCAN_LIMIT`` hits deep (the answer says ``truncated``
when that bound cut it short). A folder that is not a plain relative folder is 400; one with no images is simply empty.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import itertools
import logging
import math
import mimetypes
import os
import random
import re
import shlex
import threading
import time
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for

from ..engine import RetrievalEngine
from ..errors import ImageError
from ..images import image_format, open_image
from ..search.duplicates import DEFAULT_K as DUPLICATES_K
from ..search.duplicates import DuplicateFinder, cache_path
from ..search.expansion import QUERY_EXPANSIONS, QueryExpansion
from .live import ThumbnailCache, lease

NO_INDEX_MESSAGE = "no index loaded: build one with index.py"
FOLDER_SCAN_LIMIT = 16_384  # ranked hits a folder-filtered search looks through at most (also Milvus' top-k cap)
FOLDERS_LISTED = 1_000  # sub-folders /api/folders lists at most
MAX_FOLDER_CHARS = 1_000
ID_PATTERN = re.compile(r"0|[1-9][0-9]{0,11}")  # ASCII digits, no leading zeros, no sign
# formats every current browser displays; anything else (TIFF, ...) is served transcoded to PNG
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp",
                   "AVIF": "image/avif"}

STATUS_OF_KIND = {  # the HTTP status of each RetrievalError kind (retrieval.errors.KINDS)
    "invalid": 400, "not_found": 404, "conflict": 409, "too_large": 413, "unsupported": 415,
    "unavailable": 503, "corrupt": 503,
}

bp = Blueprint("web", __name__)
log = logging.getLogger("retrieval.web")

# per served version (its tag): whether its paths are sorted, and its folder listing; a few versions at most
_SORTED_PATHS: dict[str, bool] = {}
_FOLDER_LISTS: dict[str, tuple[list[tuple[str, int]], bool]] = {}


class ApiError(Exception):
    """An expected failure of a request: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


# ---------------------------------------------------------------------------------------------------- helpers


def _current() -> tuple[RetrievalEngine | None, str]:
    served = lease(current_app)
    return served.engine, served.version


def _engine() -> tuple[RetrievalEngine, str]:
    engine, version = _current()
    if engine is None:
        raise ApiError(503, NO_INDEX_MESSAGE, index_loaded=False)
    return engine, version


def _row(raw: str) -> int:
    """A database id from a URL or parameter: ASCII digits without leading zeros; anything else is not found."""
    if not ID_PATTERN.fullmatch(raw):
        raise ApiError(404, "not found")
    return int(raw)


def _check_version(version: str) -> None:
    asked = request.args.get("v")
    if asked and asked != version:
        raise ApiError(409, "the database has been updated since this id was shown: reload the page", version=version)


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


VERIFY_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _verify_param() -> bool | None:
    """``verify`` = 1 | 0 (true/false, on/off, yes/no) or absent (None: the database's default); 400 otherwise."""
    raw = request.values.get("verify")
    if raw is None or raw.strip() == "":
        return None
    value = VERIFY_VALUES.get(raw.strip().lower())
    if value is None:
        raise ApiError(400, f"verify must be 1 or 0, got {raw[:40]!r}")
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
    """One database image as the API shows it: id, path, pixel size and file size (None where unknown), URLs."""
    database = engine.database
    width, height = database.image_size(row)  # recorded at indexing; -1 when the file predates it
    size = int(database.file_sizes[row]) if row < len(database.file_sizes) else -1
    return {
        "id": row,
        "path": database.paths[row],
        "width": width if width > 0 else None,
        "height": height if height > 0 else None,
        "bytes": size if size >= 0 else None,
        "image_url": url_for("web.image", id=row, v=version),
        "thumb_url": url_for("web.thumb", id=row, v=version),
        "download_url": url_for("web.image", id=row, v=version, download=1),
    }


def _folder_param() -> str | None:
    """``folder``: a folder of the database relative to its image folder (``a/b``, one trailing "/" allowed), or
    None for the whole database. 400 for anything that is not a plain relative folder."""
    raw = request.values.get("folder")
    if raw is None or raw == "":
        return None
    folder = raw[:-1] if raw.endswith("/") and len(raw) > 1 else raw
    if (
        len(folder) > MAX_FOLDER_CHARS
        or folder.startswith("/")
        or "\\" in folder
        or any(ord(c) < 32 or ord(c) == 127 for c in folder)
        or any(part in ("", ".", "..") for part in folder.split("/"))
    ):
        raise ApiError(400, f"folder must be a folder of the database such as 'holidays/2023', got {raw[:60]!r}")
    return folder


def _remember(cache: dict, version: str, value):
    if len(cache) >= 8:
        cache.clear()
    cache[version] = value
    return value


def _folder_rows(engine: RetrievalEngine, version: str, folder: str) -> range | list[int]:
    """The rows whose path lies under ``folder``: a range found by bisection (paths are stored sorted), or a scan."""
    paths = engine.database.paths
    prefix = folder + "/"
    ordered = _SORTED_PATHS.get(version)
    if ordered is None:
        ordered = all(a <= b for a, b in zip(paths, itertools.islice(paths, 1, None)))
        _remember(_SORTED_PATHS, version, ordered)
    if ordered:
        # every path that starts with "a/b/" sorts at or after "a/b/" and before "a/b0" ("0" follows "/")
        return range(bisect.bisect_left(paths, prefix), bisect.bisect_left(paths, folder + "0"))
    return [row for row, path in enumerate(paths) if path.startswith(prefix)]


def _folder_list(engine: RetrievalEngine, version: str) -> tuple[list[tuple[str, int]], bool]:
    """(folder, images under it at any depth) for every sub-folder, sorted; at most ``FOLDERS_LISTED`` (and whether
    more exist). Computed once per served version."""
    cached = _FOLDER_LISTS.get(version)
    if cached is not None:
        return cached
    direct = Counter(path.rpartition("/")[0] for path in engine.database.paths)
    counts: Counter = Counter()
    for folder, count in direct.items():
        parts = folder.split("/") if folder else []
        for depth in range(1, len(parts) + 1):
            counts["/".join(parts[:depth])] += count
    listed = sorted(counts.items())
    return _remember(_FOLDER_LISTS, version, (listed[:FOLDERS_LISTED], len(listed) > FOLDERS_LISTED))


def _ranked_in_folder(ranked: Callable[[int], list], folder: str, need: int, in_folder: int, size: int):
    """The engine's ranked hits under ``folder``, at least ``need`` of them when the folder has that many:
    (hits, truncated). Asks for more hits while too few fall in the folder, at most ``FOLDER_SCAN_LIMIT`` deep;
    ``truncated`` says that bound stopped it before the folder's images were all found."""
    if in_folder == 0:
        return [], False
    prefix = folder + "/"
    ceiling = min(size, FOLDER_SCAN_LIMIT)
    ask = min(ceiling, max(need, math.ceil(need * size / in_folder * 1.25)))  # expect the folder's share of the ranking
    while True:
        hits = ranked(ask)
        matched = [hit for hit in hits if hit.path.startswith(prefix)]
        if len(matched) >= need or len(matched) >= in_folder or len(hits) < ask:
            return matched, False
        if ask >= ceiling:
            return matched, ask < size
        ask = min(ceiling, ask * 4)


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
        "max_upload_bytes": config["MAX_UPLOAD_BYTES"],
    }


def _image_error(exc: ImageError) -> ApiError:
    reason = str(exc).removeprefix("upload: ")
    # the decoder's own words ("image file is truncated (22 bytes not processed)") help the log, not the user
    plain = re.sub(r"^(corrupt or truncated image) \(.*\)$", r"\1", reason, flags=re.DOTALL)
    if plain != reason:
        log.info("upload refused: %s", reason)
    return ApiError(STATUS_OF_KIND.get(exc.kind, 415), f"cannot use this file as an image: {plain}")


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
    engine, version = _current()
    info = _info(engine, version) if engine is not None else None
    watched = current_app.extensions["retrieval"].path
    image_root = current_app.config.get("IMAGE_ROOT")
    # what to run when no index is loaded: the file this server watches, and its image folder when it was given one
    build_command = {
        "index": shlex.quote(str(watched)) if watched is not None else None,
        "database": shlex.quote(str(image_root)) if image_root else None,
    }
    return render_template(
        "index.html", info=info, limits=_limits(), no_index_message=NO_INDEX_MESSAGE, build_command=build_command
    )


@bp.get("/healthz")
def healthz():
    engine, version = _current()
    if engine is None:
        return jsonify(status="unavailable", index_loaded=False, error=NO_INDEX_MESSAGE), 503
    return jsonify(status="ok", index_loaded=True, size=len(engine), version=version)


@bp.get("/api/info")
def api_info():
    engine, version = _engine()
    return jsonify({**_info(engine, version), "limits": _limits()})


@bp.get("/api/folders")
def api_folders():
    engine, version = _engine()
    folders, truncated = _folder_list(engine, version)
    return jsonify(
        folders=[{"folder": folder, "count": count} for folder, count in folders], truncated=truncated, version=version
    )


@bp.get("/api/sample")
def api_sample():
    n = _int_param("n", current_app.config["SAMPLE_SIZE"], 1, current_app.config["MAX_K"])
    folder = _folder_param()
    engine, version = _engine()
    rows = range(len(engine)) if folder is None else _folder_rows(engine, version, folder)
    picked = sorted(random.sample(rows, min(n, len(rows))))
    body: dict = {"items": [_item(engine, version, row) for row in picked], "total": len(rows), "version": version}
    if folder is not None:
        body["folder"] = folder
    return jsonify(body)


@bp.route("/api/search", methods=["GET", "POST"])
def api_search():
    started = time.perf_counter()
    config = current_app.config
    k = _int_param("k", config["DEFAULT_K"], 1, config["MAX_K"])
    offset = _int_param("offset", 0, 0, config["MAX_OFFSET"])
    expansion = _expansion_param()
    folder = _folder_param()
    engine, version = _engine()
    verify = engine.resolve_verify(_verify_param())  # 400 with one line for an index without local features
    encode_ms = 0.0
    if request.method == "POST":
        upload = request.files.get("image")
        if upload is None:
            raise ApiError(400, "missing file field 'image': send the image as multipart/form-data field 'image'")
        data = upload.read()
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        limit = int(config["MAX_UPLOAD_BYTES"])
        if len(data) > limit:
            raise ApiError(413, f"file too large: {len(data)} bytes, the limit is {limit} bytes ({limit / 1048576:.0f} MB)")
        try:
            if engine.copy_search:  # windows and local features of the upload, computed once for every page
                from ..engine import open_query

                features = engine.query_features(open_query(data), for_verification=verify)
            else:
                vector = engine.encode(data)
        except ImageError as exc:
            raise _image_error(exc) from None
        encode_ms = (time.perf_counter() - started) * 1000
        query: dict = {"type": "upload", "bytes": len(data)}
    else:
        if request.args.get("id") is None:
            raise ApiError(400, "give a query: POST an image as field 'image', or GET /api/search?id=<database id>")
        raw = request.args["id"].strip()
        if not ID_PATTERN.fullmatch(raw):
            raise ApiError(400, f"id must be a database id (digits without leading zeros), got {raw[:40]!r}")
        row = int(raw)
        _check_version(version)
        if row >= len(engine):
            raise ApiError(404, f"no database image with id {row}")
        query = {"type": "database", **_item(engine, version, row)}
    searched = time.perf_counter()
    if request.method == "POST":
        def ranked(n: int):
            if engine.copy_search:
                return engine.search_features([features], n, expansion, verify=verify)[0]
            return engine.search(vector, n, expansion)
    else:
        def ranked(n: int):
            return engine.search_id(row, n, expansion, verify=verify)
    scope: dict = {}
    if folder is None:
        hits = ranked(offset + k)[offset:]
        total = len(engine)
        has_more = offset + len(hits) < total
    else:
        total = len(_folder_rows(engine, version, folder))
        matched, truncated = _ranked_in_folder(ranked, folder, offset + k, total, len(engine))
        # ranks count within the folder; the rank in the whole database stays as overall_rank
        hits = [dataclasses.replace(hit, rank=offset + i + 1) for i, hit in enumerate(matched[offset : offset + k])]
        overall = {hit.id: hit.rank for hit in matched[offset : offset + k]}
        has_more = len(matched) > offset + k if truncated else offset + len(hits) < total
        scope = {"folder": folder, "database_size": len(engine), "truncated": truncated}
    search_ms = (time.perf_counter() - searched) * 1000
    results = [{**hit.as_dict(), **_item(engine, version, hit.id)} for hit in hits]
    if folder is not None:
        for result in results:
            result["overall_rank"] = overall[result["id"]]
    return jsonify(
        query=query,
        k=k,
        offset=offset,
        qe=expansion.method,
        verify=verify,
        results=results,
        total=total,
        has_more=has_more,
        **scope,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        timing={"encode_ms": round(encode_ms, 2), "search_ms": round(search_ms, 3)},
        version=version,
    )


@bp.get("/image/<id>")
def image(id: str):
    id = _row(id)
    engine, version = _engine()
    _check_version(version)
    path, stat = _image_file(engine, id)
    download = request.args.get("download") not in (None, "", "0")
    tag = _etag("download" if download else "image", engine.database.paths[id], stat.st_size, stat.st_mtime_ns)
    if tag in request.if_none_match:
        return _cacheable(Response(status=304), tag, version)
    if download:  # the original file as it is (a TIFF stays a TIFF), saved rather than shown
        try:
            data = path.read_bytes()
        except OSError:
            raise ApiError(404, f"database image {id} cannot be read") from None
        name = path.name.encode("utf-8", "replace").decode("utf-8")  # a name that is not UTF-8 gets "?" marks
        response = Response(data, mimetype=mimetypes.guess_type(name)[0] or "application/octet-stream")
        # RFC 6266: an ASCII name for old clients, the real one as UTF-8 for every current browser
        fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", name)
        response.headers["Content-Disposition"] = f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"
        return _cacheable(response, tag, version)
    try:
        data = path.read_bytes()
        mimetype = BROWSER_FORMATS.get(image_format(data))
        if mimetype is None:  # e.g. TIFF, HEIC: decode safely and send a PNG
            out = io.BytesIO()
            open_image(data).save(out, format="PNG")
            data, mimetype = out.getvalue(), "image/png"
    except (OSError, ImageError):
        raise ApiError(404, f"database image {id} cannot be read") from None
    return _cacheable(Response(data, mimetype=mimetype), tag, version)


@bp.get("/thumb/<id>")
def thumb(id: str):
    id = _row(id)
    engine, version = _engine()
    _check_version(version)
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


# ---------------------------------------------------------------------------------------------------- duplicates

DUPLICATE_GROUPS_LISTED = 200  # groups one answer lists at most (``limit``)
DUPLICATE_MEMBERS_LISTED = 100  # members listed per group at most
_DUPLICATE_FINDERS: dict[str, DuplicateFinder] = {}
_duplicate_lock = threading.Lock()
_duplicate_report_lock = threading.Lock()  # one report at a time: the finder keeps its verification's verdicts


def _duplicate_finder(engine: RetrievalEngine, version: str, k: int) -> DuplicateFinder:
    """The finder (neighbour graph) of the served version for ``k``, computed once; the graph the command line
    cached beside the index is used when it matches (read only: the server never writes beside the index)."""
    key = f"{version}:{k}"
    with _duplicate_lock:
        finder = _DUPLICATE_FINDERS.get(key)
        if finder is None:
            watched = current_app.extensions["retrieval"].path
            finder = DuplicateFinder(
                engine.database, engine.pipeline.backend, engine.pipeline.matrix, k=k,
                cache=cache_path(watched) if watched is not None else None, write_cache=False,
                image_root=engine.image_root,
            )
            _remember(_DUPLICATE_FINDERS, key, finder)
        return finder


@bp.get("/api/duplicates")
def api_duplicates():
    raw = (request.args.get("threshold") or "").strip()
    threshold = None
    if raw:
        try:
            threshold = float(raw)
        except ValueError:
            raise ApiError(400, f"threshold must be a number, got {raw[:40]!r}") from None
        if not (math.isfinite(threshold) and 0 < threshold <= 1):
            raise ApiError(400, f"threshold must be a cosine similarity in (0, 1], got {raw[:40]!r}")
    k = _int_param("k", DUPLICATES_K, 1, 100)
    limit = _int_param("limit", 50, 1, DUPLICATE_GROUPS_LISTED)
    engine, version = _engine()
    verify = engine.resolve_verify(_verify_param())  # 400 with one line for an index without local features
    started = time.perf_counter()
    with _duplicate_report_lock:
        report = _duplicate_finder(engine, version, k).report(threshold, verify)
    groups = []
    for group in report.groups[:limit]:
        members = [
            {**_item(engine, version, member.id), "score": round(member.score, 6), "keep": member.keep, "match": member.match}
            for member in group.members[:DUPLICATE_MEMBERS_LISTED]
        ]
        groups.append({
            "size": len(group.members), "min_score": round(group.score, 6),
            "max_score": round(max(s for _, _, s in group.pairs), 6), "members": members,
        })
    return jsonify(
        threshold=report.threshold, k=k, images=report.images, groups_count=len(report.groups), duplicates=report.duplicates,
        pairs=report.pairs, verified=report.verified, rejected_by_verification=report.rejected,
        saturated=report.saturated, search=report.search, groups=groups,
        truncated=len(report.groups) > limit, took_ms=round((time.perf_counter() - started) * 1000, 2), version=version,
    )
