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
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import UserError

MANIFEST = "manifest.json"
PREDICTIONS = "predictions"
ERRORS = "errors.parquet"
INPUTS = "inputs.parquet"
CANCEL_REQUEST = "CANCEL"
LAUNCH_LOGS = ".launch"  # RUNS_DIR/.launch/<run_id>.log: what a run started from the dashboard printed
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
        # Scores of the dataset's own classes (Manifest.label_set order), for label-set-restricted evaluation.
        ("label_set_scores", pa.list_(pa.float32())),
    ]
)
ERROR_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])


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
    """Top-k accuracy over the images that have ground truth. ``top5`` counts hits among the run's
    ``params.topk`` classes: named for the default k, and kept so for manifests already written."""

    labelled: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    label_set_correct: int = 0

    @property
    def top1(self) -> float | None:
        return self.top1_correct / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.top5_correct / self.labelled if self.labelled else None

    @property
    def label_set_top1(self) -> float | None:
        """Top-1 with the argmax taken among the dataset's classes only (None without a label set)."""
        return self.label_set_correct / self.labelled if self.labelled else None


@dataclass
class UnmatchedTruth:
    """Ground truth that names no class of the model: a folder ``cats`` under an ImageNet model, whose
    classes are ``tabby`` and ``tiger cat``. Its images count as misclassified, and the user is told
    why, or a run of such folders would read as a model that is always wrong."""

    images: int
    classes: int
    names: list[str]  # the classes with the most images first, at most MAX_UNMATCHED_NAMES

    def sentence(self) -> str:
        more = self.classes - len(self.names)
        shown = ", ".join(self.names) + (f" and {more} more" if more > 0 else "")
        images = "1 image has" if self.images == 1 else f"{self.images:,} images have"
        return f"{images} a ground truth that is not a class of this model ({shown}); they count as misclassified"


MAX_UNMATCHED_NAMES = 5


def unmatched_truth(truths: pa.ChunkedArray | pa.Array, categories: Sequence[str]) -> UnmatchedTruth | None:
    """What of ``truths`` (one per image) names no class in ``categories``, if anything does."""
    known = set(categories)
    tally = pc.value_counts(truths).to_pylist()
    unmatched = sorted(
        ((row["counts"], row["values"]) for row in tally if row["values"] is not None and row["values"] not in known),
        key=lambda pair: (-pair[0], pair[1]),
    )
    if not unmatched:
        return None
    return UnmatchedTruth(sum(n for n, _ in unmatched), len(unmatched), [name for _, name in unmatched[:MAX_UNMATCHED_NAMES]])


ENGINES = ("auto", "ray", "local")


@dataclass
class RunParams:
    batch_size: int | None  # None: chosen for the device when the run starts
    concurrency: int | None
    num_gpus: float | None
    limit: int | None
    address: str | None
    s3_endpoint: str | None
    topk: int = 5
    precision: str = "auto"
    engine: str = "auto"  # auto, ray or local (runner.engine_for)


@dataclass
class Manifest:
    run_id: str
    dataset: str
    model: dict
    params: RunParams
    status: str = "running"  # then complete, failed or cancelled; read as interrupted when its process died
    created_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    updated_at: str = field(default_factory=now_iso)
    counts: Counts = field(default_factory=Counts)
    accuracy: Accuracy = field(default_factory=Accuracy)
    elapsed_s: float = 0.0
    images_per_s: float | None = None
    device: str | None = None
    engine: str | None = None  # what ran it: "ray" (Ray Data) or "local" (worker processes, pipeline.local)
    precision: str | None = None  # what it ran in, fp32 or bf16 (``params.precision`` is what was asked: auto)
    reason: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    host: str | None = None
    resumed: int = 0
    # The model classes that are the dataset's ground-truth classes, when they are a small subset.
    label_set: list[str] | None = None
    unmatched_truth: UnmatchedTruth | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["accuracy"].update(top1=self.accuracy.top1, top5=self.accuracy.top5)
        data["accuracy"]["label_set_top1"] = self.accuracy.label_set_top1 if self.label_set else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["params"] = RunParams(**{k: v for k, v in data["params"].items() if k in RunParams.__dataclass_fields__})
        values["counts"] = Counts(**data.get("counts", {}))
        accuracy = {k: v for k, v in data.get("accuracy", {}).items() if k in Accuracy.__dataclass_fields__}
        values["accuracy"] = Accuracy(**accuracy)
        if unmatched := data.get("unmatched_truth"):
            values["unmatched_truth"] = UnmatchedTruth(**{k: v for k, v in unmatched.items() if k in UnmatchedTruth.__dataclass_fields__})
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


def launch_log(runs_dir: Path, run_id: str) -> Path:
    """Where a run started from the dashboard writes what it prints (beside the run folders, not in one:
    a run that failed before its folder existed has a log too)."""
    return runs_dir / LAUNCH_LOGS / f"{run_id}.log"


