"""Run a real Milvus standalone server (PyPI ``milvus==2.3.5``, installed in its own venv) for tests: stdlib only.

``milvus-server`` (that package's command) is a Python wrapper: it writes ``DATA/configs/milvus.yaml``, extracts the
Milvus binaries (246 MB) into ``DATA/bin`` and starts the child ``DATA/bin/milvus run standalone``. What this module
takes care of:

- Every port is chosen free here and passed exactly: the nine gRPC ports (``--proxy-port`` ... ``--data-node-port``),
  the embedded etcd's client and peer ports (``--etcd-port`` does NOT move the embedded etcd, which always listens on
  127.0.0.1:2379 and 2380 unless ``ETCD_CONFIG_PATH`` names an etcd config file; a second server then panics), and the
  metrics/health port (no flag: the wrapper sets ``METRICS_PORT`` itself, scanning upward from 9091). The wrapper is
  therefore run through its venv's Python with a few lines that set the metrics port and make every port exact (the
  plain command silently moves a port that is taken to the next free one).
- The server gets its own process group; ``stop`` sends ONE SIGTERM to the group (the wrapper has no SIGTERM handler
  and dies at once, orphaning the child if only it is signalled; the child stays in the group and shuts down in
  1-3 s; Milvus resets its handler after the first signal, so a second SIGTERM kills it mid-shutdown), waits, falls
  back to SIGKILL of the group and each member, and checks that no member is left. The wrapper never exits when the
  child crashes, so readiness and liveness watch the child.
- Two settings through environment variables (Milvus reads any variable whose name, lowercased without ``_`` and
  ``.``, is a config key): ``QUERYNODE_GRACEFULSTOPTIMEOUT`` (default 30 s: with a loaded collection the query node
  waits that long at SIGTERM for a node that never comes) and ``COMMON_SESSION_TTL`` (default 30 s: after a restart,
  Bounded searches block until the previous run's sessions expire, ~25 s; with 10 s, 0-6 s. A server frozen longer
  than the TTL exits when it resumes).
- Logs stay in ``DATA/logs`` (``milvus-server.log`` = the wrapper's output; ``milvus-stdout.log`` /
  ``milvus-stderr.log`` = the server's, kept as ``*.prev.log`` across a restart). The only files Milvus writes outside
  ``DATA`` are ``/run/milvus/standalone.pid`` (removed at a clean stop) and ``/tmp/milvus/server_id_<pid>``, which
  ``stop`` removes for its own child.

Linux only (process groups are found through /proc).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["MilvusServer", "find_server_executable"]

# the wrapper's port settings (each an argument --x-y-port of milvus-server), in the order of its config template
WRAPPER_PORTS = (
    "etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port", "query_node_port",
    "index_coord_port", "index_node_port", "data_coord_port", "data_node_port",
)
# run inside the server venv's Python: exact ports (a taken port fails instead of moving) and the metrics port
_LAUNCHER = """\
import json, socket, sys
import milvus

def try_bind_port(self, port):  # as the wrapper's, but with SO_REUSEADDR: a port in TIME_WAIT is free for Milvus too
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None

milvus.MilvusServerConfig.try_bind_port = try_bind_port
settings = json.loads(sys.argv[1])
for name, port in settings.items():
    probe = try_bind_port(None, port)
    if probe is None:
        sys.exit(f"port {port} ({name}) is taken")
    probe.close()
