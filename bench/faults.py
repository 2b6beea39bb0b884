#!/usr/bin/env python3
"""Bounded fault and soak run against the public faces: hostile uploads, odd routes, concurrency, hot reload under
load, kill -9 during indexing, an idle-connection flood, corrupted index files and a full disk.

    python -m bench.faults --quick          # every count shrunk, about 90 s
    python -m bench.faults                  # the full run, a few minutes
    python -m bench.faults --out DIR        # where faults.md and faults.json go (default bench/out/)

Only the real programs are driven: ``index.py``, ``query_online.py``, ``evaluate.py`` and ``server.py`` as
subprocesses (cwd = the repository), and a real ``server.py`` on 127.0.0.1 (port 0) over raw HTTP sockets. Nothing
leaves the loopback interface: the backbone is EfficientNet-Lite0 with its packaged weights, ``RETRIEVAL_OFFLINE=1``
and an empty ``KERAS_HOME``. Images are the repository's ``database/`` photos and images generated here (seeded).
The index files are opened with h5py only to check the results (paths, vectors), never to drive anything.

Every loop is bounded in count and in time. Each scenario is one row of the table: inputs tried, 5xx answers, hangs
(an HTTP request over 30 s, a program over its timeout), tracebacks (in a program's stderr or the server log),
crashes (a program or the server ended by a signal), data lost (images missing or wrong after kills, an index that
does not open after a kill, a corrupted index read without error that answers differently), failed checks (every
other broken promise: a 4xx that is not JSON with an "error", a wrong status, an inconsistent answer, a leaked file,
a connection refused, a temporary file left behind, more or fewer than one ``error:`` line), and the peak RSS.
The exit status is 1 when any of those counts is not 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "database"
OUT = REPO / "bench" / "out"
BACKBONE = "efficientnet-lite0"
SEED = 20250601
HANG_S = 30.0  # an HTTP request that takes longer is a hang
UPLOAD_MB = 2  # server.py --max-upload-mb
UPLOAD_LIMIT = UPLOAD_MB * 1024 * 1024
INDEX_TIMEOUT = 180.0  # seconds an index.py run may take before it counts as a hang
READ_TIMEOUT = 60.0  # query_online.py / evaluate.py
BAD_KEYS = ("http_5xx", "hangs", "tracebacks", "crashes", "data_lost", "failed_checks")
TRACEBACK = "Traceback (most recent call last)"
QUERY_IMAGE = DEMO / "coffee" / "original.jpg"

REJECT = frozenset(range(400, 500))
OK = frozenset({200})
ANY = OK | REJECT


# ------------------------------------------------------------------------------------------------ report rows


@dataclasses.dataclass
class Row:
    number: int
    scenario: str
    tried: int = 0
    http_5xx: int = 0
    hangs: int = 0
    tracebacks: int = 0
    crashes: int = 0
    data_lost: int = 0
    failed_checks: int = 0
    peak_rss_mb: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    skipped: str = ""
    seconds: float = 0.0

    def fail(self, what: str, kind: str = "failed_checks", count: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + count)
        if len(self.failures) < 40:
            self.failures.append(f"[{kind}] {what}")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def peak(self, mb: float | None) -> None:
        if mb is not None:
            self.peak_rss_mb = round(max(self.peak_rss_mb or 0.0, mb), 1)

    @property
    def bad(self) -> int:
        return sum(getattr(self, key) for key in BAD_KEYS)


def clip(text: str | bytes, limit: int = 300) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Ran:
    command: str
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    maxrss_mb: float
    timed_out: bool

    @property
    def signalled(self) -> bool:
        return self.rc is not None and self.rc < 0

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def brief(self) -> str:
        tail = " | ".join(line for line in self.stderr.strip().splitlines()[-4:])
        return f"`{self.command}` -> exit {self.rc}{' (timed out)' if self.timed_out else ''}: {clip(tail, 400)}"


class Proc:
    """A script of the repository run with ``sys.executable``; reaped with ``wait4`` for its peak RSS."""

    def __init__(self, script: str, args, env: dict, timeout: float):
        self.argv = [sys.executable, str(REPO / script), *map(str, args)]
        self.command = " ".join([script, *map(str, args)])
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.result: Ran | None = None
        self.timed_out = False
        self.popen = subprocess.Popen(self.argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.out,
                                      stderr=self.err, start_new_session=True)

    def _finish(self, status: int, usage) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code  # reaped here: Popen must not wait for it again
        self.out.seek(0)
        self.err.seek(0)
        self.result = Ran(self.command, code, self.out.read().decode("utf-8", "replace"),
                          self.err.read().decode("utf-8", "replace"), time.monotonic() - self.started,
                          usage.ru_maxrss / 1024, self.timed_out)
        self.out.close()
        self.err.close()

    def poll(self) -> bool:
        if self.result is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        if pid == 0:
            return False
        self._finish(status, usage)
        return True

    def kill(self) -> None:
        if self.result is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # its own session, started here

    def wait(self) -> Ran:
        while not self.poll():
            if time.monotonic() > self.deadline:
                self.timed_out = True
                self.kill()
                _, status, usage = os.wait4(self.popen.pid, 0)
                self._finish(status, usage)
                break
            time.sleep(0.02)
        return self.result


def run_script(ctx, script: str, *args, timeout: float) -> Ran:
    return Proc(script, args, ctx.env, timeout).wait()


def judge_program(row: Row, ran: Ran, *, label: str = "") -> bool:
    """Count hangs, crashes and tracebacks of one finished program; True when none of them happened."""
    label = f"{label}: " if label else ""
    clean = True
    if ran.timed_out:
        row.fail(f"{label}{ran.brief()}", "hangs")
        clean = False
    elif ran.signalled:
        row.fail(f"{label}killed by signal {-ran.rc}: {ran.brief()}", "crashes")
        clean = False
    if TRACEBACK in ran.stderr or TRACEBACK in ran.stdout:
        row.fail(f"{label}traceback: {ran.brief()} :: {clip(ran.stderr[ran.stderr.find(TRACEBACK):], 600)}", "tracebacks")
        clean = False
    return clean


# ------------------------------------------------------------------------------------------------ the server


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError, ValueError):
                    todo.extend(int(child) for child in Path(f"/proc/{current}/task/{task}/children").read_text().split())
    return pids


def vm_hwm_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """server.py on 127.0.0.1, a free port, --max-upload-mb 2; its log (stdout + stderr) in a file."""

    def __init__(self, ctx, index: Path):
        self.ctx = ctx
        self.index = index
        self.popen: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log_path: Path | None = None
        self.peak_resettable = True

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.ctx.work / f"server-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(REPO / "server.py"), "--port", "0", "--index", str(self.index),
                 "--max-upload-mb", str(UPLOAD_MB), "--threads", "4"],
                cwd=REPO, env=self.ctx.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            text = self.log_text()
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", text)
            if match:
                self.port = int(match.group(1))
                return
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server.py did not start (exit {self.popen.returncode}): {clip(text, 2000)}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def reset_peak(self) -> None:
        for pid in process_tree(self.popen.pid):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.peak_resettable = False

    def peak_mb(self) -> float:
        return sum(vm_hwm_mb(pid) for pid in process_tree(self.popen.pid))

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@contextlib.contextmanager
def watching_server(ctx, row: Row):
    """Peak RSS, tracebacks, ERROR lines and a crash of the server during one scenario."""
    server = ctx.server
    if not server.alive():
        server.start()
        row.note("server restarted before this scenario")
    server.reset_peak()
    log_start = len(server.log_text())
    try:
        yield server
    finally:
        if server.alive():
            row.peak(server.peak_mb())
            if not server.peak_resettable:
                row.note("peak RSS since the server started (VmHWM could not be reset)")
        text = server.log_text()[log_start:]
        count = text.count(TRACEBACK)
        if count:
            row.fail(f"server log: {clip(text[text.find(TRACEBACK):], 800)}", "tracebacks", count)
        for line in text.splitlines():
            if line.startswith(("ERROR", "CRITICAL")):
                row.fail(f"server log: {clip(line, 300)}")
        if not server.alive():
            code = server.popen.returncode
            row.fail(f"server.py ended during the scenario (exit {code}): {clip(server.log_text()[-1500:], 1500)}",
                     "crashes" if code is not None and code < 0 else "failed_checks")


# ------------------------------------------------------------------------------------------------ HTTP


@dataclasses.dataclass
class Resp:
    status: int | None
    headers: dict
    body: bytes
    seconds: float
    error: str | None = None
    hang: bool = False

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def exchange(port: int, payload: bytes, timeout: float = HANG_S) -> Resp:
    """Send raw bytes to 127.0.0.1:port, read the answer until the server closes; bounded by ``timeout``."""
    started = time.monotonic()
    deadline = started + timeout
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return Resp(None, {}, b"", time.monotonic() - started, f"cannot connect: {exc}")
    data, error, hang = bytearray(), None, False
    with sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading everything (e.g. 413) and closed: read its answer
        except socket.timeout:
            hang = True
        while not hang:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hang = True
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                hang = True
                break
            except ConnectionResetError:
                break
            except OSError as exc:
                error = f"receive failed: {exc}"
                break
            if not chunk:
                break
            data += chunk
    seconds = time.monotonic() - started
    if hang:
        return Resp(None, {}, bytes(data), seconds, f"no complete answer within {timeout:.0f} s", hang=True)
    head, separator, body = bytes(data).partition(b"\r\n\r\n")
    if not separator:
        return Resp(None, {}, bytes(data), seconds, error or f"connection closed without an answer ({len(data)} bytes)")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Resp(None, {}, bytes(data), seconds, f"malformed status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = dechunk(body)
    elif "content-length" in headers:
        expected = int(headers["content-length"])
        if len(body) < expected:
            error = f"answer cut short: {len(body)} of {expected} bytes"
        body = body[:expected]
    return Resp(status, headers, body, seconds, error)


def http(port: int, method: str, target, *, headers=(), body: bytes = b"", timeout: float = HANG_S,
         length: int | None = None) -> Resp:
    if isinstance(target, str):
        target = target.encode("utf-8")
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
    lines += [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    elif body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body, timeout)


BOUNDARY = b"----faultsBoundary7MA4YWxkTrZu0gW"


def multipart(parts, boundary: bytes = BOUNDARY) -> tuple[bytes, bytes]:
    """(body, content type) of a multipart/form-data request; parts: (name, filename or None, type or None, data)."""
    out = []
    for name, filename, kind, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        head = disposition + b"\r\n" + (b"Content-Type: " + kind + b"\r\n" if kind else b"")
        out.append(b"--" + boundary + b"\r\n" + head + b"\r\n" + data + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out), b"multipart/form-data; boundary=" + boundary


def upload(port: int, data: bytes, fields=(), *, filename: bytes = b"query.jpg", timeout: float = HANG_S) -> Resp:
    parts = [(b"image", filename, b"application/octet-stream", data)]
    parts += [(name.encode(), None, None, str(value).encode()) for name, value in fields]
    body, kind = multipart(parts)
    return http(port, "POST", "/api/search", headers=[b"Content-Type: " + kind], body=body, timeout=timeout)


def is_json_error(resp: Resp) -> bool:
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return False
    data = resp.json()
    return isinstance(data, dict) and isinstance(data.get("error"), str) and bool(data["error"].strip())


def url_version(url) -> str | None:
    if not isinstance(url, str):
        return None
    values = parse_qs(urlsplit(url).query).get("v")
    return values[0] if values else None


def search_problems(data, *, k: int | None = None, offset: int = 0) -> list[str]:
    """What is wrong with one /api/search answer (empty when nothing is)."""
    if not isinstance(data, dict):
        return ["the answer is not a JSON object"]
    results, total, version = data.get("results"), data.get("total"), data.get("version")
    if not isinstance(results, list) or not isinstance(total, int) or not isinstance(version, str) or not version:
        return [f"answer without results/total/version: {clip(json.dumps(data), 200)}"]
    problems = []
    if k is not None and len(results) != max(0, min(k, total - offset)):
        problems.append(f"{len(results)} results for k={k} offset={offset} total={total}")
    previous = math.inf
    for position, hit in enumerate(results):
        score = hit.get("score")
        if not isinstance(score, (int, float)) or not math.isfinite(score) or abs(score) > 1.0001:
            problems.append(f"score {score!r} at rank {position + 1}")
        elif score > previous + 1e-6:
            problems.append(f"results not sorted at rank {position + 1}")
        else:
            previous = score
        if hit.get("rank") != offset + position + 1:
            problems.append(f"rank {hit.get('rank')!r} at position {offset + position + 1}")
        if not isinstance(hit.get("id"), int) or not 0 <= hit["id"] < total:
            problems.append(f"id {hit.get('id')!r} outside 0..{total - 1}")
        for key in ("image_url", "thumb_url"):
            if url_version(hit.get(key)) != version:
                problems.append(f"{key} {hit.get(key)!r} is not of version {version}")
    query = data.get("query")
    if isinstance(query, dict) and query.get("type") == "database":
        for key in ("image_url", "thumb_url"):
            if url_version(query.get(key)) != version:
                problems.append(f"query {key} {query.get(key)!r} is not of version {version}")
    return problems[:5]


class StatusTally:
    def __init__(self):
        self.counts = collections.Counter()

    def add(self, resp: Resp) -> None:
        self.counts["hang" if resp.hang else "no answer" if resp.status is None else resp.status] += 1

    def summary(self) -> str:
        classes = collections.Counter()
        for status, count in self.counts.items():
            classes[f"{status // 100}xx" if isinstance(status, int) else status] += count
        detail = ", ".join(f"{s}: {n}" for s, n in sorted(self.counts.items(), key=lambda item: str(item[0])))
        return "; ".join(f"{c} {n}" for c, n in sorted(classes.items())) + f" ({detail})"


def judge_http(row: Row, tally: StatusTally, label: str, resp: Resp, allowed=ANY, check=None) -> None:
    row.tried += 1
    tally.add(resp)
    if resp.hang:
        row.fail(f"{label}: {resp.error}", "hangs")
        return
    if resp.status is None:
        row.fail(f"{label}: {resp.error}")
        return
    if resp.status >= 500:
        row.fail(f"{label}: HTTP {resp.status} {clip(resp.body, 300)}", "http_5xx")
        return
    if resp.error:
        row.fail(f"{label}: HTTP {resp.status}, {resp.error}")
    if 400 <= resp.status < 500 and not is_json_error(resp):
        row.fail(f"{label}: HTTP {resp.status} is not JSON with an \"error\": "
                 f"{resp.headers.get('content-type')!r} {clip(resp.body, 200)}")
    if resp.status not in allowed:
        row.fail(f"{label}: HTTP {resp.status}, expected {describe_allowed(allowed)}: {clip(resp.body, 200)}")
    elif resp.status == 200 and check is not None:
        problems = check(resp)
        if problems:
            row.fail(f"{label}: " + "; ".join(problems))


def describe_allowed(allowed) -> str:
    if allowed == ANY:
        return "200 or 4xx"
    if allowed == REJECT:
        return "4xx"
    return " or ".join(map(str, sorted(allowed)))


# ------------------------------------------------------------------------------------------------ images


def pil():
    from PIL import Image

    return Image


def photo(name: str = "coffee/original.jpg", size=(160, 120)):
    Image = pil()
    with Image.open(DEMO / name) as image:
        return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value & 0xFFFFFFFF)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 256)) + png_chunk(b"IEND", b"")


def png_sixteen_bit(side: int) -> bytes:
    """A 16-bit greyscale side x side PNG of one value (8944: about 170 kB claiming 153 MB of pixels)."""
    row = b"\0" + b"\x00\x07" * side
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker")


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def exif_jpeg(image, orientation) -> bytes:
    exif = pil().Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", quality=85, exif=exif.tobytes())


def fits(cards: list[str], data: bytes = b"") -> bytes:
    header = "".join(card.ljust(80) for card in [*cards, "END"]).encode("ascii")
    header += b" " * (-len(header) % 2880)
    return header + data


def mutated(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    how = rng.choice(["header", "header", "anywhere", "truncate"])
    if how == "truncate":
        out = out[: rng.randrange(8, max(9, len(out)))]
    for _ in range(rng.randint(1, 6)):
        limit = min(len(out), 96) if how == "header" else len(out)
        out[rng.randrange(limit)] = rng.randrange(256)
    return bytes(out)


@dataclasses.dataclass
class Hostile:
    name: str
    allowed: frozenset
    core: bool  # kept by --quick
    data: bytes | None = None  # the file of an ordinary upload of field "image"
    raw: bytes | None = None  # or a whole request (the port is filled in later)
    request: object = None  # or a function port -> Resp
    fields: tuple = ()


def hostile_inputs(rng: random.Random, quick: bool) -> list[Hostile]:
    Image = pil()
    base = photo()
    jpeg = encoded(base, "JPEG", quality=85)
    png = encoded(base, "PNG")
    items: list[Hostile] = []

    def add(name, allowed, core, **kw):
        items.append(Hostile(name, frozenset(allowed), core, **kw))

    def add_image(name, allowed, core, make):
        try:
            data = make()
        except Exception as exc:  # a format this Pillow cannot write: not tried, said in the notes
            items.append(Hostile(f"{name} (not generated: {type(exc).__name__})", frozenset(), False))
            return
        add(name, allowed, core, data=data)

    # nothing, too little, truncated
    add("empty file", {400}, True, data=b"")
    add("1 byte", REJECT, True, data=b"\xff")
    for cut in (8, 100, len(jpeg) // 2):
        add(f"JPEG truncated at {cut} B", REJECT, cut == 100, data=jpeg[:cut])
    add("JPEG without its last 2 bytes", ANY, False, data=jpeg[:-2])
    for cut in (8, 33, len(png) // 2):
        add(f"PNG truncated at {cut} B", REJECT, cut == len(png) // 2, data=png[:cut])
    add("PNG without IEND", ANY, False, data=png[:-12])
    # not images
    for size in (16, 4096, 1_000_000):
        add(f"{size} random bytes", REJECT, size == 4096, data=rng.randbytes(size))
    for magic in (b"\xff\xd8\xff\xe0", PNG_SIGNATURE, b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0", b"8BPS"):
        add(f"{magic[:4]!r} magic + random bytes", REJECT, magic == PNG_SIGNATURE, data=magic + rng.randbytes(2000))
    add("plain text", REJECT, False, data=b"hello, this is not an image\n" * 20)
    add("HTML", REJECT, True, data=b"<!doctype html><html><body><script>alert(1)</script><img src=x></body></html>")
    add("SVG", REJECT, True, data=b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100000" '
                                  b'height="100000"><rect width="100%" height="100%"/></svg>')
    add("PDF header", REJECT, True, data=b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj <</Type/Catalog>> endobj\ntrailer<<>>\n%%EOF")
    add("ZIP header", REJECT, False, data=b"PK\x03\x04" + rng.randbytes(500))
    add("gzip", REJECT, False, data=zlib.compress(b"x" * 10000))
    add("ELF executable head", REJECT, False, data=Path(sys.executable).read_bytes()[:8192])
    add("JSON", REJECT, False, data=b'{"image": "x", "k": 3}')
    # claimed sizes: decompression bombs and memory
    add("PNG header claiming 100000x100000", {413}, True, data=png_claiming(100_000, 100_000))
    add("PNG header claiming 1x2^31-1", REJECT, False, data=png_claiming(1, 2**31 - 1))
    add("PNG header claiming 0x0", REJECT, False, data=png_claiming(0, 0))
    add("JPEG claiming 65500x65500", {413}, False, data=jpeg_claiming(jpeg, 65500, 65500))
    gif = encoded(base, "GIF")
    add("GIF claiming 65535x65535", REJECT, False, data=gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:])
    bmp = encoded(base, "BMP")
    add("BMP claiming 100000x100000", REJECT, False, data=bmp[:18] + struct.pack("<ii", 100_000, 100_000) + bmp[26:])
    add("BMP with negative width", REJECT, False, data=bmp[:18] + struct.pack("<ii", -5, 120) + bmp[26:])
    add("PSD claiming 30000x30000", REJECT, False,
        data=b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 30000, 30000, 8, 3) + b"\0" * 64)
    add("EPS with a 100000x100000 bounding box", REJECT, False,
        data=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\nshowpage\n%%EOF\n")
    add("EPS (needs Ghostscript)", REJECT, False, data=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    add("PPM claiming 100000x100000", REJECT, False, data=b"P6\n100000 100000\n255\n" + b"\0" * 300)
    add("PPM with maxval 0", REJECT, False, data=b"P6\n4 4\n0\n" + b"\0" * 48)
    add("PPM 16-bit 4x4", ANY, False, data=b"P5\n4 4\n65535\n" + bytes(range(32)))
    add("XBM claiming 100000x100000", REJECT, False,
        data=b"#define x_width 100000\n#define x_height 100000\nstatic char x_bits[] = {0x00};\n")
    add("FITS claiming 100000x100000", REJECT, False,
        data=fits(["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
                   "NAXIS1  =               100000", "NAXIS2  =               100000"], b"\0" * 2880))
    add("FITS with BITPIX 7", ANY, False,
        data=fits(["SIMPLE  =                    T", "BITPIX  =                    7", "NAXIS   =                    2",
                   "NAXIS1  =                    4", "NAXIS2  =                    4"], b"\0" * 2880))
    add("FITS float, data cut", ANY, False,
        data=fits(["SIMPLE  =                    T", "BITPIX  =                  -32", "NAXIS   =                    2",
                   "NAXIS1  =                   64", "NAXIS2  =                   64"], b"\0" * 100))
    add("16-bit 8944x8944 PNG", {413}, True, data=png_sixteen_bit(8944))
    add_image("1-bit 12000x12000 PNG (144 Mpx bomb)", {413}, True, lambda: encoded(Image.new("1", (12000, 12000)), "PNG"))
    # real images of every kind: must be searched
    frames = [Image.new("RGB", (48, 48), (i * 7 % 256, i * 13 % 256, i * 29 % 256)) for i in range(300)]
    add_image("GIF with 300 frames", OK, True, lambda: encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20))
    add_image("animated PNG, 60 frames", OK, True, lambda: encoded(frames[0], "PNG", save_all=True, append_images=frames[1:60]))
    add_image("animated WebP, 30 frames", OK, False, lambda: encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:30]))
    add_image("CMYK JPEG", OK, True, lambda: encoded(base.convert("CMYK"), "JPEG"))
    add_image("progressive JPEG", OK, False, lambda: encoded(base, "JPEG", progressive=True))
    add_image("greyscale JPEG", OK, False, lambda: encoded(base.convert("L"), "JPEG"))
    add_image("TIFF", OK, True, lambda: encoded(base, "TIFF"))
    add_image("TIFF LZW", OK, False, lambda: encoded(base, "TIFF", compression="tiff_lzw"))
    add_image("TIFF 16-bit grey", OK, False,
              lambda: encoded(Image.fromarray((np.arange(120 * 160, dtype=np.uint16).reshape(120, 160) * 3)), "TIFF"))
    add_image("TIFF float32", OK, False,
              lambda: encoded(Image.fromarray(np.linspace(-1e30, 1e30, 120 * 160, dtype=np.float32).reshape(120, 160)), "TIFF"))
    add_image("TIFF float32 with NaN and inf", ANY, False,
              lambda: encoded(Image.fromarray(np.array([[np.nan, np.inf], [-np.inf, 0]], dtype=np.float32).repeat(40, 0).repeat(40, 1)), "TIFF"))
    add_image("multi-page TIFF", OK, False, lambda: encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:10]))
    add_image("WebP lossy", OK, True, lambda: encoded(base, "WEBP", quality=80))
    add_image("WebP lossless", OK, False, lambda: encoded(base, "WEBP", lossless=True))
    add_image("BMP", OK, True, lambda: bmp)
    add_image("BMP palette", OK, False, lambda: encoded(base.convert("P"), "BMP"))
    add_image("ICO", ANY, False, lambda: encoded(base, "ICO"))
    add_image("TGA", ANY, False, lambda: encoded(base, "TGA"))
    add_image("PCX", ANY, False, lambda: encoded(base, "PCX"))
    add_image("PPM", ANY, False, lambda: encoded(base, "PPM"))
    add_image("JPEG 2000", ANY, False, lambda: encoded(base, "JPEG2000"))
    add_image("AVIF", ANY, False, lambda: encoded(base, "AVIF"))
    add_image("PNG palette with transparency", OK, False, lambda: encoded(base.convert("P"), "PNG", transparency=0))
    add_image("PNG RGBA", OK, False, lambda: encoded(base.convert("RGBA"), "PNG"))
    add_image("PNG LA", OK, False, lambda: encoded(base.convert("LA"), "PNG"))
    add_image("PNG 1-bit", OK, False, lambda: encoded(base.convert("1"), "PNG"))
    add_image("TIFF 32-bit integer grey", OK, False, lambda: encoded(base.convert("I"), "TIFF"))
    add_image("PNG 16-bit constant (max == min)", OK, False, lambda: png_sixteen_bit(64))
    bad_crc = bytearray(png)
    bad_crc[29:33] = bytes(b ^ 0xFF for b in bad_crc[29:33])
    add("PNG with a bad IHDR CRC", REJECT, True, data=bytes(bad_crc))
    idat = png.find(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    bad_idat = bytearray(png)
    bad_idat[idat + 4 + length] ^= 0xFF
    add("PNG with a bad IDAT CRC", ANY, False, data=bytes(bad_idat))
    for orientation in (1, 2, 3, 4, 5, 6, 7, 8):
        add_image(f"EXIF orientation {orientation}", OK, orientation in (6, 8), lambda o=orientation: exif_jpeg(base, o))
    for orientation in (0, 9, 65535):
        add_image(f"EXIF orientation {orientation} (invalid)", OK, orientation == 65535, lambda o=orientation: exif_jpeg(base, o))
    add("EXIF of random bytes", ANY, True, data=with_app1(jpeg, b"Exif\0\0MM\0*" + rng.randbytes(400)))
    add("EXIF with an IFD loop", ANY, False,
        data=with_app1(jpeg, b"Exif\0\0MM\0*\0\0\0\x08\0\x01\x87\x69\0\x04\0\0\0\x01\0\0\0\x08\0\0\0\0"))
    add_image("1x1 PNG", OK, True, lambda: encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    add_image("1x1 JPEG", OK, False, lambda: encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"))
    add_image("1x1 GIF", OK, False, lambda: encoded(Image.new("P", (1, 1)), "GIF"))
    add_image("30000x1 PNG strip", OK, True, lambda: encoded(Image.new("RGB", (30000, 1), (9, 99, 199)), "PNG"))
    add_image("1x30000 PNG strip", OK, False, lambda: encoded(Image.new("RGB", (1, 30000), (9, 99, 199)), "PNG"))
    # seeded mutations of valid files in several formats
    bases = {"JPEG": jpeg, "PNG": png, "GIF": gif, "BMP": bmp, "TIFF": encoded(base, "TIFF"),
             "WEBP": encoded(base, "WEBP"), "PPM": encoded(base, "PPM"), "TGA": encoded(base, "TGA"),
             "PCX": encoded(base, "PCX"), "ICO": encoded(base, "ICO")}
    for n in range(8 if quick else 30):
        fmt = sorted(bases)[n % len(bases)]
        add(f"mutated {fmt} #{n}", ANY, True, data=mutated(bases[fmt], rng))
    # the request itself
    add("non-UTF-8 file name (Latin-1)", OK, True, data=jpeg, request=lambda port: upload(port, jpeg, filename=b"caf\xe9 cr\xe8me.jpg"))
    add("file name ../../etc/passwd", OK, False, request=lambda port: upload(port, jpeg, filename=b"../../etc/passwd"))
    add("file name of 10000 bytes", ANY, False, request=lambda port: upload(port, jpeg, filename=b"a" * 10000 + b".jpg"))
    add("file name with NUL and CRLF", ANY, False, request=lambda port: upload(port, jpeg, filename=b"a\x00b\r\nc.jpg"))

    def form(port, parts, kind=None, target="/api/search"):
        body, content_type = multipart(parts)
        return http(port, "POST", target, headers=[b"Content-Type: " + (kind or content_type)], body=body)

    add("missing image field", {400}, True, request=lambda port: form(port, [(b"k", None, None, b"3")]))
    add("wrong field name", {400}, True, request=lambda port: form(port, [(b"file", b"q.jpg", b"image/jpeg", jpeg)]))
    add("image as a plain form value", {400}, False, request=lambda port: form(port, [(b"image", None, None, jpeg[:3000])]))
    add("two image fields", OK, False, request=lambda port: form(port, [(b"image", b"a.jpg", None, jpeg), (b"image", b"b.png", None, png)]))
    add("200 form fields", {413}, True,
        request=lambda port: form(port, [(b"f%d" % i, None, None, b"x") for i in range(200)] + [(b"image", b"q.jpg", None, jpeg)]))
    padded_under = png + b"\0" * (UPLOAD_LIMIT - 1 - len(png))
    add("valid PNG padded to the limit - 1 B", OK, True, data=padded_under)
    add("valid PNG padded to exactly the limit", OK, False, data=padded_under + b"\0")
    add("JPEG magic + zeros, limit - 1 B", {415}, False, data=b"\xff\xd8" + b"\0" * (UPLOAD_LIMIT - 3))
    add("file of the limit + 1 B", {413}, True, data=padded_under + b"\0\0")
    add("file of the limit + 100 kB (over the request limit)", {413}, False, data=b"\0" * (UPLOAD_LIMIT + 100_000))
    head = (b"POST /api/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 50000000\r\n\r\n")
    add("Content-Length 50 MB (over waitress' limit)", {413}, True, request=lambda port: exchange(port, head))
    add("raw JPEG as application/octet-stream", {400}, True,
        request=lambda port: http(port, "POST", "/api/search", headers=[b"Content-Type: application/octet-stream"], body=jpeg))
    add("text/plain body", {400}, False,
        request=lambda port: http(port, "POST", "/api/search", headers=[b"Content-Type: text/plain"], body=b"hello"))
    add("urlencoded image=...", {400}, False,
        request=lambda port: http(port, "POST", "/api/search", headers=[b"Content-Type: application/x-www-form-urlencoded"],
                                  body=b"image=" + jpeg[:2000].hex().encode()))
    add("JSON body", {400}, False,
        request=lambda port: http(port, "POST", "/api/search", headers=[b"Content-Type: application/json"], body=b'{"image": "x"}'))
    add("multipart without a boundary", REJECT, True,
        request=lambda port: form(port, [(b"image", b"q.jpg", None, jpeg)], kind=b"multipart/form-data"))
    add("multipart with another boundary", REJECT, False,
        request=lambda port: form(port, [(b"image", b"q.jpg", None, jpeg)], kind=b"multipart/form-data; boundary=nothere"))
    add("multipart cut before its end", ANY, False,
        request=lambda port: http(port, "POST", "/api/search", headers=[b"Content-Type: multipart/form-data; boundary=" + BOUNDARY],
                                  body=multipart([(b"image", b"q.jpg", None, jpeg)])[0][: len(jpeg) // 2]))
    add("boundary of 300 characters", ANY, False,
        request=lambda port: http(port, "POST", "/api/search",
                                  headers=[b"Content-Type: multipart/form-data; boundary=" + b"z" * 300],
                                  body=multipart([(b"image", b"q.jpg", None, jpeg)], b"z" * 300)[0]))
    add("no Content-Type, no body", {400}, False, request=lambda port: http(port, "POST", "/api/search", body=b""))

    def chunked(port):
        body, kind = multipart([(b"image", b"q.jpg", None, jpeg), (b"k", None, None, b"3")])
        pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096]) for i in range(0, len(body), 4096))
        return exchange(port, b"POST /api/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: " + kind +
                        b"\r\nTransfer-Encoding: chunked\r\n\r\n" + pieces + b"0\r\n\r\n")

    add("chunked transfer encoding", OK, False, request=chunked, fields=(("k", "3"),))
    for fields, allowed in (((("k", "0"),), {400}), ((("k", "abc"),), {400}), ((("k", "1000000000"),), {400}),
                            ((("offset", "-1"),), {400}), ((("qe", "bogus"),), {400}), ((("qe_alpha", "nan"),), {400}),
                            ((("k", "200"), ("qe", "alpha")), OK), ((("k", "3"), ("offset", "10000")), OK)):
        name = "upload with " + " ".join(f"{k}={v}" for k, v in fields)
        add(name, allowed, fields[0][1] in ("0", "200"), data=jpeg, fields=fields)
    return [item for item in items if not quick or item.core]


# ------------------------------------------------------------------------------------------------ scenarios


def upload_check(fields):
    options = dict(fields)
    try:
        k, offset = int(options.get("k", 10)), int(options.get("offset", 0))
    except ValueError:
        k, offset = None, 0
    return lambda resp: search_problems(resp.json(), k=k, offset=offset)


def scenario_hostile_uploads(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 1)
    started = time.perf_counter()
    inputs = hostile_inputs(rng, ctx.quick)
    row.note(f"inputs generated in {time.perf_counter() - started:.1f} s")
    skipped = [item.name for item in inputs if not item.allowed]
    if skipped:
        row.note("not generated: " + "; ".join(skipped))
    tally = StatusTally()
    slowest = (0.0, "")
    deadline = time.monotonic() + (120 if ctx.quick else 300)
    with watching_server(ctx, row) as server:
        for item in inputs:
            if not item.allowed:
                continue
            if time.monotonic() > deadline:
                row.note("stopped at the time bound")
                break
            if item.request is not None:
                resp = item.request(server.port)
            else:
                resp = upload(server.port, item.data, item.fields)
            judge_http(row, tally, item.name, resp, item.allowed, upload_check(item.fields))
            slowest = max(slowest, (resp.seconds, item.name))
            if not server.alive():
                row.fail(f"server.py died after {item.name!r}", "crashes")
                break
        alive = http(server.port, "GET", "/healthz")
        if alive.status != 200:
            row.fail(f"/healthz after the uploads: {alive.status} {alive.error or clip(alive.body)}")
    row.note(tally.summary())
    row.note(f"slowest: {slowest[1]} {slowest[0]:.2f} s")


def odd_targets(ctx) -> list[tuple[bytes, frozenset]]:
    """(request target, statuses a GET may answer)."""
    up = "../" * 16
    canary = str(ctx.canary).lstrip("/")
    nf, bad = frozenset({404}), frozenset({400})
    long_id = "9" * 5000
    targets = [
        ("/image/../../etc/passwd", nf), ("/image/..%2f..%2fetc%2fpasswd", nf), ("/image/%2e%2e/%2e%2e/etc/passwd", nf),
        ("/%2e%2e/%2e%2e/etc/passwd", nf), ("//etc/passwd", nf), ("/image//etc/passwd", nf), ("/../../../../etc/passwd", nf),
        ("/image/01", nf), ("/image/%D9%A1", nf), ("/image/%EF%BC%91", nf), ("/image/-1", nf), ("/image/+1", nf),
        ("/image/1.0", nf), ("/image/0x1", nf), ("/image/1e2", nf), ("/image/99999999999999", nf),
        ("/image/999999999999", nf), ("/image/%00", nf), ("/image/0%00", nf), ("/image/%20", nf), ("/image/", nf),
        ("/image", nf), ("/image/0/", nf), ("/image/0?v=bogus", frozenset({409})), ("/image/0", OK),
        ("/thumb/../../etc/passwd", nf), ("/thumb/-1", nf), ("/thumb/01", nf), ("/thumb/%EF%BC%91", nf),
        ("/thumb/99999999999", nf), ("/thumb/0?v=bogus", frozenset({409})), ("/thumb/0", OK),
        ("/static/../retrieval/web/routes.py", nf), ("/static/%2e%2e/retrieval/web/routes.py", nf),
        ("/static/..%2fretrieval%2fweb%2froutes.py", nf), ("/static/..%2f..%2f..%2f..%2fetc%2fpasswd", nf),
        ("/static//etc/passwd", nf), ("/static/%2fetc%2fpasswd", nf), ("/static/....//....//etc/passwd", nf),
        ("/static/..\\..\\etc\\passwd", nf), ("/static/%5c..%5c..%5cetc%5cpasswd", nf), ("/static/" + up + canary, nf),
        ("/static/%2e%2e%2f" * 16 + canary, nf), ("/static/" + str(ctx.canary), nf), ("/static/../pyproject.toml", nf),
        ("/static/.%2e/pyproject.toml", nf), ("/static/app.js/../../server.py", nf), ("/static/nonexistent.js", nf),
        ("/static/app.js%00.png", nf), ("/static/app.js", OK), ("/server.py", nf), ("/pyproject.toml", nf),
        ("/.git/config", nf), ("/.env", nf), ("/templates/index.html", nf), ("/retrieval/web/routes.py", nf),
        ("/api/search?id=abc", bad), ("/api/search?id=", bad), ("/api/search?id=-1", bad), ("/api/search?id=01", bad),
        ("/api/search?id=1e3", bad), ("/api/search?id=%EF%BC%91", bad), ("/api/search?id=%00", bad),
        ("/api/search?id=99999999999999", bad), ("/api/search?id=999999999999", nf), ("/api/search?id=0&k=0", bad),
        (f"/api/search?id=0&k={10**9}", bad), ("/api/search?id=0&k=-5", bad), ("/api/search?id=0&k=1.5", bad),
        ("/api/search?id=0&k=" + long_id, bad), ("/api/search?id=" + long_id, bad), ("/api/search?id=0&offset=-1", bad),
        ("/api/search?id=0&offset=100000000", bad), ("/api/search?id=0&qe=bogus", bad),
        ("/api/search?id=0&qe=avg&qe_top_n=0", bad), ("/api/search?id=0&qe=alpha&qe_alpha=nan", bad),
        ("/api/search?id=0&qe=alpha&qe_alpha=inf", bad), ("/api/search?id=0&qe=alpha&qe_alpha=1e308", bad),
        ("/api/search?id=0&qe=alpha&qe_alpha=-1", bad), ("/api/search?id=0&v=deadbeef", frozenset({409})),
        ("/api/search?id=0&id=1", OK), ("/api/search?k=5", bad), ("/api/search", bad), ("/api/search?id=0&k=200", OK),
        ("/api/search?id=0&qe=alpha&qe_alpha=20&qe_top_n=50", OK), ("/api/search?id=0&offset=10000", OK),
        ("/api/search?id=0&x=" + "a" * 8000, OK), ("/api/search?id=0&x=" + "a" * 60000, OK),
        ("/api/search?id=0&x=" + "a" * 70000, REJECT), ("/api/search?id=0&" + "&".join(f"p{i}=1" for i in range(3000)), OK),
        ("/api/sample?n=0", bad), ("/api/sample?n=-1", bad), ("/api/sample?n=1000000", bad), ("/api/sample?n=abc", bad),
        ("/api/sample?n=200", OK), ("/api/info?x=%FF%FE", OK), ("/healthz/..", nf), ("/healthz?x=%C3%BC", OK),
        ("/ü/é", REJECT), ("/%C3%BC", nf), ("/%FF%FE", nf), ("/api/search/../info", nf), ("/api/%73earch?id=0", ANY),
        ("/api/search;id=0", nf), ("/" + "a" * 10000, nf), ("/index.html", nf), ("/%2e", nf), ("/api/info/", nf),
        ("/", OK), ("/healthz", OK), ("/api/info", OK),
    ]
    out = [(target.encode("utf-8"), allowed) for target, allowed in targets]
    out += [(b"/\xff\xfe\xfd", REJECT), (b"/image/\xd9\xa1", REJECT), (b"*", REJECT), (b"/api/search?id=\xff", REJECT),
            (b"http://127.0.0.1/etc/passwd", REJECT), (b"/image/0 HTTP/1.1\r\nX-Smuggle: 1", ANY)]
    return out


def leak_markers(ctx) -> list[bytes]:
    markers = [ctx.canary_token.encode(), b"\x89HDF\r\n\x1a\n", b"def api_search(", b"[project]",
               b"from retrieval.cli.server import main"]
    with contextlib.suppress(OSError):
        first = Path("/etc/passwd").read_bytes().split(b"\n", 1)[0]
        if first:
            markers.append(first)
    return markers


def scenario_odd_routes(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 2)
    pairs = [(method, target, allowed) for target, allowed in odd_targets(ctx) for method in ("GET", "POST", "PUT", "DELETE")]
    if ctx.quick:
        pairs = rng.sample(pairs, len(pairs) // 4)
    markers = leak_markers(ctx)
    tally = StatusTally()
    deadline = time.monotonic() + (60 if ctx.quick else 180)
    with watching_server(ctx, row) as server:
        for method, target, allowed in pairs:
            if time.monotonic() > deadline:
                row.note("stopped at the time bound")
                break
            body = b"x=1" if method in ("POST", "PUT") else b""
            resp = http(server.port, method, target, body=body,
                        headers=[b"Content-Type: application/x-www-form-urlencoded"] if body else [])
            label = f"{method} {clip(target.decode('utf-8', 'backslashreplace'), 90)}"
            judge_http(row, tally, label, resp, allowed if method == "GET" else REJECT,
                       check=lambda r: [] if not r.headers.get("content-type", "").startswith("application/json")
                       or r.json() is not None else ["a JSON content type with a body that is not JSON"])
            leaked = [m for m in markers if m in resp.body]
            if leaked:
                row.fail(f"{label}: served a file outside static/ (found {leaked[0][:30]!r}) HTTP {resp.status}")
            if not server.alive():
                row.fail(f"server.py died after {label}", "crashes")
                break
    row.note(tally.summary())


def search_key(data) -> tuple:
    return tuple((hit["id"], hit["score"]) for hit in data["results"]), data["total"], data["has_more"]


def scenario_concurrency(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 3)
    count = 25 if ctx.quick else 100
    blobs = ctx.upload_blobs
    requests = []
    for i in range(count):
        k, offset, qe = rng.choice([1, 5, 10, 20, 49]), rng.choice([0, 0, 3]), rng.choice(["none", "none", "avg", "alpha"])
        if i % 2 == 0:
            requests.append(("id", f"/api/search?id={rng.randrange(ctx.size)}&k={k}&offset={offset}&qe={qe}", k, offset))
        else:
            requests.append(("upload", (rng.randrange(len(blobs)), (("k", k), ("offset", offset), ("qe", qe))), k, offset))

    def send(port, request):
        kind, what, _, _ = request
        if kind == "id":
            return http(port, "GET", what)
        blob, fields = what
        return upload(port, blobs[blob], fields)

    tally = StatusTally()
    with watching_server(ctx, row) as server:
        reference = {}
        for i, request in enumerate(requests):
            resp = send(server.port, request)
            if resp.status == 200 and not search_problems(resp.json(), k=request[2], offset=request[3]):
                reference[i] = search_key(resp.json())
            else:
                row.fail(f"sequential request {i} ({request[0]}): HTTP {resp.status} {resp.error or clip(resp.body, 200)}")
        order = list(range(count))
        rng.shuffle(order)
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: (i, send(server.port, requests[i])), order))
        seconds = time.perf_counter() - started
        worst = 0.0
        for i, resp in answers:
            kind, _, k, offset = requests[i]
            judge_http(row, tally, f"concurrent request {i} ({kind})", resp, OK,
                       lambda r, k=k, offset=offset: search_problems(r.json(), k=k, offset=offset))
            if resp.status != 200 or i not in reference or search_problems(resp.json(), k=k, offset=offset):
                continue
            got, want = search_key(resp.json()), reference[i]
            if [hit[0] for hit in got[0]] != [hit[0] for hit in want[0]] or got[1:] != want[1:]:
                row.fail(f"concurrent request {i} ({kind}) ranks other ids than the same request alone: "
                         f"{[h[0] for h in got[0]][:8]} != {[h[0] for h in want[0]][:8]}")
                continue
            difference = max((abs(a[1] - b[1]) for a, b in zip(got[0], want[0])), default=0.0)
            worst = max(worst, difference)
            if difference > 2e-6:
                row.fail(f"concurrent request {i} ({kind}): scores differ by {difference:.2g} from the same request alone")
    row.note(f"{count} requests ({count // 2} by id, {count - count // 2} uploads) sequentially, then from 8 threads in "
             f"{seconds:.1f} s; largest score difference {worst:.1g}; {tally.summary()}")


def list_images(folder: Path) -> list[str]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def scenario_hot_reload(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 4)
    runs = 2 if ctx.quick else 4
    cap_requests, cap_seconds = (6000, 90.0) if ctx.quick else (20000, 240.0)
    folder, aside = ctx.images, ctx.work / "reload-aside"
    aside.mkdir(exist_ok=True)
    blobs = ctx.upload_blobs
    max_id = ctx.size - 3 * runs - 1  # every version keeps at least this many rows
    stop = threading.Event()
    lock = threading.Lock()
    versions: dict[str, dict] = {}
    counter = collections.Counter()
    results: list[tuple[str, Resp, object]] = []  # failures to judge in the main thread: (label, resp, problems)

    def record(version, total, items) -> list[str]:
        problems = []
        with lock:
            known = versions.setdefault(version, {"total": total, "paths": {}})
            if known["total"] != total:
                problems.append(f"version {version} answered total {total} and {known['total']}")
            for item in items:
                seen = known["paths"].setdefault(item["id"], item["path"])
                if seen != item["path"]:
                    problems.append(f"version {version}: id {item['id']} is {item['path']!r} and {seen!r}")
        return problems

    def load(worker: int) -> None:
        local = random.Random(ctx.seed * 31 + worker)
        last_version = ""
        while not stop.is_set():
            with lock:
                if counter["requests"] >= cap_requests:
                    return
                counter["requests"] += 1
            sent_v = None
            if local.random() < 0.7:
                row_id = local.randrange(max_id)
                target = f"/api/search?id={row_id}&k={local.choice([5, 10, 50])}"
                if last_version and local.random() < 0.5:
                    sent_v = last_version
                    target += f"&v={sent_v}"
                resp, kind = http(ctx.server.port, "GET", target), "id"
            else:
                row_id, target = None, "upload"
                resp, kind = upload(ctx.server.port, local.choice(blobs), (("k", local.choice([5, 10, 50])),)), "upload"
            problems = []
            data = resp.json() if resp.status in (200, 409) else None
            if resp.status == 200:
                problems = search_problems(data)
                if not problems:
                    items = list(data["results"])
                    if kind == "id":
                        items.append(data["query"])
                        if data["query"].get("id") != row_id:
                            problems.append(f"query id {data['query'].get('id')} for id {row_id}")
                        if sent_v and data["version"] != sent_v:
                            problems.append(f"asked with v={sent_v}, answered version {data['version']}")
                        if data["results"] and data["results"][0]["score"] < 0.9999:
                            problems.append(f"best score {data['results'][0]['score']} for a database image")
                    problems += record(data["version"], data["total"], items)
                    last_version = data["version"]
                with lock:
                    counter[f"200 {kind}"] += 1
            elif resp.status == 409 and sent_v and isinstance(data, dict) and data.get("version") != sent_v:
                last_version = data.get("version") or ""
                with lock:
                    counter["409 (older v)"] += 1
            else:
                problems = None  # judged as a failure below
            if problems is None or problems:
                with lock:
                    results.append((f"{kind} {target[:80]}", resp, problems))
            time.sleep(0.005)

    expected_sizes = []
    with watching_server(ctx, row) as server:
        first = http(server.port, "GET", "/healthz").json() or {}
        version_before = first.get("version")
        threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        index_peak = 0.0
        for run in range(runs):
            if time.monotonic() - started > cap_seconds:
                row.note("stopped at the time bound")
                break
            for path in aside.rglob("*"):  # bring back some of what was set aside before
                if path.is_file() and rng.random() < 0.5:
                    target = folder / path.relative_to(aside)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(path), target)
            current = list_images(folder)
            for rel in rng.sample(current, rng.randint(1, 3)):
                target = aside / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder / rel), target)
            for n in range(rng.randint(1, 3)):
                name, data = ctx.extra_images[(run * 3 + n) % len(ctx.extra_images)]
                (folder / "added").mkdir(exist_ok=True)
                (folder / "added" / f"r{run}-{name}").write_bytes(data)
            changed = rng.choice(list_images(folder))
            (folder / changed).write_bytes(ctx.extra_images[run % len(ctx.extra_images)][1])  # same name, new content
            expected = len(list_images(folder))
            expected_sizes.append(expected)
            ran = run_script(ctx, "index.py", "--database", folder, "--index", ctx.served_index, "--backbone", BACKBONE,
                             "--quiet", timeout=INDEX_TIMEOUT)
            index_peak = max(index_peak, ran.maxrss_mb)
            row.tried += 1
            if judge_program(row, ran, label=f"index run {run + 1}") and ran.rc != 0:
                row.fail(f"index run {run + 1}: {ran.brief()}")
            seen = None
            until = time.monotonic() + 15
            while time.monotonic() < until:
                health = http(server.port, "GET", "/healthz", timeout=10).json() or {}
                if health.get("size") == expected and health.get("version") != version_before:
                    seen = health
                    break
                time.sleep(0.2)
            if seen is None:
                row.fail(f"after index run {run + 1} the server did not serve {expected} images within 15 s")
            else:
                version_before = seen["version"]
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=HANG_S + 10)
        if any(thread.is_alive() for thread in threads):
            row.fail("a load thread did not finish", "hangs")
        load_seconds = time.monotonic() - started
    tally = StatusTally()
    for label, resp, problems in results:
        tally.add(resp)
        if problems:  # one bad answer is one failed check, however many things are wrong with it
            row.fail(f"{label}: " + "; ".join(problems[:4]))
        elif resp.hang:
            row.fail(f"{label}: {resp.error}", "hangs")
        elif resp.status is None:
            row.fail(f"{label}: {resp.error}")
        elif resp.status >= 500:
            row.fail(f"{label}: HTTP {resp.status} {clip(resp.body, 300)}", "http_5xx")
        else:
            row.fail(f"{label}: HTTP {resp.status} {clip(resp.body, 300)}")
    row.tried += counter["requests"]
    row.peak(index_peak)
    if counter["requests"] >= cap_requests:
        row.note(f"the load stopped at its cap of {cap_requests} requests")
    if len(versions) < len(expected_sizes) + 1:
        row.note(f"only {len(versions)} of {len(expected_sizes) + 1} versions were answered under load")
    row.note(f"{counter['requests']} requests from 4 threads in {load_seconds:.0f} s while index.py ran {len(expected_sizes)} "
             f"times (sizes {ctx.size} -> {' -> '.join(map(str, expected_sizes))}); {len(versions)} versions answered; "
             + ", ".join(f"{k}: {v}" for k, v in sorted(counter.items()) if k != "requests")
             + f"; peak RSS includes index.py ({index_peak:.0f} MB)")


def scenario_idle_flood(ctx, row: Row) -> None:
    count = 120 if ctx.quick else 200
    with watching_server(ctx, row) as server:
        idle, refused = [], 0
        try:
            for i in range(count):
                try:
                    connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                except OSError as exc:
                    refused += 1
                    if refused == 1:
                        row.fail(f"idle connection {i} refused: {exc}")
                    continue
                if i % 4 == 3:  # a request that never ends its headers
                    with contextlib.suppress(OSError):
                        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                idle.append(connection)
            row.tried += count
            for label, target in (("/healthz", "/healthz"), ("search by id", "/api/search?id=0&k=5")):
                resp = http(server.port, "GET", target, timeout=HANG_S)
                row.tried += 1
                if resp.hang:
                    row.fail(f"{label} with {len(idle)} idle connections open: {resp.error}", "hangs")
                elif resp.status != 200:
                    row.fail(f"{label} with {len(idle)} idle connections open: {resp.status} {resp.error or clip(resp.body)}",
                             "http_5xx" if (resp.status or 0) >= 500 else "failed_checks")
                elif resp.seconds > 5:
                    row.fail(f"{label} took {resp.seconds:.1f} s with {len(idle)} idle connections open (limit 5 s)")
                row.note(f"{label} answered in {resp.seconds * 1000:.0f} ms with {len(idle)} idle connections open")
        finally:
            for connection in idle:
                connection.close()
        time.sleep(0.5)
        resp = http(server.port, "GET", "/healthz")
        row.tried += 1
        if resp.status != 200:
            row.fail(f"/healthz after closing the idle connections: {resp.status} {resp.error or clip(resp.body)}")


# ---- kill -9 during indexing


def file_signature(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def temporaries(folder: Path, name: str) -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]
    return []


def chunk_count(partial: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(1 for p in partial.iterdir() if p.name.startswith("chunk-") and p.name.endswith(".npz"))
    return 0


def read_index(path: Path) -> tuple[list[str], np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        return list(h5["paths"].asstr()[...]), np.asarray(h5["vectors"][...], dtype=np.float32)


def check_snapshot(ctx, snapshot: Path, label: str, ever: set[str]) -> list[tuple[str, str]]:
    """An index file as a kill left it: it must open with its paths unique and known, and query_online.py must answer."""
    problems = []
    try:
        paths, vectors = read_index(snapshot)
        if len(set(paths)) != len(paths):
            problems.append(("data_lost", f"{label}: the index holds {len(paths) - len(set(paths))} duplicate paths"))
        unknown = set(paths) - ever
        if unknown:
            problems.append(("data_lost", f"{label}: the index holds paths never in the folder: {sorted(unknown)[:3]}"))
        if len(vectors) != len(paths) or not np.isfinite(vectors).all():
            problems.append(("data_lost", f"{label}: {len(vectors)} vectors for {len(paths)} paths or non-finite vectors"))
    except Exception as exc:
        problems.append(("data_lost", f"{label}: the index left by the kill does not open with h5py: {exc}"))
    ran = run_script(ctx, "query_online.py", "--query", QUERY_IMAGE, "--index", snapshot, "--json", timeout=READ_TIMEOUT)
    scratch = Row(0, "")
    judge_program(scratch, ran, label=label)
    for failure in scratch.failures:
        kind = failure[1:failure.index("]")]
        problems.append((kind, failure.split("] ", 1)[1]))
    if not scratch.failures:
        try:
            answer = json.loads(ran.stdout) if ran.rc == 0 else None
            scores = [hit["score"] for hit in answer["results"]]
            if not scores or not all(math.isfinite(s) for s in scores):
                raise ValueError(f"scores {scores[:5]}")
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(("data_lost", f"{label}: the index left by the kill cannot be queried: {ran.brief()} {exc}"))
    return problems, ran.maxrss_mb


def scenario_kill_loop(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 5)
    modes = ["extract", "commit", "timed"] if ctx.quick else \
        ["timed", "extract", "commit", "timed", "after-commit", "extract", "commit", "timed", "commit", "extract"]
    base = ctx.work / "kill"
    folder, aside, index_dir = base / "images", base / "aside", base / "index"
    shutil.copytree(ctx.pristine, folder)
    aside.mkdir(parents=True)
    index_dir.mkdir()
    index = index_dir / "index.h5"
    partial = Path(f"{index}.partial")
    originals = list_images(folder)
    ever = set(originals) | {f"extra/{name}" for name, _ in ctx.extra_images}
    flags = ("--backbone", BACKBONE, "--quiet", "--checkpoint-every", "4", "--batch-size", "4")
    committed = False
    phases = collections.Counter()
    checks, pending = ThreadPoolExecutor(1), []
    deadline = time.monotonic() + (100 if ctx.quick else 300)
    peak = 0.0
    try:
        for cycle, mode in enumerate(modes):
            if time.monotonic() > deadline:
                row.note(f"stopped at the time bound after {cycle} kills")
                break
            if committed:  # give the next run work: images set aside, touched, extras toggled
                for path in sorted(aside.rglob("*")):
                    if path.is_file():
                        shutil.move(str(path), folder / path.relative_to(aside))
                present = list_images(folder)
                for rel in rng.sample([p for p in present if not p.startswith("extra/")], rng.randint(1, 3)):
                    (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(folder / rel), aside / rel)
                now = time.time_ns()
                for n, rel in enumerate(rng.sample([p for p in list_images(folder) if not p.startswith("extra/")],
                                                   rng.randint(6, 14))):
                    os.utime(folder / rel, ns=(now, now + n * 1000 + cycle))
                (folder / "extra").mkdir(exist_ok=True)
                for name, data in rng.sample(ctx.extra_images, 2):
                    target = folder / "extra" / name
                    if target.exists():
                        target.unlink()
                    else:
                        target.write_bytes(data)
            before = file_signature(index)
            chunks_before = chunk_count(partial)
            delay = rng.uniform(0.3, max(1.0, ctx.t0))
            need_chunks = chunks_before + rng.randint(1, 3)
            proc = Proc("index.py", ["--database", folder, "--index", index, *flags], ctx.env, INDEX_TIMEOUT)
            phase = None
            while not proc.poll() and time.monotonic() < proc.deadline:
                elapsed = time.monotonic() - proc.started
                fire = (mode == "timed" and elapsed >= delay) or \
                       (mode == "extract" and chunk_count(partial) >= need_chunks) or \
                       (mode == "commit" and temporaries(index_dir, index.name)) or \
                       (mode == "after-commit" and file_signature(index) not in (before, None))
                if fire:
                    if temporaries(index_dir, index.name):
                        phase = "while writing the new index file"
                    elif file_signature(index) != before:
                        phase = "after the new index was renamed in"
                    elif chunk_count(partial) > chunks_before:
                        phase = f"during extraction ({chunk_count(partial) - chunks_before} new checkpoints)"
                    else:
                        phase = f"before the first checkpoint ({elapsed:.1f} s in)"
                    proc.kill()
                    break
                time.sleep(0.002)
            ran = proc.wait()
            peak = max(peak, ran.maxrss_mb)
            row.tried += 1
            label = f"kill {cycle + 1} ({mode})"
            if phase is None:
                phases["the run finished before the kill"] += 1
                if judge_program(row, ran, label=label) and ran.rc != 0:
                    row.fail(f"{label}: {ran.brief()}")
            else:
                phases[phase.split(" (")[0]] += 1
                if ran.rc != -signal.SIGKILL:
                    judge_program(row, ran, label=label)
                    row.note(f"{label}: exit {ran.rc} instead of SIGKILL")
            if file_signature(index) is None:
                if committed:
                    row.fail(f"{label} ({phase}): the index file is gone after the kill", "data_lost")
            else:
                committed = True
                snapshot = base / f"after-kill-{cycle + 1}.h5"
                shutil.copyfile(index, snapshot)
                pending.append(checks.submit(check_snapshot, ctx, snapshot, f"{label} {phase or 'finished'}", ever))
        for path in sorted(aside.rglob("*")):  # the folder as it was: every original image, no extras
            if path.is_file():
                shutil.move(str(path), folder / path.relative_to(aside))
        shutil.rmtree(folder / "extra", ignore_errors=True)
        ran = run_script(ctx, "index.py", "--database", folder, "--index", index, *flags, timeout=INDEX_TIMEOUT)
        peak = max(peak, ran.maxrss_mb)
        row.tried += 1
        if judge_program(row, ran, label="final run") and ran.rc != 0:
            row.fail(f"final run: {ran.brief()}", "data_lost")
    finally:
        for future in pending:
            problems, rss = future.result()
            peak = max(peak, rss)
            for kind, message in problems:
                row.fail(message, kind)
        checks.shutdown()
    clean_paths, clean_vectors = read_index(ctx.clean_index)
    clean = dict(zip(clean_paths, clean_vectors))
    try:
        paths, vectors = read_index(index)
    except Exception as exc:
        row.fail(f"the final index does not open: {exc}", "data_lost", len(clean))
        return
    duplicates = len(paths) - len(set(paths))
    missing = sorted(set(clean) - set(paths))
    extra = sorted(set(paths) - set(clean))
    wrong, lowest = [], 1.0
    for rel, vector in zip(paths, vectors):
        if rel in clean:
            reference = clean[rel]
            cosine = float(vector @ reference / (np.linalg.norm(vector) * np.linalg.norm(reference)))
            lowest = min(lowest, cosine)
            if not cosine > 0.9999:
                wrong.append(f"{rel} (cosine {cosine:.6f})")
    for what, items in (("missing", missing), ("held twice", [f"{duplicates} rows"] if duplicates else []),
                        ("never in the folder", extra), ("with other vectors than a clean build", wrong)):
        if items:
            row.fail(f"final index: {len(items)} images {what}: {items[:5]}", "data_lost", len(items) if what != "held twice" else duplicates)
    leftovers = [p.relative_to(index_dir).as_posix() for p in index_dir.rglob("*.tmp")]
    if leftovers:
        row.fail(f"temporary files left after the final run: {leftovers[:5]}", count=len(leftovers))
    if partial.exists():
        row.fail(f"{partial.name}/ left after the final run")
    row.peak(peak)
    row.note(f"{len(paths)} images in the final index, lowest cosine to a clean build {lowest:.6f}; kills landed: "
             + ", ".join(f"{name} {n}" for name, n in phases.items()) + f"; {len(leftovers)} temporary files left")


# ---- corrupted index files


def corruptions(data: bytes, rng: random.Random, count: int, protected: list[tuple[int, int]]) -> list[tuple[str, bytes]]:
    """Seeded damaged copies of an index file: overwritten ranges, truncations, a zeroed superblock, bit flips."""
    size = len(data)
    outside = [(a, b) for a, b in gaps(protected, size) if b - a >= 16]

    def offset(where: str, length: int) -> int:
        if where == "metadata" and outside:
            a, b = rng.choice(outside)
            return rng.randrange(a, max(a + 1, b - min(length, b - a) + 1))
        if where == "head":
            return rng.randrange(0, min(size, 8192))
        return rng.randrange(0, size)

    fixed = [
        ("superblock zeroed (96 B)", b"\0" * 96 + data[96:]),
        ("signature zeroed (8 B)", b"\0" * 8 + data[8:]),
        ("superblock after the signature zeroed", data[:8] + b"\0" * 88 + data[96:]),
        ("empty file", b""),
        ("truncated to 1 B", data[:1]),
        ("truncated to 100 B", data[:100]),
        ("truncated to half", data[: size // 2]),
        ("1 B cut off the end", data[:-1]),
        ("64 kB of garbage appended", data + rng.randbytes(65536)),
        ("file of random bytes, same size", rng.randbytes(size)),
    ]
    out = list(fixed[: max(3, count // 4)])
    kinds = ["random", "zero", "ff", "bitflip", "truncate", "blockswap"]
    n = 0
    while len(out) < count:
        kind, where = kinds[n % len(kinds)], ["metadata", "head", "anywhere"][(n // len(kinds)) % 3]
        n += 1
        damaged = bytearray(data)
        if kind == "truncate":
            cut = rng.randrange(1, size)
            out.append((f"truncated at {cut} B", bytes(damaged[:cut])))
            continue
        if kind == "bitflip":
            flips = rng.choice([1, 1, 16])
            for _ in range(flips):
                at = offset(where, 1)
                damaged[at] ^= 1 << rng.randrange(8)
            out.append((f"{flips} bit(s) flipped ({where})", bytes(damaged)))
            continue
        length = rng.randint(16, 4096)
        at = offset(where, length)
        length = min(length, size - at)
        if kind == "blockswap":
            other = rng.randrange(0, size - length)
            damaged[at:at + length], damaged[other:other + length] = data[other:other + length], data[at:at + length]
            out.append((f"{length} B at {at} swapped with {other} ({where})", bytes(damaged)))
            continue
        fill = {"random": rng.randbytes(length), "zero": b"\0" * length, "ff": b"\xff" * length}[kind]
        damaged[at:at + length] = fill
        out.append((f"{length} B of {kind} at offset {at} ({where})", bytes(damaged)))
    return out[:count]


def gaps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out, position = [], 0
    for start, end in sorted(ranges):
        if start > position:
            out.append((position, start))
        position = max(position, end)
    if position < size:
        out.append((position, size))
    return out


def chunk_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the vectors' chunks (where checksummed bulk data lies; the rest is metadata)."""
    import h5py

    ranges = []
    with contextlib.suppress(Exception), h5py.File(path, "r") as h5:
        dataset = h5["vectors"]
        for i in range(dataset.id.get_num_chunks()):
            info = dataset.id.get_chunk_info(i)
            ranges.append((info.byte_offset, info.byte_offset + info.size))
    return ranges


