"""A real multi-node Ray cluster: a head node and a second worker node (``ray start``, each its own processes and
resources), then ``index.py --ray ADDRESS`` against it, and a worker node killed in the middle of a job.

Everything listens on 127.0.0.1; each node runs ``ray start --block`` in its own process group, so the test stops
exactly the processes it started (never ``ray stop``, which would stop every Ray on the machine)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_DATABASE, REPO
from retrieval.indexing import build_index
from retrieval.storage.database import read_database

import ray  # noqa: F401  (requirements.txt: a missing package must fail the suite, not skip it)

RAY = Path(sys.executable).with_name("ray")
ENVIRONMENT = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RETRIEVAL_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node:
    """One ``ray start --block`` process group (a head or a worker node)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                stdout=out, stderr=subprocess.STDOUT, env=ENVIRONMENT, start_new_session=True,
            )

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.kill(signal.SIGKILL)  # anything of the group still left


def alive_nodes(address: str) -> int:
    code = (
        "import ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR');"
        "print(sum(1 for n in ray.nodes() if n['Alive']))" % address
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENVIRONMENT, timeout=60)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout.strip() else 0


@pytest.fixture
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = Node(["--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}", "--include-dashboard=false"],
                temp / "head.log")
    worker = None
    try:
        deadline = time.monotonic() + 120
        while alive_nodes(address) < 1:
            assert head.process.poll() is None and time.monotonic() < deadline, head.log.read_text()
            time.sleep(2)
        worker = Node([f"--address={address}", "--num-cpus=1"], temp / "worker.log")
        while alive_nodes(address) < 2:
            assert worker.process.poll() is None and time.monotonic() < deadline, worker.log.read_text()
            time.sleep(2)
        yield address, head, worker
    finally:
        for node in (worker, head):
            if node is not None:
                node.stop()
        leftovers = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftovers, f"Ray processes left running: {leftovers}"


def photos(folder: Path, copies: int = 1) -> Path:
    for group in sorted(p for p in DEMO_DATABASE.iterdir() if p.is_dir()):
        for copy in range(copies):
            shutil.copytree(group, folder / f"{group.name}-{copy}")
    return folder


def reference(folder: Path, path: Path):
    build_index(folder, path, backbone="efficientnet-lite0", progress=False, notice=lambda line: None)
    return read_database(path)


def index_on(address: str, folder: Path, path: Path, *extra: str, timeout: int = 600):
    return subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", str(folder), "--index", str(path), "--ray", address,
         "--backbone", "efficientnet-lite0", "--quiet", "--ray-actors", "2", "--batch-size", "4", *extra],
        capture_output=True, text=True, cwd=REPO, env=ENVIRONMENT, timeout=timeout,
    )


def assert_same_descriptors(ours, theirs):
    assert ours.paths == theirs.paths
    cosines = np.sum(np.asarray(ours.vectors, np.float32) * np.asarray(theirs.vectors, np.float32), axis=1)
    assert cosines.min() >= 0.9999


def test_two_node_cluster_gives_the_same_descriptors_as_one_process(cluster, tmp_path):
    address, _, _ = cluster
    folder = photos(tmp_path / "images")
    result = index_on(address, folder, tmp_path / "ray.h5")
    assert result.returncode == 0, result.stderr
    assert "ray" in result.stdout
    assert_same_descriptors(read_database(tmp_path / "ray.h5"), reference(folder, tmp_path / "one.h5"))


def test_a_worker_node_killed_mid_job_loses_nothing(cluster, tmp_path):
    address, _, worker = cluster
    folder = photos(tmp_path / "images", copies=3)  # 147 images: long enough to kill a node in the middle
    path = tmp_path / "ray.h5"
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [sys.executable, str(REPO / "index.py"), "--database", str(folder), "--index", str(path), "--ray", address,
             "--backbone", "efficientnet-lite0", "--quiet", "--ray-actors", "2", "--batch-size", "4",
             "--checkpoint-every", "8"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=ENVIRONMENT,
        )
    partial = Path(f"{path}.partial")
    deadline = time.monotonic() + 300
    while not list(partial.glob("chunk-*.npz")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the job is extracting once its first checkpoint chunk exists
    worker.kill()  # the whole worker node dies at once, as a machine would
    try:
        code = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    output = (tmp_path / "job.log").read_text()
    assert "Traceback" not in output, output
    print(f"job after the worker node was killed: exit {code}")
    if code != 0:  # Ray could not recover the job: one error line, and a re-run resumes with nothing lost
        assert code == 1 and output.strip().splitlines()[-1].startswith("error: "), output
        rerun = index_on(address, folder, path)
        assert rerun.returncode == 0, rerun.stderr
    assert_same_descriptors(read_database(path), reference(folder, tmp_path / "one.h5"))
    assert not partial.exists()