def delete_run(path: str | Path) -> Manifest:
    """Delete a run: its folder (predictions, errors, inputs, manifest) and its launch log. Only a folder with
    a run's manifest is deleted, and a run still running is refused: its process would write on."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.status == "running":
        raise UserError(f"run {manifest.run_id} is still running: cancel it first")
    try:
        shutil.rmtree(path)
    except OSError as error:
        raise UserError(f"cannot delete run {manifest.run_id}: {error.strerror or error}") from error
    launch_log(path.parent, manifest.run_id).unlink(missing_ok=True)
    return manifest


def prediction_parts(path: Path) -> list[Path]:
    return sorted((path / PREDICTIONS).glob("part-*.parquet"))


def read_predictions(
    path: str | Path, columns: list[str] | None = None, categorical: Sequence[str] = (), parts: Sequence[Path] | None = None
) -> pa.Table:
    """All prediction rows written so far (also for a run still in progress), or those of ``parts``.

    Columns a part lacks (written before they existed) read as nulls. ``categorical`` string
    columns come back dictionary-encoded, straight from Parquet's own dictionaries: a million
    labels then cost a million small integers, not a million Python strings.
    """
    schema = pa.schema(
        [pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in categorical else f for f in PREDICTION_SCHEMA]
    )
    columns = columns or schema.names
    parts = prediction_parts(Path(path)) if parts is None else parts
    if not parts:
        return schema.empty_table().select(columns)
    file_format = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=set(categorical)))
    return pads.dataset([str(p) for p in parts], schema=schema, format=file_format).to_table(columns=columns)


def read_errors(path: str | Path) -> pa.Table:
    file = Path(path) / ERRORS
    return pq.read_table(file) if file.is_file() else ERROR_SCHEMA.empty_table()


def request_cancel(path: str | Path) -> None:
    """Ask a run's process to stop after the batch in flight; it marks itself ``cancelled``."""
    (Path(path) / CANCEL_REQUEST).write_text(now_iso())


def cancel_requested(path: Path) -> bool:
    return (path / CANCEL_REQUEST).exists()


def score_rows(table: pa.Table, accuracy: Accuracy, label_set: Sequence[str] | None = None) -> None:
    """Add a batch of prediction rows to the running accuracy (vectorised: runs can be millions of rows)."""
    truth = table.column("ground_truth").combine_chunks()
    accuracy.labelled += pc.sum(pc.is_valid(truth)).as_py() or 0
    accuracy.top1_correct += pc.sum(pc.equal(table.column("label"), truth)).as_py() or 0
    accuracy.top5_correct += int(topk_hits(table.column("topk_labels"), truth).sum())
    if label_set and "label_set_scores" in table.column_names:
        choice, _ = label_set_choice(table.column("label_set_scores"), len(label_set))
        names = np.array([*label_set, None], dtype=object)
        accuracy.label_set_correct += int(np.sum(names[choice] == truth.to_numpy(zero_copy_only=False)))


def topk_hits(topk_labels: pa.ChunkedArray | pa.Array, truth: pa.Array) -> np.ndarray:
    """Per row: is the ground truth among the top-k labels (False where there is no ground truth)."""
    lists = _one_chunk(topk_labels)
    parents = pc.list_parent_indices(lists).to_numpy()
    equal = pc.equal(pc.list_flatten(lists), pc.take(_one_chunk(truth), pa.array(parents))).fill_null(False)
    hit = np.zeros(len(lists), dtype=bool)
    hit[parents[equal.to_numpy(zero_copy_only=False)]] = True
    return hit


def label_set_choice(scores: pa.ChunkedArray | pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the position in the label set of its best-scoring class (``width`` where the row has
    no scores) and that class's probability renormalised over the label set (0 where none)."""
    scores = _one_chunk(scores)
    present = pc.list_value_length(scores).fill_null(0).to_numpy(zero_copy_only=False) == width
    choice = np.full(len(scores), width)
    confidence = np.zeros(len(scores), dtype=np.float32)
    if width and present.any():
        matrix = pc.list_flatten(scores.filter(pa.array(present))).to_numpy().reshape(-1, width)
        choice[present] = matrix.argmax(axis=1)
        confidence[present] = matrix.max(axis=1) / np.maximum(matrix.sum(axis=1), np.finfo(np.float32).tiny)
    return choice, confidence


def _one_chunk(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def conform(table: pa.Table) -> pa.Table:
    """Prediction rows in PREDICTION_SCHEMA's column order; columns the producer lacks become nulls."""
    for column in PREDICTION_SCHEMA:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA)


class RunWriter:
    """Streams prediction rows into numbered Parquet parts and keeps errors in one file."""

    default_part_rows = 2000

    def __init__(self, path: Path, flush_rows: int = default_part_rows, flush_seconds: float = 3.0):
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
            table = conform(pa.concat_tables(self._pending))
            atomic_write_table(self.path / PREDICTIONS / f"part-{self._next_part:06d}.parquet", table)
            self._next_part += 1
            self._pending, self._pending_rows = [], 0
        if self._errors_dirty or not (self.path / ERRORS).exists():
            atomic_write_table(self.path / ERRORS, pa.concat_tables(self._errors).cast(ERROR_SCHEMA))
            self._errors_dirty = False
        self._last_flush = time.monotonic()
