"""Runs on this machine's CPUs without Ray: worker processes that each hold a ``Predictor``.

On one machine's CPUs the work is laid out as on Ray (one single-threaded worker per CPU, up to
eight, each reading and decoding its own batches of paths), but Ray's start costs seconds of CPU
before the first prediction: its own processes, Ray Data's helper actors, and actors that import
``ray.data`` before they import torch. On 2 cores, over Imagenette's 3,925 images, a run went from
24–29 s on Ray to 20.5 s this way (efficientnet_lite0), and from 106 s to 91 s (resnet50).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import numpy as np
import pyarrow as pa

from .cluster import LOCAL, ClusterInfo
from .errors import UserError, one_line
from .inference import Predictions, Predictor, PredictorOptions, cpu_micro_batch, failure_rows

BLOCKS_PER_WORKER = 2  # in flight: one being predicted, one waiting, so a worker never idles between blocks
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent ends
MAX_WORKER_DEATHS = 3  # deaths of a worker predicting a block alone, before the block's images are listed as failed

# The likeliest cause of workers that die before they have started, besides memory: a spawned worker
# imports the script that started it, and a script that calls ``runner.run`` unguarded runs it again there.
STARTING_HINT = '; a script that calls pipeline.runner needs `if __name__ == "__main__":` around it'

_predictor: Predictor | None = None  # the worker process's own, loaded once by _start_worker
_start_failure: str | None = None


def machine() -> ClusterInfo:
    """The CPUs this process may run on (its affinity, as a container or ``taskset`` sets it); no GPUs."""
    cpus = float(len(os.sched_getaffinity(0)))
    return ClusterInfo(LOCAL, cpus, 0.0, cpus)


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible here, found without importing torch (seconds) or starting Ray."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(Path("/proc/driver/nvidia/gpus").glob("*")) or any(Path("/dev").glob("nvidia[0-9]*"))


def _die_with(driver: int) -> None:
    """End this worker when the driver ends, even killed outright (no clean-up of its own runs then):
    an orphaned worker would wait for work forever, holding its model's memory."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver:  # it died before that took effect
        os._exit(1)


def _start_worker(driver: int, started: Synchronized, options: PredictorOptions) -> None:
    global _predictor, _start_failure
    _die_with(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the run and these workers
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers, as Ray's are: a GPU run goes through Ray
    os.environ["OMP_NUM_THREADS"] = str(options.threads or 1)
    try:
        _predictor = Predictor(options)
    except Exception as error:  # reported with the first block, in one line, instead of a broken pool
        _start_failure = f"the model could not be loaded in a worker process: {one_line(error)}"
    with started.get_lock():
        started.value += 1


def _predict(paths: list[str], truths: list[str | None]) -> Predictions:
    if _predictor is None:
        raise UserError(_start_failure or "the worker process has no model")
    return _predictor.predict({"path": np.array(paths, dtype=object), "ground_truth": np.array(truths, dtype=object)})


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
    block = inputs.slice(*block)
    return block.column("path").to_pylist(), block.column("ground_truth").to_pylist()


def predictions(inputs: pa.Table, options: PredictorOptions, workers: int, block_rows: int, stop: Callable[[], bool]) -> Iterator[pa.Table]:
    """Prediction rows (and error rows) for ``inputs``, block by block as the workers finish them.

    At most ``BLOCKS_PER_WORKER`` blocks per worker are in flight, so memory does not grow with the
    dataset. ``stop`` is checked as each block comes back. A worker that dies (killed for memory, a
    crash in a decoder) breaks the pool, and a new pool takes over. The blocks that were in flight then
    become suspects, predicted one at a time: one that still kills its worker alone is the cause, and
    comes back as error rows at its ``MAX_WORKER_DEATHS``-th death, so a run always ends and no other
    block shares its fate. However the iteration ends, the workers are killed: they hold nothing to
    save, and a worker left to exit by itself spends seconds tearing down torch on CPUs the next run may need.
    """
    todo = deque(blocks(inputs.num_rows, block_rows, workers, cpu_micro_batch(options.threads or 1)))
    suspects: deque[Block] = deque()
    deaths: dict[Block, int] = {}
    idle_deaths = 0  # pools in a row that broke with no block in flight: no block to blame, so counted apart
    context = multiprocessing.get_context("spawn")
    while todo or suspects:
        started = context.Value("i", 0)  # workers of this pool that got through _start_worker
        pool = ProcessPoolExecutor(workers, context, _start_worker, (os.getpid(), started, options))
        pending: dict[Future, Block] = {}
        try:
            while todo or suspects or pending:
                broken = None
                if suspects:
                    if not pending:
                        broken = _submit(pool, pending, inputs, suspects[0])
                else:
                    while todo and len(pending) < BLOCKS_PER_WORKER * workers and broken is None:
                        broken = _submit(pool, pending, inputs, todo[0])
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
                    if not started.value:
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


def _submit(pool: ProcessPoolExecutor, pending: dict[Future, Block], inputs: pa.Table, block: Block) -> BrokenProcessPool | None:
    """Send a block to the pool; a pool that broke since the last wait (a worker died, busy or idle)
    refuses it, and the block was never sent."""
    try:
        pending[pool.submit(_predict, *_block(inputs, block))] = block
    except BrokenProcessPool as error:
        return error
    return None


def _count_death(inputs: pa.Table, suspects: deque[Block], deaths: dict[Block, int], error: Exception) -> Iterator[pa.Table]:
    """The first suspect killed its worker alone: at its ``MAX_WORKER_DEATHS``-th death, error rows."""
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
