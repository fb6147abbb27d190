"""Runs as processes of their own, so they outlive the page, the browser and the Streamlit server.

The dashboard validates a request in-process (fast, clear errors), then starts
``python -m pipeline run --run-id ID`` in a new session; from then on it only reads the run folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import runs
from .errors import UserError
from .runner import RunRequest, check
from .sources import credentials_to_environment

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Launch:
    run_id: str
    pid: int
    log: Path


def _spawn(args: list[str], log: Path, credentials: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    if credentials:  # keys given with the dataset replace the environment's, and a session token of other keys
        env.pop("AWS_SESSION_TOKEN", None)
        env.update(credentials)
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PACKAGE_ROOT,
            start_new_session=True,
        )
    return process.pid


def launch_run(request: RunRequest) -> Launch:
    """Check the request like ``run`` would, then start it in the background."""
    out = check(request).out
    run_id = request.run_id or runs.new_run_id(request.model.display_name)
    if runs.run_dir(out, run_id).exists():
        raise UserError(f"run {run_id} already exists")
    spec = request.model
    data, credentials = credentials_to_environment(request.data)
    args = ["run", "--data", data, "--out", str(out), "--run-id", run_id]
    args += ["--precision", request.precision, "--engine", request.engine, "--topk", str(request.topk)]
    optional = {
        "--model": None if spec.name == "custom" else spec.display_name,
        "--checkpoint": spec.checkpoint,
        "--arch": spec.arch,
        "--labels": spec.labels_file,
        "--preprocess": spec.preprocess,
        "--batch-size": request.batch_size,
        "--concurrency": request.concurrency,
        "--num-gpus": request.num_gpus,
        "--limit": request.limit,
        "--address": request.address,
        "--s3-endpoint": request.s3_endpoint,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    log = runs.launch_log(out, run_id)
    return Launch(run_id, _spawn(args, log, credentials), log)


def launch_resume(path: Path, data: str | None = None) -> int:
    """Resume a run in the background; its output goes to the run's launch log. ``data`` is the dataset
    as the user gave it (the dashboard's setting): where it is this run's, with keys in it, the resumed
    run gets those keys as the run did, through its environment (its manifest holds the URI without them)."""
    manifest = runs.read_manifest(path)
    if manifest.status in ("running", "complete"):
        raise UserError(f"run {manifest.run_id} is {manifest.status}; only interrupted, failed or cancelled runs resume")
    redacted, credentials = credentials_to_environment(data or "")
    keys = credentials if redacted == manifest.dataset else None
    return _spawn(["resume", str(path)], runs.launch_log(path.parent, manifest.run_id), keys)


def launch_failure(out: str | Path, run_id: str) -> str | None:
    """Why a launched run never created its folder: the last line its process wrote, if it has exited."""
    log = runs.launch_log(Path(out).expanduser().resolve(), run_id)
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    failure = [line for line in lines if line.startswith(("error:", "internal error:"))]
    return failure[-1].removeprefix("error: ") if failure else None