milvus.default_server.webservice_port = settings.pop("metrics_port")
milvus.default_server.config.update(**settings)
sys.argv = ["milvus-server"] + sys.argv[2:]
milvus.main()
"""
_ETCD_CONFIG = """\
name: default
listen-client-urls: http://127.0.0.1:{client}
advertise-client-urls: http://127.0.0.1:{client}
listen-peer-urls: http://127.0.0.1:{peer}
initial-advertise-peer-urls: http://127.0.0.1:{peer}
initial-cluster: default=http://127.0.0.1:{peer}
"""


def find_server_executable() -> str | None:
    """``milvus-server`` of the venv named by ``MILVUS_SERVER_VENV``, else the one on PATH, else None.
    FileNotFoundError when MILVUS_SERVER_VENV is set but holds no milvus-server (a misconfigured CI should fail loudly)."""
    venv = os.environ.get("MILVUS_SERVER_VENV")
    if venv:
        for candidate in (Path(venv) / "bin" / "milvus-server", Path(venv) / "Scripts" / "milvus-server.exe"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise FileNotFoundError(f"MILVUS_SERVER_VENV={venv}: no milvus-server there (pip install milvus==2.3.5 into it)")
    return shutil.which("milvus-server")


def _interpreter(executable: str) -> str | None:
    """The Python of a pip console script (its absolute #! line), or None."""
    try:
        with open(executable, "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if first.startswith("#!"):
        parts = first[2:].split()
        if parts and os.path.isabs(parts[0]) and "python" in os.path.basename(parts[0]) and os.access(parts[0], os.X_OK):
            return parts[0]
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on all interfaces (most Milvus ports listen on all of them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("0.0.0.0", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 200_000))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line[:400] for line in text.splitlines()[-lines:])


class MilvusServer:
    """One Milvus standalone server with its data, config and logs in ``data_dir``.

    >>> with MilvusServer(find_server_executable(), tmp_path / "milvus") as server:
    ...     client = MilvusClient(uri=server.uri, timeout=10)

    ``bin_cache`` (optional): a folder shared by several data dirs for the 246 MB of extracted binaries
    (``data_dir/bin`` becomes a link to it), so that each new data dir does not extract them again (~5 s).
    ``env``: extra environment variables for the server (Milvus config overrides, see the module docstring).
    ``graceful_stop_s``, ``session_ttl_s``: see the module docstring.
    """

    def __init__(self, executable: str, data_dir: Path, *, host: str = "127.0.0.1", bin_cache: Path | None = None,
                 env: dict[str, str] | None = None, graceful_stop_s: int = 3, session_ttl_s: int = 10):
        if not executable or not os.path.isfile(executable):
            raise FileNotFoundError(f"no milvus-server executable at {executable!r} (see find_server_executable)")
        self.executable = str(executable)
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.bin_cache = Path(bin_cache).resolve() if bin_cache is not None else None
        self.extra_env = dict(env or {})
        self.graceful_stop_s = int(graceful_stop_s)
        self.session_ttl_s = int(session_ttl_s)
        self.ports: dict[str, int] = {}  # chosen at the first start, kept by restart
        self.child_pid: int | None = None  # the `milvus run standalone` process
        self.start_seconds: float | None = None  # launch -> first answered call, of the last start
        self._proc: subprocess.Popen | None = None
        self._log = None

    # ---------------------------------------------------------------------------------------------------- public

    @property
    def uri(self) -> str:
        if "proxy_port" not in self.ports:
            raise RuntimeError("the Milvus server has not been started")
        return f"http://{self.host}:{self.ports['proxy_port']}"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def running(self) -> bool:
        return self._proc is not None and bool(_group_members(self._proc.pid))

    def start(self, timeout: float = 120) -> None:
        """Start and wait (at most ``timeout`` s) until the proxy accepts TCP and answers a REST call.
        RuntimeError with the log tail when it does not (what was started is stopped first)."""
        if self._proc is not None:
            raise RuntimeError(f"the Milvus server in {self.data_dir} is already started")
        if not self.ports:
            names = WRAPPER_PORTS + ("etcd_peer_port", "metrics_port")
            self.ports = dict(zip(names, _free_ports(len(names))))
        self._prepare_dir()
        command, env = self._command()
        self._log = open(self.logs_dir / "milvus-server.log", "ab")
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {command[:1] + command[3:]}\n".encode())
        self._log.flush()
        started = time.monotonic()
        lock = self._lock_bin_cache()
        try:
            self._proc = subprocess.Popen(
                command, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
            atexit.register(self._stop_at_exit)
            self._wait_ready(started + timeout, lock)
        except BaseException as exc:
            if lock is not None:
                lock.close()
            reason = str(exc)
            with contextlib.suppress(Exception):
                self.stop(timeout=15)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise RuntimeError(f"Milvus server in {self.data_dir} did not start: {reason}\n{self.log_tail()}") from None
        self.start_seconds = time.monotonic() - started

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the process group once, wait up to ``timeout`` s, SIGKILL the group and each member left, and
        check that nothing is left (RuntimeError otherwise). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self._stop_at_exit)
        pgid = proc.pid  # start_new_session: the wrapper leads its own group; the child stays in it
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            members = _group_members(pgid)
            if not members:
                break
            # ONE SIGTERM per process: Milvus handles the first and resets its handler, so a second SIGTERM kills it
            # at once, mid-shutdown. The child stays in the wrapper's group (even once orphaned): killpg reaches it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            if sig == signal.SIGKILL:
                for pid in members:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _group_members(pgid) and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)  # reap the wrapper (else it stays a zombie)
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.child_pid is not None:  # the server's only files outside data_dir
            for folder in ("/tmp/milvus", "/run/milvus"):
                with contextlib.suppress(OSError):
                    os.remove(f"{folder}/server_id_{self.child_pid}")
        left = _group_members(pgid)
        if left:
            raise RuntimeError(f"Milvus server processes still running after SIGKILL: {left}")

    def restart(self, timeout: float = 120) -> None:
        """Stop and start again: same data dir, same ports (RuntimeError if one was taken meanwhile)."""
        self.stop()
        self.start(timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("milvus-server.log", "milvus-stderr.log", "milvus-stdout.log"):
            text = _tail(self.logs_dir / name, lines)
            if text:
                parts.append(f"--- {self.logs_dir / name} (last {lines} lines)\n{text}")
        return "\n".join(parts) or f"(no logs in {self.logs_dir})"

    def __enter__(self) -> "MilvusServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MilvusServer({self.data_dir}, uri={self.ports and self.uri}, running={self._proc is not None})"

    # --------------------------------------------------------------------------------------------------- private

    def _prepare_dir(self) -> None:
        (self.data_dir / "configs").mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for name in ("milvus-stdout", "milvus-stderr"):  # the wrapper truncates them: keep the previous run's
            log = self.logs_dir / f"{name}.log"
            if log.exists() and log.stat().st_size:
                log.replace(self.logs_dir / f"{name}.prev.log")
        if self.bin_cache is not None:
            self.bin_cache.mkdir(parents=True, exist_ok=True)
            link = self.data_dir / "bin"
            if not link.is_symlink() and not link.exists():
                link.symlink_to(self.bin_cache, target_is_directory=True)
        etcd = _ETCD_CONFIG.format(client=self.ports["etcd_port"], peer=self.ports["etcd_peer_port"])
        (self.data_dir / "configs" / "embed-etcd.yaml").write_text(etcd, encoding="utf-8")

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.update(self.extra_env)
        # Milvus reads any environment variable whose name, lowercased without '_' and '.', is a config key
        env["ETCD_CONFIG_PATH"] = str(self.data_dir / "configs" / "embed-etcd.yaml")
        # with a loaded collection the query node waits this long (default 30 s) at SIGTERM for another node to
        # take its segments over, which never comes in standalone
        env.setdefault("QUERYNODE_GRACEFULSTOPTIMEOUT", str(self.graceful_stop_s))
        # after a restart the previous run's sessions (not revoked at stop) block Bounded searches until their etcd
        # lease expires: ~25 s with the default 30 s TTL, ~0-6 s with 10 s
        env.setdefault("COMMON_SESSION_TTL", str(self.session_ttl_s))
        args = ["--data", str(self.data_dir)]
        for name in WRAPPER_PORTS:
            args += ["--" + name.replace("_", "-"), str(self.ports[name])]
        python = _interpreter(self.executable)
        if python is None:  # not a Python console script: the plain command (the metrics port then floats from 9091)
            return [self.executable] + args, env
        settings = {name: self.ports[name] for name in WRAPPER_PORTS}
        settings["metrics_port"] = self.ports["metrics_port"]
        return [python, "-c", _LAUNCHER, json.dumps(settings)] + args, env

    def _lock_bin_cache(self):
        """Hold a lock on the shared binaries while a wrapper may be extracting them (until its child runs)."""
        if self.bin_cache is None:
            return None
        import fcntl

        handle = open(self.bin_cache / ".extract.lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def _find_child(self) -> int | None:
        for pid in _group_members(self._proc.pid):
            if pid != self._proc.pid and "run standalone" in _cmdline(pid):
                return pid
        return None

    def _wait_ready(self, deadline: float, lock) -> None:
        self.child_pid = None
        proxy = self.ports["proxy_port"]
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"milvus-server exited with code {code}")
            if self.child_pid is None:
                self.child_pid = self._find_child()
                if self.child_pid is not None and lock is not None:
                    lock.close()  # the binaries are extracted before the child starts
                    lock = None
            elif not os.path.exists(f"/proc/{self.child_pid}") or self.child_pid not in _group_members(self._proc.pid):
                raise RuntimeError(f"the Milvus process {self.child_pid} died (the wrapper stays up regardless)")
            if self.child_pid is not None and self._answers(proxy):
                self._check_config_port(proxy)
                return
            if time.monotonic() >= deadline:
                raise TimeoutError("no answer on the proxy port within the timeout")
            time.sleep(0.25)

    def _answers(self, port: int) -> bool:
        """TCP accept, then a real call: the proxy's REST API (served on the gRPC port) lists collections."""
        try:
            with socket.create_connection((self.host, port), timeout=1.0):
                pass
        except OSError:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.host}:{port}/v1/vector/collections", timeout=3.0) as response:
                body = json.loads(response.read().decode("utf-8", "replace") or "{}")
            return body.get("code") == 200
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # REST disabled: fall back to the health endpoint
                return self._healthy()
            return False
        except (OSError, ValueError):
            return False

    def _healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports['metrics_port']}/healthz"
            with urllib.request.urlopen(url, timeout=2.0) as response:
                return b"OK" in response.read()
        except (OSError, ValueError):
            return False

    def _check_config_port(self, proxy: int) -> None:
        """The plain command moves a taken port silently: make sure the proxy is really on ours."""
        try:
            text = (self.data_dir / "configs" / "milvus.yaml").read_text(encoding="utf-8")
        except OSError:
            return
        block = re.search(r"^proxy:\n((?:[ #].*\n|\n)*)", text, re.M)
        match = block and re.search(r"^  port: *(\d+)", block.group(1), re.M)
        if match and int(match.group(1)) != proxy:
            raise RuntimeError(f"the server listens on port {match.group(1)}, not {proxy} (was the port taken?)")

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10)


if __name__ == "__main__":  # smoke test: python milvus_server.py DATA_DIR
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "milvus-data")
    executable = find_server_executable()
    if executable is None:
        sys.exit("no milvus-server: set MILVUS_SERVER_VENV or put it on PATH")
    with MilvusServer(executable, target) as server:
        print(f"{server.uri} answered after {server.start_seconds:.1f} s; ports {server.ports}")
