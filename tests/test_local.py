"""The local engine: real worker processes with the real embedded model on real images, killed for real."""

import contextlib
import dataclasses
import itertools
import os
import subprocess
import sys
import threading

import numpy as np
import psutil
import pyarrow as pa
import pytest

from pipeline import local, runs
from pipeline.errors import UserError
from pipeline.inference import PredictorOptions
from pipeline.models import ModelSpec, describe
from pipeline.runner import RunRequest, execute, run, start
from pipeline.sources import open_source

from .conftest import cli_env


def fork_servers() -> list[psutil.Process]:
    """This test process's fork server (one at most), which the pools' workers fork from. One just started
    may not have reached its exec yet, its command line still this process's: the standard library's
    own counts by its pid."""
    from multiprocessing import forkserver

    started = forkserver._forkserver._forkserver_pid
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            ours = child.pid == started or "multiprocessing.forkserver" in " ".join(child.cmdline())
            if ours and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def workers() -> list[psutil.Process]:
    """This test process's pool workers (not multiprocessing's resource tracker, nor the fork server)."""
    found = []
    for server in fork_servers():
        with contextlib.suppress(psutil.Error):
            found += [worker for worker in server.children() if worker.status() != psutil.STATUS_ZOMBIE]
    return found


def inputs_of(folder) -> pa.Table:
    paths = sorted(str(p) for p in folder.rglob("*.JPEG"))
    return pa.table({"path": paths, "ground_truth": [None] * len(paths)})


def options_for(folder) -> PredictorOptions:
    return PredictorOptions(describe(ModelSpec()), threads=1, source=open_source(str(folder)))


def test_local_and_ray_engines_give_the_same_predictions(small_folder, tmp_path):
    rows = {}
    for engine in ("local", "ray"):
        local.prestart(["run"])  # as `python -m pipeline run` does: the local run forks from it, the Ray run stops it
        path, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path / engine), batch_size=4, engine=engine))
        assert manifest.status == "complete" and manifest.engine == engine
        assert not workers() and (engine == "local" or not fork_servers())
        rows[engine] = {row["path"]: row for row in runs.read_predictions(path).to_pylist()}
    assert rows["local"].keys() == rows["ray"].keys() and len(rows["local"]) == 9
    for image, row in rows["local"].items():
        other = rows["ray"][image]
        assert row["topk_labels"] == other["topk_labels"]
        assert row["topk_scores"] == pytest.approx(other["topk_scores"], abs=1e-5)
        assert row["label_set_scores"] == pytest.approx(other["label_set_scores"], abs=1e-5)


@pytest.mark.parametrize(("rows", "block_rows", "workers"), [(3925, 64, 2), (1000, 64, 8), (9, 1, 2), (10, 3, 2), (100, 64, 1)])
def test_blocks_cover_every_row_once_and_shrink_at_the_end_so_workers_finish_together(rows, block_rows, workers):
    planned = local.blocks(rows, block_rows, workers, granule=4)
    assert [start for start, _ in planned] == list(itertools.accumulate([0] + [size for _, size in planned[:-1]]))
    assert sum(size for _, size in planned) == rows and all(0 < size <= block_rows for _, size in planned)
    sizes = [size for _, size in planned]
    if workers == 1:
        assert set(sizes[:-1]) <= {block_rows}  # one worker waits for no other: whole blocks
    elif block_rows >= 16:
        whole = max(0, rows - 2 * workers * block_rows) // block_rows  # blocks before they start to shrink
        assert sizes[:whole] == [block_rows] * whole and sizes == sorted(sizes, reverse=True)
        assert sizes[-2] == 4 and all(size % 4 == 0 for size in sizes[:-1])  # whole micro-batches, down to one


def test_a_worker_killed_mid_run_is_replaced_and_every_image_is_predicted_once(small_folder, tmp_path):
    path, _ = start(RunRequest(data=str(small_folder), out=str(tmp_path), batch_size=1, engine="local"))
    killed = []

    def kill_one_worker(progress):
        if progress.counts.done and not killed:
            killed.append(workers()[0].pid)
            psutil.Process(killed[0]).kill()

    manifest = execute(path, kill_one_worker)
    assert killed and manifest.status == "complete"
    paths = runs.read_predictions(path).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 9 == manifest.counts.predicted and manifest.counts.failed == 0


