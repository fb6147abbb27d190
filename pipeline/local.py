"""Runs on this machine's CPUs (or GPUs) without Ray: worker processes that each hold a ``Predictor``.

On one machine's CPUs the work is laid out as on Ray (one single-threaded worker per CPU, up to
eight, each reading and decoding its own batches of paths), but Ray's start costs seconds of CPU
before the first prediction: its own processes, Ray Data's helper actors, and actors that import
``ray.data`` before they import torch. On 2 cores, over Imagenette's 3,925 images, a run went from
24–29 s on Ray to 20.5 s this way (efficientnet_lite0), and from 106 s to 91 s (resnet50). With
``gpus``, the workers are laid out as Ray's GPU actors are (two per GPU), each given one GPU and
processes of its own that read and decode its batches (``Decoders``).

Workers fork from a server process that imported torch and this package's model code once (~0.9 s
of a core, ``preload``), instead of each importing them. ``python -m pipeline run`` starts that server first
thing (``prestart``), so that its import overlaps the CLI's own imports and its listing of the inputs;
a worker loads the model from the first block's options. This module's imports stay light for that:
the rest are made where used.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import select
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from functools import partial
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import TYPE_CHECKING

from . import cluster
from .cluster import LOCAL, ClusterInfo
from .errors import UserError, one_line

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Lock

    import numpy as np
    import pyarrow as pa

    from .inference import Predictions, Predictor, PredictorOptions
    from .preprocess import Preprocessing
    from .sources import Source

# CPU workers (local, or Ray's CPU actors) are single-threaded, one per CPU, up to this many (each holds its
# own copy of the model); beyond it, they get more threads. On 2 cores, two 1-thread actors against one
# 2-thread actor: resnet50 forward pass 12.2-12.5 against 10.9 img/s; whole runs steady 61-66 against 53-55
# img/s (efficientnet_lite0) and 14.8-15.2 against 12.3-12.8 (resnet50); on a 2-core AVX-512 EPYC, forward
# pass 280-285 against 243-248 img/s (efficientnet_lite0) and 46.1-46.4 against 43-45 (resnet50). Intra-op
# threads wait for each other at every layer, and any other process that preempts one stalls both.
MAX_CPU_ACTORS = 8

BLOCKS_PER_WORKER = 2  # in flight: one being predicted, one waiting, so a worker never idles between blocks
WORKER_IMPORTS = [f"{__package__}.preload"]  # what the fork server imports once for every worker
# A GPU worker's decoding processes, at most: 16 a GPU decode ~55,000 Imagenette images/s (one core decodes
# ~3,700 with ResNet-152's preprocessing, 2-core VM), ~10x ResNet-152's forward pass on an H100. Each is
# forked from the worker (~8 ms a fork of a process that imported torch, same VM): a 256-CPU machine's
# share, 128 a worker, would cost each worker a second before its first batch, for decoding no GPU waits on.
MAX_DECODERS_PER_WORKER = 8
MAX_WORKER_DEATHS = 3  # deaths of a worker predicting a block alone, before the block's images are listed as failed

# The likeliest cause of workers that die before they have started, besides memory: a worker (forked from
# the fork server, or spawned) imports the script that started it, and a script that calls ``runner.run``
# unguarded runs it again there.
STARTING_HINT = '; a script that calls pipeline.runner needs `if __name__ == "__main__":` around it'

_predictor: Predictor | None = None  # the worker process's own, loaded by its first block
_decoders: Decoders | None = None  # a GPU worker's, started by its first block
_gpu_turn: Lock | None = None  # a GPU worker's: held while its GPU runs its batch (``Classifier.top_k``)
_decoding: tuple[Source, Preprocessing, np.ndarray] | None = None  # in a decoder: where its chunks go


def machine() -> ClusterInfo:
    """The CPUs this process may run on (its affinity, as a container or ``taskset`` sets it), and its GPUs."""
    cpus = float(len(os.sched_getaffinity(0)))
    return ClusterInfo(LOCAL, cpus, float(len(gpu_ids())), cpus)


def can_run(address: str | None, gpus_asked: bool) -> bool:
    """Whether local workers can take a run: on this machine (no Ray cluster's address), with a GPU here
    if GPUs are asked for (where none is, Ray says so). ``auto`` then also counts the images (``runner``)."""
    return cluster.resolve_address(address) == LOCAL and not (gpus_asked and not has_gpu())


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible here, found without importing torch (seconds) or starting Ray."""
    return bool(gpu_ids())


def gpu_ids() -> list[str]:
    """The NVIDIA GPUs visible here, as ``CUDA_VISIBLE_DEVICES`` names them (indices, or the UUIDs it may
    list), found without importing torch (seconds): a GPU worker is given one of them as its only GPU."""
    # the device nodes first: a container is given only its GPUs' nodes, where the driver's list may show every GPU
    cards = len(list(Path("/dev").glob("nvidia[0-9]*"))) or len(list(Path("/proc/driver/nvidia/gpus").glob("*")))
    return visible_gpus(cards, os.environ.get("CUDA_VISIBLE_DEVICES"))


def visible_gpus(cards: int, visible: str | None) -> list[str]:
    """Of ``cards`` GPUs, those ``CUDA_VISIBLE_DEVICES`` leaves visible, read as CUDA reads it: up to the
    first entry that names no GPU ("-1", or nothing)."""
    if not cards or visible is None:
        return [str(index) for index in range(cards)]
    names = []
    for name in visible.split(","):
        if name.strip() in ("", "-1"):
            break
        names.append(name.strip())
    return names


def decoders_per_worker(cpus: float, workers: int) -> int:
    """Decoding processes for each GPU worker: its share of the CPUs, up to ``MAX_DECODERS_PER_WORKER``.
    The workers sharing a GPU take turns on it, so while one runs its batch the other's decoders have the
    CPUs to themselves."""
    return max(1, min(MAX_DECODERS_PER_WORKER, int(cpus // workers)))


def _die_with(owner: int) -> None:
    """End this process when ``owner`` ends, even killed outright (no clean-up of its own runs then): an
    orphaned worker would wait for work forever, holding its model's memory. A worker watches the driver
    itself: its parent is the fork server, which lives on as long as any worker does."""
    try:
        ended = os.pidfd_open(owner)  # readable once the owner has ended
    except ProcessLookupError:  # it has already
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3 or later): the worker is not watched
        return
    threading.Thread(target=_exit_when_readable, args=(ended,), daemon=True).start()


def _exit_when_readable(handle: int) -> None:
    select.select([handle], [], [])
    os._exit(1)


def _start_worker(
    driver: int, started: Synchronized, environment: dict[str, str], gpus: list[str], turns: list[Lock], joined: Synchronized
) -> None:
    """Take the driver's environment as it was when the pool started (the fork server keeps the one it
    started with: keys set since then would be missing) and this worker's GPU (the next of ``gpus`` in
    turn, none for CPU workers) with its lock (``turns``: one per GPU), import what predicting needs before
    any block arrives (the fork server has, unless it could not: the error then shows here), then count
    this worker started."""
    global _gpu_turn
    _die_with(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the run and these workers
    os.environ.clear()
    os.environ.update(environment)
    with joined.get_lock():
        turn = joined.value
        joined.value += 1
    # torch reads it when CUDA first starts, here after the fork: the fork server never starts CUDA
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[turn % len(gpus)] if gpus else ""
    _gpu_turn = turns[turn % len(gpus)] if gpus else None
    import torch  # noqa: F401

    from . import inference

    # A worker only runs batches, with the same big buffers every batch (a GPU worker's 512 crops are
    # 77 MB): kept for the next batch instead of mapped and faulted in again. CPU workers' Predictors ask
    # for this anyway, as Ray's CPU actors' do; for a GPU worker's decoding (512-image batches on 2 threads,
    # five interleaved pairs here) it took page faults from 0.8 an image to none, median 3,771 against 3,631 img/s.
    # A GPU worker's decoders, forked from it, keep it too.
    inference.keep_freed_memory()
    with started.get_lock():
        started.value += 1


def _predict(options: PredictorOptions, decoders: int, paths: list[str], truths: list[str | None]) -> Predictions:
    """A block's predictions, read and decoded by the worker itself, or with ``decoders`` by that many
    processes of its own (``Decoders``)."""
    global _predictor, _decoders
    import numpy as np

    if decoders and (_decoders is None or _decoders.capacity < len(paths)):  # rare: blocks shrink as a run goes
        if _decoders is not None:
            _decoders.close()
        _decoders = Decoders(options.source, options.info.preprocessing, len(paths), decoders)
    if _predictor is None:
        from .inference import Predictor

        try:
            _predictor = Predictor(replace(options, source=None) if decoders else options, _gpu_turn)
        except Exception as error:
            raise UserError(f"the model could not be loaded in a worker process: {one_line(error)}") from None
    batch = {"path": np.array(paths, dtype=object), "ground_truth": np.array(truths, dtype=object)}
    return _predictor.predict(_decoders.decode(batch) if decoders else batch)


class Decoders:
    """A GPU worker's processes that read and decode its blocks into memory shared with it, so that only
    the crops' place crosses between them. Threads could not do this: on an H100 machine's 16 CPUs, 16
    decoding threads in each of two workers decoded a block at ~1,770 img/s, one core's worth (the Python
    between the C calls holds the GIL), and ResNet-152 ran at 2,085 img/s against the GPU's 5,607."""

    def __init__(self, source: Source, preprocessing: Preprocessing, capacity: int, processes: int):
        import mmap

        import numpy as np

        global _decoding
        crop = preprocessing.crop
        self.capacity, self.processes = capacity, processes
        self.memory = mmap.mmap(-1, capacity * crop * crop * 3)  # anonymous and shared: the forked decoders write here
        self.images = np.frombuffer(self.memory, np.uint8).reshape(capacity, crop, crop, 3)
        _decoding = (source, preprocessing, self.images)  # the decoders find it forked, not pickled
        # forked, not from the fork server: they must share this process's memory
        self.pool = ProcessPoolExecutor(processes, multiprocessing.get_context("fork"), _die_with, (os.getpid(),))
        # The first task forks them all, now: before the model is loaded, the first time, so before CUDA starts
        self.pool.submit(int)

    def decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A block of paths decoded, as ``inference.decode_batch`` gives it; its crops are a view of the
        shared memory, good until the next block."""
        import numpy as np

        paths = batch["path"].tolist()
        bounds = [len(paths) * part // self.processes for part in range(self.processes + 1)]
        chunks = [(start, paths[start:stop]) for start, stop in itertools.pairwise(bounds) if stop > start]
        errors = [""] * len(paths)
        try:
            for future in [self.pool.submit(_decode_chunk, start, chunk) for start, chunk in chunks]:
                for row, error in future.result():
                    errors[row] = error
        except BrokenProcessPool:
            # A decoder died (killed for memory, a crash in a decoder): so does this worker, and the driver
            # finds which block kills its workers, as it does for workers that decode their own blocks.
            os._exit(1)
        return {**batch, "image": self.images[: len(paths)], "error": np.array(errors, dtype=object)}

    def close(self) -> None:
        _kill(self.pool)


def _decode_chunk(start: int, paths: list[str]) -> list[tuple[int, str]]:
    """In a decoder: decode ``paths`` into the shared crops from row ``start``; the rows that failed, and why."""
    from .inference import decode_into

    source, preprocessing, images = _decoding
    errors = decode_into(images[start : start + len(paths)], paths, source, preprocessing)
    return [(start + row, error) for row, error in enumerate(errors) if error]


def _new_pool(workers: int, gpus: list[str]) -> tuple[ProcessPoolExecutor, Synchronized]:
    """A pool of ``workers`` processes, spread over ``gpus`` in turn (none: CPU workers), and its count of
    workers that got through ``_start_worker``."""
    context = _context()
    started, joined = context.Value("i", 0), context.Value("i", 0)
    turns = [context.Lock() for _ in gpus]  # a worker that dies holding one breaks the pool, and its locks go with it
    initargs = (os.getpid(), started, dict(os.environ), gpus, turns, joined)
    return ProcessPoolExecutor(workers, context, _start_worker, initargs), started


def _context() -> BaseContext:
    """Workers forked from the fork server (started on first use, and again if it died), or spawned where
    there is none (Windows). Forked, two workers are ready ~0.3 s sooner after the command starts, on 2
    cores, where the CLI imports its own modules meanwhile (efficientnet_lite0, 1,000 images: 5.23 s
    against 5.60, medians of eight interleaved pairs)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_IMPORTS)
    return context


def prestart(argv: list[str]) -> None:
    """Start the fork server for a ``run`` command line now, if it will likely run in local workers, so
    that its import of torch overlaps the CLI's. A run that goes to Ray stops it before Ray starts
    (``stop_fork_server``), so a command line misread here costs CPU for a moment, not a wrong run."""
    if _runs_here(argv) and _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _runs_here(argv: list[str]) -> bool:
    """Whether ``run`` with these arguments likely goes to local workers: no Ray address, and ``--engine
    local``, or ``auto`` where local workers can take it (``can_run``, as ``runner.engine_for`` decides)."""
    if argv[:1] != ["run"]:
        return False
    engine, gpus_asked = "auto", False
    for i, arg in enumerate(argv):
        if arg.startswith("--address"):
            return False
        gpus_asked = gpus_asked or arg.startswith("--num-gpus")
        if arg.startswith("--engine"):
            engine = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
    if engine == "local":
        return cluster.resolve_address(None) == LOCAL
    return engine == "auto" and can_run(None, gpus_asked)


def stop_fork_server() -> None:
    """Kill the fork server, if one runs: a run that goes to Ray needs the CPU its import would take, and
    a command that has ended need not leave it to finish importing before it notices."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the standard library stops it only in its own tests, through these
    if server._forkserver_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server._forkserver_pid, signal.SIGKILL)
        server._stop()


Block = tuple[int, int]  # (first row, rows) of the inputs


def blocks(rows: int, block_rows: int, workers: int, granule: int) -> list[Block]:
    """``block_rows`` at a time, then smaller and smaller blocks (guided self-scheduling: a ``2 × workers``-th
    of what is left, in whole micro-batches of ``granule``), so that the workers run out of work together
    instead of one idling through another's last full block (~0.4 s of a core, efficientnet_lite0 on 64 images)."""
    planned, start = [], 0
    while start < rows:
        left = rows - start
        size = block_rows
        if workers > 1:
            share = max(granule, -(-left // (2 * workers)))
            size = min(block_rows, -(-share // granule) * granule)
        planned.append((start, min(left, size)))
        start += size
    return planned


def _block(inputs: pa.Table, block: Block) -> tuple[list[str], list[str | None]]:
    """A block's paths and ground truths as lists: a pickled Arrow slice would carry the whole table."""
    rows = inputs.slice(*block)
    return rows.column("path").to_pylist(), rows.column("ground_truth").to_pylist()


def predictions(
    inputs: pa.Table, options: PredictorOptions, workers: int, block_rows: int, stop: Callable[[], bool], gpus: Sequence[str] = ()
) -> Iterator[pa.Table]:
    """Prediction rows (and error rows) for ``inputs``, block by block as the workers finish them, on
    CPUs, or with ``gpus`` (``gpu_ids``) shared by the workers in turn: each then asks for CUDA, and has
    its share of the CPUs read and decode for it (``Decoders``; threads, for files on a network).

    At most ``BLOCKS_PER_WORKER`` blocks per worker are in flight, so memory does not grow with the
    dataset. ``stop`` is checked as each block comes back. A worker that dies (killed for memory, a
    crash in a decoder) breaks the pool, and a new pool takes over. The blocks that were in flight then
    become suspects, predicted one at a time: one that still kills its worker alone is the cause, and
    comes back as error rows at its ``MAX_WORKER_DEATHS``-th death, so a run always ends and no other
    block shares its fate. However the iteration ends, the workers are killed: they hold nothing to
    save, and a worker left to exit by itself spends seconds tearing down torch on CPUs the next run may need.
    """
    from .inference import cpu_micro_batch

    decoders = 0
    if gpus:  # torch's CPU work is small beside the GPU's: the CPUs read and decode
        options = replace(options, threads=1, device="cuda")
        # A network's reads wait, on threads (``REMOTE_READ_THREADS``); and a forked decoder would inherit
        # the worker's S3 client (the AWS SDK's threads are not forked with it)
        if options.source is not None and options.source.scheme == "file":
            decoders = decoders_per_worker(machine().cpus, workers)
    predict = partial(_predict, options, decoders)
    todo = deque(blocks(inputs.num_rows, block_rows, workers, cpu_micro_batch(options.threads or 1)))
    suspects: deque[Block] = deque()
    deaths: dict[Block, int] = {}
    idle_deaths = 0  # pools in a row that broke with no block in flight: no block to blame, so counted apart
    while todo or suspects:
        pool, started = _new_pool(workers, list(gpus))
        pending: dict[Future, Block] = {}
        try:
            while todo or suspects or pending:
                broken = None
                if suspects:
                    if not pending:
                        broken = _submit(pool, pending, inputs, predict, suspects[0])
                else:
                    while todo and len(pending) < BLOCKS_PER_WORKER * workers and broken is None:
                        broken = _submit(pool, pending, inputs, predict, todo[0])
                        if broken is None:
                            todo.popleft()
                done = wait(pending, return_when=FIRST_COMPLETED).done if pending else set()
                lost = []
                for future in done:
                    block = pending.pop(future)
                    try:
                        rows = future.result().rows()
                    except BrokenProcessPool as error:
                        lost.append(block)
                        broken = error
                        continue
                    if suspects and suspects[0] == block:
                        suspects.popleft()
                    idle_deaths = 0
                    yield rows
                if stop():
                    return
                if broken is not None:
                    if not started.value and not isinstance(broken, ForkServerDied):
                        raise UserError(f"worker processes died while starting ({one_line(broken)}){STARTING_HINT}")
                    in_flight = lost + list(pending.values())
                    idle_deaths = 0 if in_flight else idle_deaths + 1
                    if idle_deaths >= MAX_WORKER_DEATHS:
                        raise UserError(f"worker processes keep dying while idle ({one_line(broken)}); is this machine out of memory?")
                    if not suspects:
                        suspects.extend(sorted(in_flight))
                    elif suspects[0] in lost:  # it was alone in flight
                        yield from _count_death(inputs, suspects, deaths, broken)
                    break
        finally:
            _kill(pool)


def _submit(
    pool: ProcessPoolExecutor, pending: dict[Future, Block], inputs: pa.Table, predict: Callable, block: Block
) -> BrokenProcessPool | None:
    """Send a block to the pool; a pool that broke since the last wait (a worker died, busy or idle)
    refuses it, and the block was never sent. So does one whose fork server is found dead, or dying,
    as it forks a worker: that server is stopped, and the next pool starts a new one."""
    try:
        pending[pool.submit(predict, *_block(inputs, block))] = block
    except BrokenProcessPool as error:
        return error
    except (OSError, EOFError) as error:  # unexpected EOF, connection refused: no one answered for the server
        stop_fork_server()
        return ForkServerDied(f"the workers' fork server died: {one_line(error)}")
    return None


class ForkServerDied(BrokenProcessPool):
    """No worker is to blame: a new pool, with a new fork server, gets the blocks."""


def _count_death(inputs: pa.Table, suspects: deque[Block], deaths: dict[Block, int], error: Exception) -> Iterator[pa.Table]:
    """The first suspect killed its worker alone: at its ``MAX_WORKER_DEATHS``-th death, error rows."""
    from .inference import failure_rows

    block = suspects[0]
    deaths[block] = deaths.get(block, 0) + 1
    if deaths[block] >= MAX_WORKER_DEATHS:
        suspects.popleft()
        reason = f"a worker process died {MAX_WORKER_DEATHS} times predicting this batch ({one_line(error)})"
        yield failure_rows(*_block(inputs, block), reason)


def _kill(pool: ProcessPoolExecutor) -> None:
    processes = list((pool._processes or {}).values())  # Python 3.14 has pool.kill_workers() for this
    for process in processes:
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
