"""A run end to end: validate, list, write the manifest, stream predictions to disk, finish.

``start`` does everything that can fail on bad input before a run folder exists; ``execute``
does the work and is also how ``resume`` finishes only what is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import cluster, local, runs
from .errors import UserError, one_line
from .inference import (
    PRECISIONS,
    PredictorOptions,
    actor_start_failure,
    build_dataset,
    check_pool,
    plan,
    resolve_precision,
    ship_checkpoint,
)
from .labels import label_inputs, label_set
from .models import ModelInfo, ModelSpec, describe, ensure_weights
from .runs import ENGINES, Accuracy, Counts, Manifest, RunParams, RunWriter
from .sources import SAMPLE_DATA, Listing, Source, list_images, open_source, redact_uri, require_exists

# ``auto`` runs up to this many images on this machine's CPUs in local worker processes (``local``), where
# Ray's start would be a large part of the run: on 2 cores, first predictions 4.4 s later, in an ~18-s run
# of Imagenette's 3,925 images. Bigger runs take the path a cluster's run takes, Ray Data, whose start is
# then under ~8 % of the run even for the fastest model here on CPUs.
LOCAL_MAX_IMAGES = 20_000
# On this machine's GPUs ``auto`` gives local workers runs of any size: on an H100 machine (ResNet-152,
# 200,000 images) their first predictions came 5.4–6.1 s after the command, and they then ran 6,048–6,118
# img/s, 0.93–0.94 of the network alone; Ray Data's first predictions came after 19–28 s, and its best
# steady rate was 5,072 img/s (0.78 of the same network, another day's H100). A shorter start and a faster
# run after it: no run on one GPU machine was faster on Ray. A million images then ran at 6,057 img/s whole,
# memory flat (summed PSS 2.4 GiB, against 2.2 at 200,000).
MAX_TOPK = 20  # classes a run may keep per image


@dataclass
class RunRequest:
    data: str = str(SAMPLE_DATA)
    model: ModelSpec = field(default_factory=ModelSpec)
    out: str = "runs"
    batch_size: int | None = None  # None: chosen for the device (inference.plan)
    concurrency: int | None = None
    num_gpus: float | None = None
    limit: int | None = None
    address: str | None = None
    s3_endpoint: str | None = None
    run_id: str | None = None
    topk: int = 5
    precision: str = "auto"
    engine: str = "auto"


@dataclass
class Progress:
    """What a front end shows while a run goes: counts so far against the total."""

    counts: Counts
    elapsed_s: float
    started_s: float | None = None

    @property
    def rate(self) -> float | None:
        if self.started_s is None or self.counts.done == 0:
            return None
        busy = self.elapsed_s - self.started_s
        return self.counts.done / busy if busy > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.counts.inputs - self.counts.done) / rate if rate else None


ProgressCallback = Callable[[Progress], None]
T = TypeVar("T")


def validate(request: RunRequest) -> None:
    check_pool(request.batch_size, request.concurrency, request.num_gpus)
    if request.limit is not None and request.limit < 1:
        raise UserError(f"limit must be a positive integer, got {request.limit}")
    if request.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}")
    if not 1 <= request.topk <= MAX_TOPK:
        raise UserError(f"top-k must be between 1 and {MAX_TOPK}")
    check_engine(request.engine, request.address, request.num_gpus)


def check_engine(engine: str, address: str | None, num_gpus: float | None) -> None:
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}")
    if engine == "local" and (resolved := cluster.resolve_address(address)) != cluster.LOCAL:
        raise UserError(f"--engine local runs on this machine, not on the Ray cluster at {resolved!r}")
    if engine == "local" and num_gpus and not local.has_gpu():
        raise UserError(f"--num-gpus {num_gpus:g} asked for, but this machine has no GPU for --engine local")


def engine_for(engine: str, address: str | None, num_gpus: float | None, images: int) -> str:
    """``ray`` or ``local`` for a run of ``images``: ``auto`` is local for runs on this machine, on its GPUs
    whatever their size, on its CPUs up to ``LOCAL_MAX_IMAGES`` (GPUs asked for where it has none: Ray says so)."""
    if engine != "auto":
        return engine
    if not local.can_run(address, bool(num_gpus)):
        return "ray"
    on_gpus = num_gpus != 0 and local.has_gpu()  # ``--num-gpus 0`` keeps a run on the CPUs
    return "local" if on_gpus or images <= LOCAL_MAX_IMAGES else "ray"


def resources_for(engine: str, address: str | None) -> cluster.ClusterInfo:
    return local.machine() if engine == "local" else connect(address)


def connect(address: str | None) -> cluster.ClusterInfo:
    """Ray, for a run that goes there: a fork server started for a local run would only slow its start."""
    local.stop_fork_server()
    return cluster.connect(address)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output folder {out} is not writable: {error.strerror or error}") from error


@dataclass
class Checked:
    info: ModelInfo
    source: Source
    listing: Listing
    out: Path


def preflight(request: RunRequest) -> tuple[ModelInfo, Source, Path]:
    """The checks that need no listing (request, model and weights, dataset root, output folder): quick,
    so that a typo is reported before Ray starts."""
    validate(request)
    info = describe(request.model)
    source = open_source(request.data, request.s3_endpoint)
    require_exists(source)
    ensure_weights(info)
    out = Path(request.out).expanduser().resolve()
    _check_writable(out)
    return info, source, out


def check(request: RunRequest) -> Checked:
    """Everything about a request that can be wrong, checked before any run folder exists."""
    info, source, out = preflight(request)
    return Checked(info, source, list_images(source), out)


def start(request: RunRequest) -> tuple[Path, Source]:
    """Check the request, list and label the inputs while Ray starts, and create the run folder in
    state ``running``.

    ray.init waits seconds on the processes it starts (8 s on a 16-CPU GPU machine), and listing a
    big bucket takes seconds too (a local folder of 600,000 files: 2–2.5 s on 2 cores, labels
    included), so they overlap.
    Ray must start on the main thread: its processes die with the thread that started them. A run that
    may go without Ray (``engine_for``) waits for the count before it decides.
    """
    info, source, out = preflight(request)
    inputs_ready = in_background(lambda: _labelled_inputs(source, request.limit, info.categories))
    if engine_for(request.engine, request.address, request.num_gpus, 0) == "ray":
        connect(request.address)
    skipped, inputs = inputs_ready()
    engine = engine_for(request.engine, request.address, request.num_gpus, inputs.num_rows)
    resources = resources_for(engine, request.address)
    plan(inputs.num_rows, resources.cpus, resources.gpus, request.batch_size, request.concurrency, request.num_gpus, resources.node_cpus)
    run_id = request.run_id or runs.new_run_id(request.model.display_name)
    path = runs.run_dir(out, run_id)
    if path.exists():
        raise UserError(f"run {run_id} already exists in {out}")
    path.mkdir()
    manifest = Manifest(
        run_id=run_id,
        dataset=redact_uri(request.data if source.scheme != "file" else source.uri),
        model={**request.model.to_dict(), "display_name": request.model.display_name, "weights_name": info.weights_name},
        params=RunParams(
            request.batch_size,
            request.concurrency,
            request.num_gpus,
            request.limit,
            request.address,
            request.s3_endpoint,
            request.topk,
            request.precision,
            request.engine,
        ),
        counts=Counts(inputs=inputs.num_rows, skipped=skipped),
    )
    manifest.label_set = label_set(inputs, info.categories)
    manifest.unmatched_truth = runs.unmatched_truth(inputs.column("ground_truth"), info.categories)
    manifest.claim()
    runs.atomic_write_table(path / runs.INPUTS, inputs)
    runs.write_manifest(path, manifest)
    return path, source


def _labelled_inputs(source: Source, limit: int | None, categories: Sequence[str]) -> tuple[int, pa.Table]:
    """How many files were skipped, and (path, ground_truth) for every image, or ``limit``'s sample, in
    the order they are to be predicted."""
    listing = list_images(source)
    if limit is not None:
        listing = replace(listing, files=listing.sample(limit))
    return listing.skipped, in_processing_order(label_inputs(listing, categories))


def in_processing_order(inputs: pa.Table, seed: int = 0) -> pa.Table:
    """The inputs in a reproducible random order. Listed in folder order, a run would predict one class
    after another: what it shows as it goes (labels and top-1 so far) and what a cancelled run keeps would
    stand for its first folders only, not for the dataset."""
    return inputs.take(np.random.default_rng(seed).permutation(inputs.num_rows))


def in_background(work: Callable[[], T]) -> Callable[[], T]:
    """Start ``work`` on a daemon thread (it never holds up the exit of a run that failed meanwhile);
    the function returned waits for its result, or raises its error."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, name="background", daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return result