def test_a_batch_that_kills_its_worker_every_time_comes_back_as_error_rows(small_folder, tmp_path):
    """A real photo with 512 MiB of (sparse) zeros after it: the worker takes a while to read it, and is
    killed while it has it open, so the batch kills its worker in the first pool and then alone, every time."""
    heavy = tmp_path / "heavy.jpg"
    heavy.write_bytes(next(small_folder.rglob("*.JPEG")).read_bytes())
    with heavy.open("r+b") as file:
        file.truncate(512 * 2**20)
    inputs = pa.table({"path": [str(heavy)], "ground_truth": [None]})
    done = threading.Event()

    def kill_workers_reading_it():
        while not done.is_set():
            for worker in workers():
                with contextlib.suppress(psutil.Error):
                    if any(f.path == str(heavy) for f in worker.open_files()):
                        worker.kill()
            done.wait(0.002)

    killer = threading.Thread(target=kill_workers_reading_it, daemon=True)
    killer.start()
    try:
        rows = pa.concat_tables(local.predictions(inputs, options_for(tmp_path), 1, 1, lambda: False)).to_pylist()
    finally:
        done.set()
        killer.join()
    assert len(rows) == 1 and rows[0]["path"] == str(heavy) and rows[0]["label"] is None
    assert f"a worker process died {local.MAX_WORKER_DEATHS} times predicting this batch" in rows[0]["error"]


def die_as_it_starts(driver: int, started, environment, gpus, joined) -> None:
    os._exit(1)


def test_workers_that_die_before_they_start_are_one_clear_error(small_folder, monkeypatch):
    """Every worker dies before it has started: no retries, one error that says so."""
    monkeypatch.setattr(local, "_start_worker", die_as_it_starts)
    with pytest.raises(UserError, match="worker processes died while starting"):
        list(local.predictions(inputs_of(small_folder), options_for(small_folder), 1, 4, lambda: False))


def test_stopping_ends_the_run_early_and_no_worker_outlives_it(small_folder):
    inputs = inputs_of(small_folder)
    seen = []
    for block in local.predictions(inputs, options_for(small_folder), 2, 1, lambda: True):
        seen.append(block.num_rows)
        assert workers()  # still running while blocks come back
    assert seen == [1] or seen == [1, 1]  # the first wait may return both workers' first blocks
    assert not workers()


def test_a_model_that_cannot_load_in_the_workers_is_one_clear_error(small_folder, tmp_path):
    missing = tmp_path / "gone.pt"
    info = describe(ModelSpec())
    info = dataclasses.replace(info, spec=ModelSpec("custom", checkpoint=str(missing)), weights_path=str(missing))
    options = PredictorOptions(info, threads=1, source=open_source(str(small_folder)))
    with pytest.raises(UserError, match=r"the model could not be loaded in a worker process: .*gone\.pt"):
        list(local.predictions(inputs_of(small_folder), options, 1, 4, lambda: False))
    assert not workers()


def test_this_machine_has_its_cpus_and_the_gpus_it_lets_this_process_see(monkeypatch):
    machine = local.machine()
    assert machine.cpus == len(psutil.Process().cpu_affinity()) and machine.gpus == len(local.gpu_ids())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local.machine().gpus == 0 and not local.has_gpu()


@pytest.mark.parametrize(
    ("cards", "visible", "gpus"),
    [
        (0, None, []),
        (0, "0,1", []),  # no driver, no GPU, whatever the variable says
        (2, None, ["0", "1"]),
        (4, "2,3", ["2", "3"]),
        (4, " 3 , GPU-8f6e", ["3", "GPU-8f6e"]),
        (2, "", []),
        (2, "-1", []),
        (4, "1,-1,2", ["1"]),  # CUDA reads up to the first entry that names no GPU
        (4, "1,,2", ["1"]),
    ],
)
def test_the_gpus_a_worker_may_be_given_are_the_visible_ones(cards, visible, gpus):
    assert local.visible_gpus(cards, visible) == gpus


