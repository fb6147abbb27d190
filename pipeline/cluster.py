"""Connecting to Ray: an in-process local instance by default, or an existing cluster by address."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .errors import DEBUG_ENV, UserError, one_line

CORE_LOG_LEVEL_ENV = "RAY_BACKEND_LOG_LEVEL"

LOCAL = "local"


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    cpus: float
    gpus: float
    node_cpus: float | None = None  # the largest node's: no actor can use more threads than that


def resolve_address(address: str | None) -> str:
    """``--address`` wins, then ``RAY_ADDRESS``; otherwise a local Ray started in this process."""
    return (address or os.environ.get("RAY_ADDRESS") or LOCAL).strip() or LOCAL


def connect(address: str | None = None) -> ClusterInfo:
    """Start or join Ray once per process, quietly; an unreachable cluster is a UserError, and so is a
    Python without Ray (``--engine local`` needs none)."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise UserError(f"Ray Data is not installed here ({one_line(error)}): pip install 'ray[data]', or use --engine local") from None

    address = resolve_address(address)
    if not ray.is_initialized():
        options: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address == LOCAL:
            options["include_dashboard"] = False
        else:
            _check_reachable(address)
            # Workers on a cluster do not have this checkout: ship the package with the job.
            options["runtime_env"] = {"py_modules": [str(Path(__file__).parent)], "excludes": ["sample_data/"]}
        with _native_stderr_captured() as captured, _ray_quieted():
            try:
                ray.init(address=address, **options)
            except Exception as error:
                failure = error
            else:
                failure = None
        if failure is not None:
            hint = _auth_hint(f"{type(failure).__name__} {failure} {''.join(captured)}")
            raise UserError(f"cannot connect to the Ray cluster at {address!r}: {one_line(failure)}{hint}") from failure
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR if os.environ.get(DEBUG_ENV) else logging.CRITICAL)
    resources = ray.cluster_resources()
    node_cpus = max((float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=None)
    return ClusterInfo(address, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), node_cpus)


def release() -> None:
    """Stop the local Ray this process started, or leave the cluster it joined, if it did either.

    Called just before a CLI process exits, its run written. Ray's own exit hook would first sleep half
    a second so that forwarded worker logs get printed, and ours are not forwarded (``log_to_driver=False``).
    A local Ray is stopped the quick way (``_stop_local_ray``).
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            _stop_local_ray(ray)
        except Exception as error:  # the run is written; say what failed in one line, as everywhere
            print(f"warning: stopping Ray: {one_line(error)}", file=sys.stderr)


def _stop_local_ray(ray) -> None:
    """``ray.shutdown``, without waiting on processes that hold nothing of ours any more.

    Ray stops its autoscaler monitor last, after the GCS it reports to, and the monitor then outlives
    its SIGTERM: Ray waits a whole second before it kills it (1.0 of the 1.4 s that stopping a local
    Ray took here). And the workers, told to exit, each tear down their interpreter with torch and
    pyarrow loaded: on two cores they were still running 2-3 s after the CLI had returned. So the
    monitor is killed first and the workers (and Ray's agents) after ``ray.shutdown``. Only processes
    of a Ray this process started are killed: a cluster it joined is left as it is, and a Ray whose
    internals moved is simply stopped the slow way.
    """
    import psutil

    node = getattr(sys.modules.get("ray._private.worker"), "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for monitor in processes.get("monitor", []):
        monitor.process.kill()  # ray.shutdown reaps it
    workers = []
    for raylet in processes.get("raylet", []):
        with suppress(psutil.Error):
            workers += psutil.Process(raylet.process.pid).children(recursive=True)
    ray.shutdown()
    for worker in workers:  # not waited for: a killed process frees its memory at once, and no one reaps it sooner
        with suppress(psutil.Error):
            worker.kill()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise UserError(f"cannot connect to the Ray cluster at {address!r}: nothing answers there ({error.strerror or error})") from error


@contextmanager
def _ray_quieted():
    """Ray's own reports of what a run reports itself, in one line, kept off the driver's stderr unless
    ``PIPELINE_DEBUG`` is set: its C++ core's errors (every Ray Data actor pool logs one that its arguments
    are in the object store, ray-project/ray#57733), the raylet's stack traces of a task or actor that
    failed, and Ray Data's (``connect``). The core reads its level when it starts: so does a local Ray's."""
    if os.environ.get(DEBUG_ENV) or CORE_LOG_LEVEL_ENV in os.environ:
        yield
        return
    os.environ[CORE_LOG_LEVEL_ENV] = "fatal"
    try:
        yield
    finally:
        os.environ.pop(CORE_LOG_LEVEL_ENV, None)  # not passed on to what this process starts later (the dashboard's runs)
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "_worker_logs_enabled"):
        worker._worker_logs_enabled = False


@contextmanager
def _native_stderr_captured():
    """Ray's C++ client logs retries straight to file descriptor 2; keep them for the error message."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read())


def _auth_hint(text: str) -> str:
    if "auth" in text.lower():
        return " (the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
    return ""