class StopFlag:
    """Set by SIGTERM or a cancel request file; checked between batches."""

    def __init__(self, path: Path):
        self.path = path
        self.signalled = False

    def __call__(self) -> bool:
        return self.signalled or runs.cancel_requested(self.path)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))


def execute(path: Path, on_progress: ProgressCallback | None = None, source: Source | None = None, heartbeat_s: float = 1.0) -> Manifest:
    """Predict every input of the run that has neither a prediction nor an error yet.

    ``source`` carries credentials given in the URI itself; without it the dataset is reopened
    from the manifest, with keys from the environment.
    """
    began = time.monotonic()
    manifest = runs.read_manifest(path)
    manifest.status, manifest.reason, manifest.finished_at = "running", None, None
    manifest.claim()
    runs.write_manifest(path, manifest)
    stop = StopFlag(path)
    stop.install()
    previous_elapsed = manifest.elapsed_s
    spec = ModelSpec(**{k: v for k, v in manifest.model.items() if k in ModelSpec.__dataclass_fields__})  # older runs lack newer fields
    inputs = pq.read_table(path / runs.INPUTS)
    predicted = runs.read_predictions(path, columns=["path", "ground_truth", "label", "topk_labels", "label_set_scores"])
    failed = runs.read_errors(path)
    done = pa.concat_arrays([predicted.column("path").combine_chunks(), failed.column("path").combine_chunks()])
    todo = inputs.filter(pc.invert(pc.is_in(inputs.column("path"), done))) if len(done) else inputs
    counts = manifest.counts
    counts.predicted, counts.failed = predicted.num_rows, failed.num_rows
    manifest.accuracy = Accuracy()
    if predicted.num_rows:  # a resumed run goes on from what is already on disk
        runs.score_rows(predicted, manifest.accuracy, manifest.label_set)
    writer = RunWriter(path)
    progress = Progress(counts, previous_elapsed)

    last_write = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_write
        progress.elapsed_s = previous_elapsed + time.monotonic() - began
        manifest.elapsed_s = round(progress.elapsed_s, 3)
        manifest.images_per_s = progress.rate
        if on_progress:
            on_progress(progress)
        if force or time.monotonic() - last_write >= heartbeat_s:
            runs.write_manifest(path, manifest)
            last_write = time.monotonic()

    seen: set[str] = set()
    try:
        report(force=True)
        if todo.num_rows:
            source = source or open_source(manifest.dataset, manifest.params.s3_endpoint)
            params = manifest.params
            manifest.engine = engine_for(params.engine, params.address, params.num_gpus, todo.num_rows)
            info = resources_for(manifest.engine, params.address)
            work = plan(todo.num_rows, info.cpus, info.gpus, params.batch_size, params.concurrency, params.num_gpus, info.node_cpus)
            device = "cuda" if work.num_gpus else "cpu"
            manifest.precision = precision = resolve_precision(params.precision, device, spec.name)
            workers, place = (
                ("worker process(es)", "on this machine, without Ray")
                if manifest.engine == "local"
                else ("actor(s)", f"on Ray ({info.address})")
            )
            manifest.device = f"{work.concurrency}× {device.upper()} {workers}, {precision}, batch {work.batch_size}, {place}"
            progress.started_s = progress.elapsed_s
            model = describe(spec)
            label_set_indices = tuple(model.categories.index(name) for name in manifest.label_set or ())
            options = PredictorOptions(model, params.topk, params.precision, work.threads, label_set_indices, source)
            if manifest.engine == "local":
                gpus = local.gpu_ids() if work.num_gpus else []
                batches = local.predictions(todo, options, work.concurrency, work.batch_size, stop, gpus)
            else:
                if info.address != cluster.LOCAL:  # the nodes of a cluster may not have a user's own checkpoint file
                    options = ship_checkpoint(options)
                batches = build_dataset(todo, options, work).iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1)
            for batch in batches:
                batch = _first_sightings(batch, seen)
                failed = pc.is_valid(batch.column("error"))
                errors = batch.filter(failed).select(["path", "error"])
                predictions = batch.filter(pc.invert(failed)).drop_columns(["error"])
                writer.add(predictions, errors)
                counts.predicted += predictions.num_rows
                counts.failed += errors.num_rows
                runs.score_rows(predictions, manifest.accuracy, manifest.label_set)
                report()
                if stop():
                    break
        writer.flush()
        missing = counts.inputs - counts.done
        if stop():
            manifest.status, manifest.reason = "cancelled", "cancelled by the user"
        elif missing:
            manifest.status, manifest.reason = "failed", f"{missing} inputs were not returned by the pipeline; resume the run"
        else:
            manifest.status = "complete"
    except KeyboardInterrupt:
        writer.flush()
        manifest.status, manifest.reason = "cancelled", "interrupted from the keyboard"
    except Exception as error:
        _flush_quietly(writer)
        # A user's error, or a model actor that could not start, says why in one line; anything else is a bug
        failure = error if isinstance(error, UserError) else actor_start_failure(error)
        manifest.status, manifest.reason = "failed", str(failure) if failure else f"{type(error).__name__}: {one_line(error)}"
        _finish(path, manifest, report)
        if failure is not None and failure is not error:
            raise failure from error
        raise
    _finish(path, manifest, report)
    return manifest


