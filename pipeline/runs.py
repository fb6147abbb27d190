"""Runs on disk: ``RUNS_DIR/<run_id>/`` with ``manifest.json``, ``predictions/``, ``errors.parquet``.

Every file is written to a temporary name and renamed into place, so a reader sees either the
old or the new version, never half of one; ``status`` becomes ``complete`` only after the last
prediction part and the errors file are in place. A run whose process died is seen as
``interrupted`` by the next reader instead of ``running`` forever.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

MANIFEST = "manifest.json"
PREDICTIONS = "predictions"
ERRORS = "errors.parquet"
INPUTS = "inputs.parquet"
CANCEL_REQUEST = "CANCEL"
LOG = "run.log"
STATUSES = ("running", "complete", "failed", "cancelled", "interrupted")
FINAL_STATUSES = ("complete", "failed", "cancelled")
HEARTBEAT_TIMEOUT_S = 120.0
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

PREDICTION_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("ground_truth", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("score", pa.float32()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
    ]
)
ERROR_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])
INPUT_SCHEMA = pa.schema([("path", pa.string()), ("ground_truth", pa.string())])


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Counts:
    inputs: int = 0
    predicted: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        return self.predicted + self.failed


@dataclass
class Accuracy:
    """Top-k accuracy over the images that have ground truth."""

    labelled: int = 0
    top1_correct: int = 0
    top5_correct: int = 0

    @property
    def top1(self) -> float | None:
        return self.top1_correct / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.top5_correct / self.labelled if self.labelled else None


@dataclass
class RunParams:
    batch_size: int
    concurrency: int | None
    num_gpus: float | None
    limit: int | None
    address: str | None
    s3_endpoint: str | None
    topk: int = 5
    precision: str = "auto"


@dataclass
class Manifest:
    run_id: str
    dataset: str
    model: dict
    params: RunParams
    status: str = "running"
    created_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    updated_at: str = field(default_factory=now_iso)
    counts: Counts = field(default_factory=Counts)
    accuracy: Accuracy = field(default_factory=Accuracy)
    elapsed_s: float = 0.0
    images_per_s: float | None = None
    device: str | None = None
    reason: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    host: str | None = None
    resumed: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["accuracy"].update(top1=self.accuracy.top1, top5=self.accuracy.top5)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["params"] = RunParams(**{k: v for k, v in data["params"].items() if k in RunParams.__dataclass_fields__})
        values["counts"] = Counts(**data.get("counts", {}))
        accuracy = {k: v for k, v in data.get("accuracy", {}).items() if k in Accuracy.__dataclass_fields__}
        values["accuracy"] = Accuracy(**accuracy)
        return cls(**values)

    def claim(self) -> None:
        """Record this process as the run's owner, so readers can tell if it dies."""
        me = psutil.Process()
        self.pid, self.pid_started, self.host = me.pid, me.create_time(), socket.gethostname()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def new_run_id(model_name: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9]+", "-", model_name).strip("-")[:40]
    return f"{stamp}-{safe}-{secrets.token_hex(2)}"