def test_gpu_workers_take_the_gpus_in_turn_and_cpu_workers_see_none():
    """Each GPU worker's CUDA_VISIBLE_DEVICES names one GPU (torch reads it when CUDA starts, after the fork)."""
    pool, _ = local._new_pool(2, ["3", "5"])
    try:
        # each task holds its worker long enough that the other task goes to the other worker
        futures = [pool.submit(slow_environment, 2.0) for _ in range(2)]
        seen = dict(future.result(timeout=120) for future in futures)
    finally:
        local._kill(pool)
    assert sorted(seen.values()) == ["3", "5"]
    pool, _ = local._new_pool(1, [])
    try:
        assert pool.submit(slow_environment, 0.0).result(timeout=120)[1] == ""
    finally:
        local._kill(pool)


def test_workers_fork_with_torch_imported_by_a_server_that_paused_the_collector_meanwhile():
    """The fork server imports torch with the collector paused (``preload``): its workers inherit its count
    of collections (torch's import alone triggers hundreds), and must find the collector running again,
    or their cycles would pile up; what the import made is frozen, out of every collection's way."""
    import gc

    pool, _ = local._new_pool(1, [])
    try:
        # gc's own functions first: a function of this module would import it (and pytest) in the worker,
        # and that import's collections would count too
        stats, enabled, frozen = (pool.submit(call).result(timeout=120) for call in (gc.get_stats, gc.isenabled, gc.get_freeze_count))
        modules = pool.submit(imported_modules).result(timeout=120)
    finally:
        local._kill(pool)
    assert {"torch", "pipeline.inference"} <= modules
    collections = sum(generation["collections"] for generation in stats)
    assert enabled and collections < 300  # 436 with the collector running through the import, 22 paused
    assert frozen > 100_000  # torch's import makes ~276,000 objects


def imported_modules() -> set[str]:
    return {name for name in sys.modules if name in ("torch", "pipeline.inference")}


def slow_environment(seconds: float) -> tuple[int, str | None]:
    import time

    time.sleep(seconds)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("gpus, overlap", [(["0"], False), (["0", "1"], True)])
def test_workers_sharing_a_gpu_take_turns_on_it(gpus, overlap):
    """Two workers on one GPU hold its turn one at a time; on two GPUs, each holds its own."""
    pool, _ = local._new_pool(2, gpus)
    try:
        futures = [pool.submit(hold_the_gpu_turn, 1.0) for _ in range(4)]
        held = sorted(future.result(timeout=120) for future in futures)
    finally:
        local._kill(pool)
    assert len({pid for _, _, pid in held}) == 2  # both workers held it
    overlapping = any(later_start < end for (_, end, _), (later_start, _, _) in itertools.pairwise(held))
    assert overlapping == overlap


def hold_the_gpu_turn(seconds: float) -> tuple[float, float, int]:
    import time

    with local._gpu_turn:
        began = time.monotonic()
        time.sleep(seconds)
        return began, time.monotonic(), os.getpid()


def test_gpu_workers_each_have_their_share_of_the_cpus_decode_for_them():
    assert local.decoders_per_worker(16, 2) == 8 and local.decoders_per_worker(96, 16) == 6 and local.decoders_per_worker(2, 8) == 1
    # a big machine's share is capped: forking each decoder delays the worker's first batch
    assert local.decoders_per_worker(256, 2) == local.MAX_DECODERS_PER_WORKER == 8