def numbers_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(numbers_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(numbers_finite(v) for v in value)
    return True


def metric_numbers(value, prefix=""):
    """The metrics of an evaluate.py --json file, without timings and paths: what must not change."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("seconds", "elapsed", "index", "created", "time", "took_s", "software", "timing"):
                yield from metric_numbers(item, f"{prefix}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from metric_numbers(item, f"{prefix}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)


def scenario_corruption(ctx, row: Row) -> None:
    rng = random.Random(ctx.seed + 7)
    count = 10 if ctx.quick else 44
    folder = ctx.work / "corrupt"
    folder.mkdir()
    data = ctx.clean_index.read_bytes()
    intact = folder / "intact.h5"
    intact.write_bytes(data)
    reference_query = run_script(ctx, "query_online.py", "--query", QUERY_IMAGE, "--index", intact, "--json", timeout=READ_TIMEOUT)
    reference_eval = run_script(ctx, "evaluate.py", "--index", intact, "--ground-truth", "folders", "--json",
                                folder / "intact.json", timeout=READ_TIMEOUT)
    if reference_query.rc != 0 or reference_eval.rc != 0:
        raise RuntimeError(f"the intact index does not answer: {reference_query.brief()} {reference_eval.brief()}")
    want_hits = [(hit["id"], hit["path"], hit["score"]) for hit in json.loads(reference_query.stdout)["results"]]
    want_metrics = dict(metric_numbers(json.loads((folder / "intact.json").read_text())))
    damaged = corruptions(data, rng, count, chunk_ranges(intact))
    outcome = collections.Counter()
    peak = 0.0
    deadline = time.monotonic() + (100 if ctx.quick else 360)

    def one(n: int, name: str, content: bytes):
        path = folder / f"damaged-{n:03d}.h5"
        path.write_bytes(content)
        query = run_script(ctx, "query_online.py", "--query", QUERY_IMAGE, "--index", path, "--json", timeout=READ_TIMEOUT)
        report = folder / f"damaged-{n:03d}.json"
        evaluation = run_script(ctx, "evaluate.py", "--index", path, "--ground-truth", "folders", "--json", report,
                                timeout=READ_TIMEOUT)
        metrics = None
        if evaluation.rc == 0:
            with contextlib.suppress(OSError, ValueError):
                metrics = json.loads(report.read_text())
        return n, name, query, evaluation, metrics

    with ThreadPoolExecutor(2) as pool:
        futures = []
        for n, (name, content) in enumerate(damaged):
            futures.append(pool.submit(lambda n=n, name=name, content=content:
                                       one(n, name, content) if time.monotonic() < deadline else None))
        for future in futures:
            done = future.result()
            if done is None:
                outcome["not run (time bound)"] += 1
                continue
            n, name, query, evaluation, metrics = done
            for program, ran in (("query_online.py", query), ("evaluate.py", evaluation)):
                row.tried += 1
                peak = max(peak, ran.maxrss_mb)
                label = f"{program} on copy {n} ({name})"
                if not judge_program(row, ran, label=label):
                    outcome[f"{program}: hang/crash/traceback"] += 1
                    continue
                if ran.rc == 1:
                    if len(ran.error_lines) == 1:
                        outcome[f"{program}: one error line"] += 1
                    else:
                        row.fail(f"{label}: exit 1 with {len(ran.error_lines)} error: lines: {clip(ran.stderr, 500)}")
                    continue
                if ran.rc != 0:
                    row.fail(f"{label}: {ran.brief()}")
                    continue
                if program == "query_online.py":
                    try:
                        hits = [(hit["id"], hit["path"], hit["score"]) for hit in json.loads(ran.stdout)["results"]]
                    except (ValueError, KeyError, TypeError) as exc:
                        row.fail(f"{label}: exit 0 without valid JSON ({exc}): {clip(ran.stdout, 300)}")
                        continue
                    if not all(isinstance(h[2], (int, float)) and math.isfinite(h[2]) for h in hits):
                        row.fail(f"{label}: exit 0 with non-finite scores {[h[2] for h in hits][:5]}", "data_lost")
                    elif [h[:2] for h in hits] != [h[:2] for h in want_hits] or \
                            max(abs(a[2] - b[2]) for a, b in zip(hits, want_hits)) > 1e-6:
                        row.fail(f"{label}: exit 0 with other results than the intact index: {hits[:3]} vs {want_hits[:3]}",
                                 "data_lost")
                    else:
                        outcome[f"{program}: exit 0, same answer"] += 1
                else:
                    if metrics is None or not numbers_finite(metrics):
                        row.fail(f"{label}: exit 0 without a valid, finite --json report", "data_lost")
                        continue
                    got = dict(metric_numbers(metrics))
                    differ = [key for key, value in want_metrics.items() if key in got and abs(got[key] - value) > 1e-9]
                    if differ:
                        row.fail(f"{label}: exit 0 with other metrics than the intact index: {differ[:3]}", "data_lost")
                    else:
                        outcome[f"{program}: exit 0, same answer"] += 1
    row.peak(peak)
    row.note(f"{len(damaged)} damaged copies: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))


# ---- full disk


def scenario_disk_full(ctx, row: Row) -> None:
    if os.geteuid() != 0:
        row.skipped = "not root: mounting a tmpfs needs root"
        return
    mount_point = ctx.work / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True,
                             text=True, timeout=30)
    if mounted.returncode != 0:
        row.skipped = f"cannot mount a tmpfs here: {clip(mounted.stderr or mounted.stdout, 200) or 'mount failed'}"
        return
    ctx.mounts.append(mount_point)
    rng = random.Random(ctx.seed + 8)
    folder = ctx.work / "diskfull-images"
    shutil.copytree(ctx.pristine, folder)
    (folder / "extra").mkdir()
    for name, data in ctx.extra_images:
        (folder / "extra" / name).write_bytes(data)
    leaves = [rng.randint(50, 300)] if ctx.quick else [60, 250, rng.randint(50, 300)]
    data = ctx.clean_index.read_bytes()
    peak = 0.0
    for leave_kb in leaves:
        for path in list(mount_point.iterdir()):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        index = mount_point / "demo.h5"
        index.write_bytes(data)
        filler = mount_point / "filler"
        free = shutil.disk_usage(mount_point).free
        with open(filler, "wb") as out:
            out.write(b"\0" * max(0, free - leave_kb * 1024))
        ran = run_script(ctx, "index.py", "--database", folder, "--index", index, "--backbone", BACKBONE, "--quiet",
                         "--checkpoint-every", "8", timeout=INDEX_TIMEOUT)
        peak = max(peak, ran.maxrss_mb)
        row.tried += 1
        label = f"{leave_kb} kB free"
        if judge_program(row, ran, label=label):
            if ran.rc != 1 or len(ran.error_lines) != 1 or "space" not in ran.error_lines[0]:
                row.fail(f"{label}: expected exit 1 and one 'error: ... space' line: {ran.brief()}")
            else:
                row.note(f"{label}: {clip(ran.error_lines[0], 160)}")
        if index.read_bytes() != data:
            row.fail(f"{label}: the previous index changed", "data_lost")
        left = [p.relative_to(mount_point).as_posix() for p in mount_point.rglob("*.tmp")]
        if left:
            row.fail(f"{label}: temporary files left: {left[:5]}", count=len(left))
    row.peak(peak)


# ------------------------------------------------------------------------------------------------ the run


SCENARIOS = [
    (1, "hostile uploads", scenario_hostile_uploads, True),
    (2, "odd routes", scenario_odd_routes, True),
    (3, "concurrency", scenario_concurrency, True),
    (4, "hot reload under load", scenario_hot_reload, True),
    (6, "idle-connection flood", scenario_idle_flood, True),
    (5, "kill -9 loop during indexing", scenario_kill_loop, False),
    (7, "corrupted index files", scenario_corruption, False),
    (8, "disk full", scenario_disk_full, False),
]


class Context:
    def __init__(self, args):
        self.quick = args.quick
        self.seed = args.seed
        self.work = Path(tempfile.mkdtemp(prefix="cbir-faults-"))
        keras_home = self.work / "keras-home"
        keras_home.mkdir()
        self.env = dict(os.environ, RETRIEVAL_OFFLINE="1", KERAS_HOME=str(keras_home), TF_CPP_MIN_LOG_LEVEL="2",
                        PYTHONUNBUFFERED="1")
        self.mounts: list[Path] = []
        self.server: Server | None = None

    def setup(self) -> None:
        self.pristine = self.work / "pristine"
        for group in sorted(DEMO.iterdir()):
            if group.is_dir():
                shutil.copytree(group, self.pristine / group.name)
        self.images = self.work / "images"
        shutil.copytree(self.pristine, self.images)
        self.size = len(list_images(self.images))
        self.canary_token = "canary-" + hashlib.sha256(str(self.seed).encode()).hexdigest()[:24]
        self.canary = self.work / "canary.txt"
        self.canary.write_text(self.canary_token)
        Image = pil()
        from PIL import ImageOps

        self.extra_images = []
        for n, group in enumerate(sorted(p.name for p in self.pristine.iterdir())[:6]):
            picture = photo(f"{group}/original.jpg", (320, 240))
            picture = ImageOps.mirror(picture) if n % 2 else picture.rotate(90, expand=True)
            self.extra_images.append((f"{group}-variant.jpg", encoded(picture, "JPEG", quality=88)))
        self.upload_blobs = [encoded(photo(name, (200, 150)), "JPEG", quality=90)
                             for name in ("coffee/view-01.jpg", "chelsea/original.jpg", "rocket/view-02.jpg", "clock/original.jpg")]
        del Image
        clean_dir = self.work / "clean"
        clean_dir.mkdir()
        self.clean_index = clean_dir / "clean.h5"
        ran = run_script(self, "index.py", "--database", self.images, "--index", self.clean_index, "--backbone", BACKBONE,
                         "--quiet", "--checkpoint-every", "4", "--batch-size", "4", timeout=INDEX_TIMEOUT)
        if ran.rc != 0:
            raise RuntimeError(f"the clean build failed: {ran.brief()}")
        self.t0 = ran.seconds
        self.clean_rss = ran.maxrss_mb
        served = self.work / "served"
        served.mkdir()
        self.served_index = served / "served.h5"
        shutil.copyfile(self.clean_index, self.served_index)
        self.server = Server(self, self.served_index)
        self.server.start()

    def close(self, keep: bool) -> None:
        if self.server is not None:
            self.server.stop()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "# Fault and soak run (`bench/faults.py`)",
        "",
        f"{meta['mode']} run, seed {meta['seed']}, {meta['date']}, {meta['machine']}; {meta['seconds']:.0f} s in all. "
        f"Setup: clean build of {meta['images']} images in {meta['clean_build_s']:.1f} s.",
        "",
        "| scenario | inputs tried | 5xx | hangs | tracebacks | crashes (signals) | data lost | failed checks | peak RSS MB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.number}. {row.scenario} | 0 | | | | | | | | skipped: {row.skipped} |")
            continue
        rss = f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else ""
        notes = "; ".join(row.notes).replace("|", "\\|")
        lines.append(f"| {row.number}. {row.scenario} | {row.tried} | {row.http_5xx} | {row.hangs} | {row.tracebacks} | "
                     f"{row.crashes} | {row.data_lost} | {row.failed_checks} | {rss} | {row.seconds:.0f} s; {notes} |")
    bad = [row for row in rows if row.failures]
    if bad:
        lines += ["", "## Failures", ""]
        for row in bad:
            lines.append(f"### {row.number}. {row.scenario}")
            lines += [f"- {failure}" for failure in row.failures]
            lines.append("")
    lines += ["", "Peak RSS: the server's VmHWM (reset at the start of each server scenario) or, for the scripts, the "
              "largest ru_maxrss of the programs run. A hang is an HTTP request over 30 s or a program over its timeout."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bounded fault and soak run against index.py, query_online.py, "
                                                 "evaluate.py and server.py (loopback only).")
    parser.add_argument("--quick", action="store_true", help="every count shrunk: about 90 s")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for faults.md and faults.json (default: {OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of every random choice (default: {SEED})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder (its path is printed)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    ctx = Context(args)
    rows = [Row(number, name) for number, name, _, _ in SCENARIOS]
    by_number = {row.number: row for row in rows}
    meta = {"mode": "quick" if args.quick else "full", "seed": args.seed,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    try:
        print(f"work folder {ctx.work}", file=sys.stderr)
        ctx.setup()
        meta.update(images=ctx.size, clean_build_s=round(ctx.t0, 1))
        for number, name, function, needs_server in SCENARIOS:
            row = by_number[number]
            if not needs_server and ctx.server is not None:
                ctx.server.stop()
                ctx.server = None
            print(f"[{time.monotonic() - started:5.0f} s] {number}. {name} ...", file=sys.stderr, flush=True)
            begun = time.monotonic()
            try:
                function(ctx, row)
            except Exception as exc:  # the run itself broke: a failed check, with its traceback on stderr
                traceback.print_exc()
                row.fail(f"the scenario stopped: {type(exc).__name__}: {clip(str(exc), 500)}")
            row.seconds = time.monotonic() - begun
            print(f"         {row.tried} tried, {row.bad} bad, {row.seconds:.0f} s", file=sys.stderr, flush=True)
    except Exception as exc:
        traceback.print_exc()
        rows[0].fail(f"setup failed: {type(exc).__name__}: {clip(str(exc), 800)}")
    finally:
        ctx.close(args.keep)
    rows.sort(key=lambda row: row.number)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta.setdefault("images", 0)
    meta.setdefault("clean_build_s", 0.0)
    text = markdown(rows, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text(text, "utf-8")
    total_bad = sum(row.bad for row in rows)
    report = {**meta, "bad": total_bad, "bad_keys": list(BAD_KEYS),
              "rows": [{**dataclasses.asdict(row), "bad": row.bad} for row in rows]}
    (args.out / "faults.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(text)
    print(f"wrote {args.out / 'faults.md'} and {args.out / 'faults.json'}", file=sys.stderr)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