def run_dir(runs_dir: str | Path, run_id: str) -> Path:
    """The folder of a run, refusing ids that could escape ``runs_dir``."""
    if not RUN_ID.match(run_id or "") or ".." in run_id:
        raise UserError(f"invalid run id {run_id!r}")
    root = Path(runs_dir).resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise UserError(f"invalid run id {run_id!r}")
    return path


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary sibling to write; rename it over ``path`` on success, remove it on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with _replacing(path) as tmp:
        pq.write_table(table, tmp)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Atomically; on a full disk (no room for a temporary copy), in place, so the status still lands."""
    manifest.updated_at = now_iso()
    data = json.dumps(manifest.to_json(), indent=2).encode()
    try:
        atomic_write_bytes(path / MANIFEST, data)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        with open(path / MANIFEST, "r+b") as file:
            file.truncate(0)
            file.write(data)


def _owner_alive(manifest: Manifest) -> bool:
    if manifest.host == socket.gethostname() and manifest.pid:
        try:
            process = psutil.Process(manifest.pid)
            return abs(process.create_time() - (manifest.pid_started or 0)) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    updated = datetime.fromisoformat(manifest.updated_at)
    return (datetime.now(UTC) - updated).total_seconds() < HEARTBEAT_TIMEOUT_S


def read_manifest(path: str | Path) -> Manifest:
    """Load a run's manifest; a ``running`` run whose process is gone is marked ``interrupted``."""
    path = Path(path)
    try:
        manifest = Manifest.from_json(json.loads((path / MANIFEST).read_text()))
    except FileNotFoundError as error:
        raise UserError(f"not a run folder (no {MANIFEST}): {path}") from error
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"corrupt run manifest in {path}: {error}") from error
    if manifest.status == "running" and not _owner_alive(manifest):
        manifest.status = "interrupted"
        manifest.reason = manifest.reason or "the run's process stopped before it finished"
        with contextlib.suppress(OSError):  # a read-only runs folder still reports the right status
            write_manifest(path, manifest)
    return manifest


def list_runs(runs_dir: str | Path) -> list[tuple[Path, Manifest]]:
    """Every readable run under ``runs_dir``, newest first; unreadable folders are left out."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for child in root.iterdir():
        if (child / MANIFEST).is_file():
            try:
                runs.append((child, read_manifest(child)))
            except UserError:
                continue
    return sorted(runs, key=lambda item: item[1].created_at, reverse=True)


def prediction_parts(path: Path) -> list[Path]:
    return sorted((path / PREDICTIONS).glob("part-*.parquet"))


def read_predictions(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All prediction rows written so far (also for a run still in progress)."""
    parts = prediction_parts(Path(path))
    if not parts:
        return PREDICTION_SCHEMA.empty_table().select(columns or PREDICTION_SCHEMA.names)
    return pa.concat_tables(pq.read_table(part, columns=columns) for part in parts)


def read_errors(path: str | Path) -> pa.Table:
    file = Path(path) / ERRORS
    return pq.read_table(file) if file.is_file() else ERROR_SCHEMA.empty_table()


def request_cancel(path: str | Path) -> None:
    """Ask a run's process to stop after the batch in flight; it marks itself ``cancelled``."""
    (Path(path) / CANCEL_REQUEST).write_text(now_iso())


def cancel_requested(path: Path) -> bool:
    return (path / CANCEL_REQUEST).exists()


class RunWriter:
    """Streams prediction rows into numbered Parquet parts and keeps errors in one file."""

    def __init__(self, path: Path, flush_rows: int = 2000, flush_seconds: float = 3.0):
        self.path = path
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        (path / PREDICTIONS).mkdir(parents=True, exist_ok=True)
        self._next_part = len(prediction_parts(path))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._errors = [read_errors(path)]
        self._errors_dirty = False
        self._last_flush = time.monotonic()

    def add(self, predictions: pa.Table, errors: pa.Table) -> None:
        if predictions.num_rows:
            self._pending.append(predictions)
            self._pending_rows += predictions.num_rows
        if errors.num_rows:
            self._errors.append(errors)
            self._errors_dirty = True
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if self._pending_rows >= self.flush_rows or (due and (self._pending_rows or self._errors_dirty)):
            self.flush()

    def flush(self) -> None:
        """Make everything received so far durable."""
        if self._pending:
            table = pa.concat_tables(self._pending).cast(PREDICTION_SCHEMA)
            atomic_write_table(self.path / PREDICTIONS / f"part-{self._next_part:06d}.parquet", table)
            self._next_part += 1
            self._pending, self._pending_rows = [], 0
        if self._errors_dirty or not (self.path / ERRORS).exists():
            atomic_write_table(self.path / ERRORS, pa.concat_tables(self._errors).cast(ERROR_SCHEMA))
            self._errors_dirty = False
        self._last_flush = time.monotonic()