def _first_sightings(batch: pa.Table, seen: set[str]) -> pa.Table:
    """Drop rows already received (a batch redone after a worker died), remembering the new ones."""
    paths = batch.column("path").to_pylist()
    fresh = [path not in seen for path in paths]
    seen.update(paths)
    return batch if all(fresh) else batch.filter(pa.array(fresh))


def _flush_quietly(writer: RunWriter) -> None:
    """Keep what was done when the run fails; a second failure (disk full) must not hide the first."""
    with contextlib.suppress(OSError):
        writer.flush()


def _finish(path: Path, manifest: Manifest, report) -> None:
    manifest.finished_at = runs.now_iso()
    with contextlib.suppress(OSError):  # the folder itself is failing; the caller still sees the status
        report(force=True)


def resume(path: Path, on_progress: ProgressCallback | None = None, address: str | None = None, engine: str | None = None) -> Manifest:
    """Finish an interrupted, failed or cancelled run, predicting only what it lacks.

    ``address`` moves the rest of the run to another Ray cluster (``local`` for this machine),
    for when the one it started on has gone away; ``engine`` overrides the run's.
    """
    manifest = runs.read_manifest(path)
    if manifest.status == "running":
        raise UserError(f"run {manifest.run_id} is still running (pid {manifest.pid} on {manifest.host})")
    if manifest.status == "complete":
        raise UserError(f"run {manifest.run_id} is already complete")
    (path / runs.CANCEL_REQUEST).unlink(missing_ok=True)
    manifest.resumed += 1
    if address:
        manifest.params.address = address
        if engine is None and manifest.params.engine == "local":
            manifest.params.engine = "auto"  # moved to a cluster: auto picks Ray there
    if engine:
        manifest.params.engine = engine
    params = manifest.params
    check_engine(params.engine, params.address, params.num_gpus)
    runs.write_manifest(path, manifest)
    return execute(path, on_progress)


def run(request: RunRequest, on_progress: ProgressCallback | None = None) -> tuple[Path, Manifest]:
    path, source = start(request)
    return path, execute(path, on_progress, source)