def test_decoders_decode_as_the_worker_itself_would_errors_included(small_folder):
    """A GPU worker's decoding processes write the crops into memory they share with it: the same pixels
    and the same reasons for files that fail, block after block in the same memory."""
    from pipeline.inference import decode_batch

    (small_folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff not really a JPEG")
    paths = [str(p) for p in sorted(small_folder.rglob("*.JPEG"))]
    source, preprocessing = open_source(str(small_folder)), describe(ModelSpec()).preprocessing
    decoders = local.Decoders(source, preprocessing, len(paths), processes=4)
    try:
        for block in (paths, paths[::-1][3:]):  # the second, shorter block overwrites the first one's crops
            truths = [f"truth of {path}" for path in block]
            batch = {"path": np.array(block, dtype=object), "ground_truth": np.array(truths, dtype=object)}
            decoded = decoders.decode(batch)
            expected = decode_batch(batch, source, preprocessing)
            assert decoded["image"].shape == expected["image"].shape and (decoded["image"] == expected["image"]).all()
            assert decoded["error"].tolist() == expected["error"].tolist() and sum(map(bool, decoded["error"])) == 1
            assert decoded["path"].tolist() == block and decoded["ground_truth"].tolist() == truths
            processes = {process.pid for process in decoders.pool._processes.values()}
            assert len(processes) == 4 and os.getpid() not in processes
    finally:
        decoders.close()


DYING_DECODER = """
import os, signal, sys
import numpy as np
from pipeline import local
from pipeline.models import ModelSpec, describe
from pipeline.sources import open_source

decoders = local.Decoders(open_source({folder!r}), describe(ModelSpec()).preprocessing, 4, processes=2)
print(*[process.pid for process in decoders.pool._processes.values()], flush=True)
if sys.argv[1] == "kill-a-decoder":
    os.kill(next(iter(decoders.pool._processes)), signal.SIGKILL)
    decoders.decode({{"path": np.array({paths!r}, dtype=object), "ground_truth": np.array([None] * 4, dtype=object)}})
    print("decoded without it")
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("killed", ["kill-a-decoder", "kill-the-worker"])
def test_a_worker_and_its_decoders_die_together(small_folder, killed):
    """A decoder that dies takes its worker with it, for the driver to find the block that kills
    workers; a worker that dies, killed by the driver at the end of every run, takes its decoders."""
    paths = [str(p) for p in sorted(small_folder.rglob("*.JPEG"))][:4]
    script = DYING_DECODER.format(folder=str(small_folder), paths=paths)
    worker = subprocess.run([sys.executable, "-c", script, killed], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert worker.returncode == (1 if killed == "kill-a-decoder" else -9), worker.stderr
    assert "decoded without it" not in worker.stdout
    decoders = [int(pid) for pid in worker.stdout.split()]
    assert len(decoders) == 2
    for pid in decoders:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)  # gone within seconds, or this raises TimeoutExpired


@pytest.mark.skipif(local.has_gpu(), reason="this machine has a GPU: its workers would use it")
def test_a_gpu_worker_without_a_gpu_fails_the_run_in_one_line_instead_of_crawling_on_a_cpu(small_folder):
    on_gpu = dataclasses.replace(options_for(small_folder), device="cuda")
    with pytest.raises(UserError, match=r"the model could not be loaded in a worker process: .*(CUDA|NVIDIA|GPU)"):
        list(local.predictions(inputs_of(small_folder), on_gpu, 1, 4, lambda: False, ["0"]))


SCRIPT = """
from pipeline.runner import RunRequest, run

def main():
    print(run(RunRequest(data={data!r}, out={out!r}, engine="local"))[1].status)
"""


def test_a_script_that_runs_the_local_engine_unguarded_gets_the_fix_in_its_error(small_folder, tmp_path):
    """A spawned worker imports the script that started it: unguarded, the script runs again there."""
    script = tmp_path / "classify.py"
    script.write_text(SCRIPT.format(data=str(small_folder), out=str(tmp_path / "runs")) + "\nmain()\n")
    unguarded = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert unguarded.returncode != 0 and "worker processes died while starting" in unguarded.stderr
    assert 'needs `if __name__ == "__main__":` around it' in unguarded.stderr.strip().splitlines()[-1]
    script.write_text(SCRIPT.format(data=str(small_folder), out=str(tmp_path / "runs")) + '\nif __name__ == "__main__":\n    main()\n')
    guarded = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert guarded.returncode == 0 and guarded.stdout.strip() == "complete", guarded.stderr


WORKER = """
import multiprocessing, os, sys
from pipeline import local
from pipeline.inference import PredictorOptions
from pipeline.models import ModelSpec, describe
from pipeline.sources import open_source

options = PredictorOptions(describe(ModelSpec()), threads=1, source=open_source({folder!r}))
local._start_worker(os.getppid(), multiprocessing.Value("i", 0), dict(os.environ), [], [], multiprocessing.Value("i", 0))
predictions = local._predict(options, 0, {paths!r}, [None] * {count})
print(sum(error is None for error in predictions.errors), *sorted(m for m in ("pandas", "pyarrow.compute", "ray") if m in sys.modules))
"""


def test_a_worker_predicts_without_importing_pandas_pyarrow_compute_or_ray(small_folder):
    """pyarrow imports pandas to make its first array (0.26 s of a worker's start): workers send plain arrays.
    Flattening an Arrow array imports pyarrow.compute (20 ms): a worker lends Pillow's pixels without it."""
    paths = [str(p) for p in sorted(small_folder.rglob("*.JPEG"))]
    script = WORKER.format(folder=str(small_folder), paths=paths, count=len(paths))
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.split() == [str(len(paths))]


@pytest.mark.parametrize(
    ("argv", "here"),
    [
        (["run", "--data", "images"], True),
        (["run", "--engine", "local", "--limit", "5"], True),
        (["run", "--engine=auto"], True),
        (["run", "--engine", "ray"], False),
        (["run", "--engine=ray"], False),
        (["run", "--address", "ray://head:10001"], False),
        (["run", "--num-gpus", "1"], local.has_gpu()),  # none here: Ray says so
        (["resume", "runs/x"], False),
        (["preview"], False),
    ],
)
def test_only_a_run_on_this_machine_starts_its_workers_early(argv, here, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert local._runs_here(argv) == here
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert not local._runs_here(argv)


def test_a_run_asked_for_local_workers_starts_them_early_even_with_gpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert local._runs_here(["run", "--engine", "local", "--num-gpus", "0.5"])
    assert not local._runs_here(["run", "--engine", "local", "--engine", "ray"])  # the last one counts, as argparse reads it


def test_prestart_starts_the_fork_server_that_a_run_forks_its_workers_from(small_folder, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local.stop_fork_server()
    local.prestart(["preview"])
    assert not fork_servers()
    local.prestart(["run"])
    [server] = fork_servers()
    seen = set()
    for _ in local.predictions(inputs_of(small_folder), options_for(small_folder), 2, 1, lambda: False):
        seen |= {worker.pid for worker in workers()}
        assert fork_servers() == [server]
    assert len(seen) == 2 and not workers()
    local.stop_fork_server()
    assert not fork_servers() and not server.is_running()


@pytest.mark.parametrize("death", ["before the run", "as it forks a worker"])
def test_a_fork_server_that_died_is_replaced_and_the_run_completes(small_folder, death):
    inputs, options = inputs_of(small_folder), options_for(small_folder)
    assert sum(block.num_rows for block in local.predictions(inputs, options, 1, 4, lambda: False)) == 9
    [server] = fork_servers()
    if death == "before the run":
        server.kill()
        os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOWAIT)  # dead, and not reaped here: as the OOM killer would leave it
    else:
        server.suspend()  # found alive, it takes the request to fork a worker and does not answer...
        threading.Timer(0.5, server.kill).start()  # ...then dies with it unanswered
    assert sum(block.num_rows for block in local.predictions(inputs, options, 1, 4, lambda: False)) == 9
    assert len(fork_servers()) == 1 and fork_servers()[0].pid != server.pid


def test_workers_take_the_drivers_environment_as_their_pool_starts(monkeypatch):
    """The fork server keeps the environment it started with; a key set since (credentials) reaches the workers."""
    first, _ = local._new_pool(1, [])
    try:
        assert first.submit(os.getenv, "PIPELINE_TEST_SETTING").result(timeout=120) is None  # the fork server now runs
    finally:
        local._kill(first)
    monkeypatch.setenv("PIPELINE_TEST_SETTING", "set since")
    second, _ = local._new_pool(1, [])
    try:
        assert second.submit(os.getenv, "PIPELINE_TEST_SETTING").result(timeout=120) == "set since"
    finally:
        local._kill(second)


@pytest.mark.skipif(not local.has_gpu(), reason="needs an NVIDIA GPU (none here)")
def test_local_workers_run_on_this_machines_gpu_and_answer_like_its_cpus(small_folder, tmp_path):
    on_gpu, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path)))  # auto: a small run stays here
    assert manifest.status == "complete" and manifest.counts.predicted == 9 and manifest.engine == "local"
    assert manifest.device.startswith("1× CUDA worker process(es), fp32, batch 512, on this machine")
    on_cpus, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path), engine="local", num_gpus=0.0))
    assert manifest.device.startswith("1× CPU worker process(es)")
    gpu, cpu = (runs.read_predictions(path, columns=["path", "label"]).sort_by("path") for path in (on_gpu, on_cpus))
    assert gpu.column("path").equals(cpu.column("path"))
    assert sum(a == b for a, b in zip(gpu.column("label").to_pylist(), cpu.column("label").to_pylist(), strict=True)) >= 8
