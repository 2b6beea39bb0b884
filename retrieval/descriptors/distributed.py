"""Descriptor extraction as a Ray Data job: the "extract what is to do" step of index.py on a Ray cluster.

Everything else of an indexing run stays where it is (``retrieval.indexing``): the driver scans the folder, reuses
unchanged descriptors, checkpoints and writes the database. Only the encoding of the images to do moves here::

    driver: the list of image files  ->  ray.data.from_items
    Ray tasks: read + decode + resize each file (retrieval.images, the same safe decoding as one process)
    Ray actors (ActorPoolStrategy): each builds the model once (Extractor.for_database) and encodes batches;
                                    one GPU per actor when the cluster has GPUs
    driver: iterates the results as they come, in any order, and hands them back as ``EncodedItem`` batches

An unreadable file becomes an item with an error, exactly as in ``Extractor.encode_files``, so the skip report is
the same. The images must be readable at the same paths on every node (a shared file system), and every node needs
this package's dependencies and the model weights (the md5 recorded in the database is checked on each worker).

Addresses: ``None`` starts a local Ray instance for the run (token authentication off unless RAY_AUTH_MODE says
otherwise, usage statistics off) and stops it at the end; ``auto`` joins the cluster this machine belongs to;
``HOST:PORT`` a cluster's GCS (run index.py on a node of that cluster); ``ray://HOST:10001`` the Ray Client server.
An address that does not answer within ``CONNECT_TIMEOUT_S`` is an error, never a hang.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ImageError, RetrievalError
from .encoder import EncoderConfig
from .extractor import DEFAULT_BATCH_SIZE, EncodedItem

CONNECT_TIMEOUT_S = 5.0
CPU_THREADS_PER_ACTOR = 4  # CPU clusters: one actor per this many CPUs
PASSED_ENVIRONMENT = ("RETRIEVAL_OFFLINE", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")
LOCAL = "local"


def _host_port(address: str) -> tuple[str, int]:
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RetrievalError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def check_address(address: str | None) -> None:
    """RetrievalError (one line) unless ``address`` is local/None or a Ray service answers there within
    ``CONNECT_TIMEOUT_S``: a TCP connection, then one real Ray RPC with a deadline (the GCS's GetClusterId, or the
    Ray Client server's ping). Anything else at that port (or a proxy that accepts every connection) fails here
    instead of making ``ray.init`` retry for many minutes.
    """
    if address in (None, LOCAL):
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RetrievalError('--ray needs Ray (pip install "ray[data]")') from None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # ConnectionError when no cluster runs here
            raise RetrievalError(f"Ray address auto: no running Ray cluster found on this machine ({exc})") from None
        if not resolved:
            raise RetrievalError("Ray address auto: no running Ray cluster found on this machine")
        address = resolved
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RetrievalError(f"Ray address {address}: cannot connect ({exc.strerror or exc})") from None
    _probe(address, host, port)


def _probe(address: str, host: str, port: int) -> None:
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        if address.startswith("ray://"):
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=CONNECT_TIMEOUT_S)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return  # a Ray service that wants a token: ray.init takes it from RAY_AUTH_TOKEN
        name = code.name if code is not None else type(exc).__name__
        raise RetrievalError(f"Ray address {address}: no Ray service answers there ({name})") from None
    finally:
        channel.close()


def _decode(batch: dict, size: int, rule: str) -> dict:
    """Ray task: read, decode and resize each file of the batch; an unusable file gets an error message."""
    from ..images import load_sized_for_backbone

    images, sizes, errors = [], [], []
    for path in batch["path"]:
        try:
            image, source_size = load_sized_for_backbone(str(path), size, rule)
            images.append(image)
            sizes.append(source_size)
            errors.append("")
        except ImageError as exc:
            images.append(np.zeros((1, 1, 3), np.uint8))
            sizes.append((-1, -1))
            errors.append(str(exc) or "unreadable image")
    return {
        "position": batch["position"], "image": images, "size": np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        "error": np.asarray(errors, dtype=object),
    }


class _EncodeActor:
    """Ray actor: the model is built once per actor; each call encodes one batch of decoded images."""

    def __init__(self, encoder: EncoderConfig, weights_file: str | None, threads: int | None):
        from ..models.backbones import quiet_tensorflow

        quiet_tensorflow()
        if threads:
            import tensorflow as tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
            except RuntimeError:
                pass  # TensorFlow already initialised in this worker
        from .extractor import Extractor

        self.extractor = Extractor.for_database(encoder, weights_file)

    def __call__(self, batch: dict) -> dict:
        errors = batch["error"]
        good = [i for i, error in enumerate(errors) if not error]
        vectors = np.zeros((len(errors), self.extractor.dim), np.float32)
        if good:
            vectors[good] = self.extractor.encode_arrays([batch["image"][i] for i in good])
        return {"position": batch["position"], "vector": vectors, "size": batch["size"], "error": errors}


def _init(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env_vars = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    runtime_env = {"py_modules": [str(Path(__file__).resolve().parents[1])], "env_vars": env_vars}
    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
    import ray.data  # noqa: F401  (configures its logger on import: quieten it after)

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start/finish lines; our progress bar says it
    if address in (None, LOCAL):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance that lives for this run only
        ray.init(**options)
    else:
        ray.init(address=address, **options)


def _plan(actors: int | None) -> tuple[int, int, int | None]:
    """(actors, GPUs per actor, CPU threads per actor) from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus:
        return actors or gpus, 1, None
    count = actors or max(1, cpus // CPU_THREADS_PER_ACTOR)
    return count, 0, max(1, cpus // count)


def encode_files_ray(
    paths: Sequence[str | os.PathLike],
    encoder: EncoderConfig,
    *,
    address: str | None = None,
    weights_file: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    actors: int | None = None,
) -> Iterator[list[EncodedItem]]:
    """Like ``Extractor.encode_files`` (batches of ``EncodedItem``, positions index ``paths``), on a Ray cluster.

    Batches come in completion order, not input order. Ray is started (or joined) on the first ``next`` and shut
    down when the generator finishes or is closed; a process already connected to Ray (``ray.init`` done by the
    caller) keeps its connection and ``address`` is not used. Raises RetrievalError for an unreachable address or a
    failed job.
    """
    try:
        import ray
    except ImportError:
        raise RetrievalError('--ray needs Ray (pip install "ray[data]")') from None
    if not ray.is_initialized():
        check_address(address)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    paths = [str(p) for p in paths]  # give absolute paths for a cluster: workers read these names
    owned = not ray.is_initialized()
    try:
        try:
            if owned:
                _init(address)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            count, gpus, threads = _plan(actors)
            dataset = ray.data.from_items([{"position": i, "path": p} for i, p in enumerate(paths)])
            dataset = dataset.map_batches(
                _decode, batch_size=batch_size, fn_kwargs={"size": encoder.input_size, "rule": encoder.resize_rule}
            )
            dataset = dataset.map_batches(
                _EncodeActor,
                fn_constructor_kwargs={
                    "encoder": encoder,
                    "weights_file": str(weights_file) if weights_file else None,
                    "threads": threads,
                },
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=count),
                num_gpus=gpus or None,
            )
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                items = []
                for position, vector, size, error in zip(batch["position"], batch["vector"], batch["size"], batch["error"]):
                    if error:
                        items.append(EncodedItem(int(position), None, ImageError(str(error))))
                    else:
                        width, height = (int(side) for side in size)
                        items.append(EncodedItem(int(position), np.asarray(vector, np.float32), None, (width, height)))
                yield items
        except (RetrievalError, KeyboardInterrupt, GeneratorExit):
            raise
        except Exception as exc:
            raise RetrievalError(f"Ray extraction failed: {_ray_reason(exc)}") from None
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()


def _ray_reason(exc: BaseException) -> str:
    """The innermost cause of a Ray error, on one line."""
    cause = getattr(exc, "cause", None)
    while cause is not None and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    text = str(cause or exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): ", "", line)
