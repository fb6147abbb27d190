"""Throughput and memory, in one invocation, on one folder and model:

(a) Ray's tutorial pipeline as written  (b) this project's pipeline as the CLI runs it (``--engine auto``:
    on this machine's CPUs, up to 20,000 images, local worker processes without Ray)
(r) the same run on Ray Data (``--engine ray``), what (b) is for bigger runs, GPUs and clusters
(c) the model's forward pass alone on pre-decoded crops, exactly as the project's workers run it
    (on a CPU: as many processes as the pipeline has workers, each with its threads, running the frozen
    graph on micro-batches, all at once), at the same batch size: the limit for (b)
(d) a plain PyTorch DataLoader loop with the same decoding and forward pass (a user's alternative)

Whole processes for (a), (b), (r), (d): start-up included, as a user experiences it. This VM's speed
drifts by tens of percent within minutes, so (b), (r), (c) and (d) run side by side in a mirrored order
(c b r d d r b c for ``--pairs 2``) and each is averaged: a ratio then compares runs made at the same
time, and a steady drift cancels. Every single measurement is printed too. The cache of frozen
graphs starts empty; a fresh process times its way to a first prediction while building the model's
graph (what a model's first run on a machine pays once), a second one loading it; (b) and (d) then
load it, as every later run does. Peak RSS is the largest sum over the process tree (driver plus
Ray's workers). Ratios are what to compare across machines. ``--rss-images 1000,10000`` also runs
(b) and (r) on the folder repeated (hard links) to each count and prints the peak of each, as summed RSS
and as summed PSS (shared pages counted once). Usage:

    python bench/throughput.py [--data DIR] [--models resnet50,efficientnet_lite0] [--batch-size 64] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "imagenette-val"

from pipeline.cache import CACHE_ENV  # noqa: E402
from pipeline.inference import Classifier, keep_freed_memory, plan, resolve_precision  # noqa: E402
from pipeline.models import describe, hub_checkpoint_path, parse_model  # noqa: E402
from pipeline.preprocess import decode  # noqa: E402
from pipeline.sources import list_images, open_source  # noqa: E402


class Measured(NamedTuple):
    seconds: float
    rss: float  # peak of the process tree's summed RSS, GiB: shared pages count once per process mapping them
    out: str
    pss: float = math.nan  # peak of its summed PSS, GiB (each shared page counted once), when tracked


def measure(command: list[str], env: dict, on_tick=None, track_pss: bool = False) -> Measured:
    """Wall seconds, peak memory of the whole process tree, stdout; ``on_tick`` is called every 0.2 s.

    PSS needs the kernel to walk every process's pages, so it is read once a second and only when
    asked for (a run whose workers share object-store pages: their RSS counts those pages again).
    """
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    ticks = 0
    while process.poll() is None:
        try:
            tree = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
            if track_pss and ticks % 5 == 0:
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        if on_tick:
            on_tick()
        ticks += 1
        time.sleep(0.2)
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed with exit {process.returncode}")
    return Measured(time.perf_counter() - began, peak_rss / 2**30, out, peak_pss / 2**30 if track_pss else math.nan)


def ensure_weights(model: str, torch_home: Path) -> bool:
    """Random weights under torchvision's file name when the real ones are not cached (speed does not
    depend on them); True when the weights are random."""
    import torch
    import torchvision

    spec = parse_model(model)
    if spec.name == "efficientnet_lite0" or describe(spec).available_offline:
        return False
    weights = torchvision.models.get_model_weights(spec.name)[spec.weights]
    os.environ["TORCH_HOME"] = str(torch_home)
    target = hub_checkpoint_path(weights.url)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.get_model(spec.name, weights=None).state_dict(), target)
    return True


def forward_only(model: str, files: list[str], batch_size: int, precision: str, actors: int, threads: int, seconds: float = 30.0) -> float:
    """img/s of the forward pass on pre-decoded uint8 crops as the project's actors run it (freed memory
    kept for the next batch, as theirs is): ``actors`` processes of ``threads`` threads each, timed over
    the same window, rates summed."""
    began = time.time() + 20 + 5 * actors  # every process has loaded its model and warmed up by then
    code = (
        "import sys, time, numpy as np; from pathlib import Path; from pipeline.inference import Classifier, keep_freed_memory; "
        "keep_freed_memory(); "
        "from pipeline.models import parse_model; from pipeline.preprocess import decode; "
        f"c = Classifier(parse_model({model!r}), device='cpu', precision={precision!r}, threads={threads}); "
        f"crops = np.stack([decode(Path(f).read_bytes(), c.preprocessing) for f in {files[:batch_size]!r}]); c.top_k(crops); "
        f"time.sleep(max(0.0, {began} - time.time())); n, t = 0, time.perf_counter()\n"
        f"while time.perf_counter() - t < {seconds}: c.top_k(crops); n += len(crops)\n"
        "print(n / (time.perf_counter() - t))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", code]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(actors)]
    return sum(float(process.communicate()[0]) for process in processes)


def eager_forward(model: str, files: list[str], batch_size: int, batches: int = 3) -> float:
    """img/s of the plain eager fp32 network on whole batches with every core, for context."""
    classifier = Classifier(parse_model(model), device="cpu", precision="fp32", threads=os.cpu_count(), fast_path=False)
    crops = np.stack([decode(Path(f).read_bytes(), classifier.preprocessing) for f in files[:batch_size]])
    classifier.top_k(crops)  # warm-up
    began = time.perf_counter()
    for _ in range(batches):
        classifier.top_k(crops)
    return batches * batch_size / (time.perf_counter() - began)


def first_prediction_s(model: str, env: dict, device: str = "cpu", threads: int | None = None) -> float:
    """Seconds from a fresh interpreter to the first micro-batch's answer, as a model actor gets there."""
    code = (
        "import time; began = time.perf_counter(); import numpy as np; from pipeline.inference import Classifier; "
        f"from pipeline.models import parse_model; c = Classifier(parse_model({model!r}), device={device!r}, threads={threads}); "
        "c.top_k(np.zeros((c.micro_batch or 8, c.preprocessing.crop, c.preprocessing.crop, 3), np.uint8)); "
        "print(time.perf_counter() - began)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout)


def bf16_fast_path(model: str, files: list[str], batch_size: int, images: int) -> tuple[float, float]:
    """Top-1 agreement of bf16 autocast with fp32 over ``images`` images, and bf16 forward img/s:
    the evidence for keeping fp32 on CPUs (bf16 only where agreement is at least 99%)."""
    spec = parse_model(model)
    fp32 = Classifier(spec, device="cpu", precision="fp32", threads=os.cpu_count())
    bf16 = Classifier(spec, device="cpu", precision="bf16", threads=os.cpu_count())
    agree, seconds = 0, 0.0
    files = files[:images]
    for start in range(0, len(files), batch_size):
        crops = np.stack([decode(Path(f).read_bytes(), fp32.preprocessing) for f in files[start : start + batch_size]])
        reference = fp32.top_k(crops, 1)[0][:, 0]
        began = time.perf_counter()
        fast = bf16.top_k(crops, 1)[0][:, 0]
        seconds += time.perf_counter() - began
        agree += int((fast == reference).sum())
    return agree / len(files), len(files) / seconds


def agreement(run_dir: Path, reference_dir: Path) -> float:
    def labels(path: Path) -> dict:
        table = pq.read_table(path / "predictions", columns=["path", "label"])
        return dict(zip(table.column("path").to_pylist(), table.column("label").to_pylist(), strict=True))

    ours, reference = labels(run_dir), labels(reference_dir)
    return float(np.mean([ours[p] == reference[p] for p in reference]))


def project_run(data: str, model: str, work: Path, env: dict, *extra: str, on_tick=None, track_pss: bool = False) -> tuple[Measured, Path]:
    """(b): ``python -m pipeline run`` as a user types it; returns its measurements and the run folder."""
    command = [sys.executable, "-m", "pipeline", "run", "--data", data, "--model", model, "--out", str(work / "runs"), *extra]
    measured = measure(command, env, on_tick, track_pss=track_pss)
    return measured, Path(measured.out.strip().splitlines()[-1])


def timed_project_run(data: str, model: str, work: Path, env: dict, run_id: str, *extra: str, track_pss: bool = False) -> dict:
    """(b) as ``project_run``, plus when its first predictions were written and its steady rate from
    then on, both read from the run's manifest (its counts, rewritten at least once a second while
    batches arrive) every 0.2 s: how long the run took to start, and how fast it then went."""
    manifest_path = work / "runs" / run_id / "manifest.json"
    ticks: list[tuple[float, int]] = []

    def tick() -> None:
        try:
            counts = json.loads(manifest_path.read_text())["counts"]
        except (OSError, ValueError, KeyError):
            return
        done = counts["predicted"] + counts["failed"]
        if done and (not ticks or ticks[-1][1] != done):
            ticks.append((time.perf_counter(), done))

    began = time.perf_counter()
    measured, run_dir = project_run(data, model, work, env, "--run-id", run_id, *extra, on_tick=tick, track_pss=track_pss)
    manifest = json.loads(manifest_path.read_text())
    steady = (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]) if len(ticks) > 2 else math.nan
    return {
        "whole": manifest["counts"]["predicted"] / measured.seconds,
        "steady": steady,
        "after_connect": manifest.get("images_per_s") or math.nan,
        "first_predictions_s": ticks[0][0] - began if ticks else math.nan,
        "seconds": measured.seconds,
        "rss": measured.rss,
        "pss": measured.pss,
        "failed": manifest["counts"]["failed"],
        "device": manifest.get("device", ""),
        "run_dir": run_dir,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else str(ROOT / "pipeline" / "sample_data" / "imagenette"))
    parser.add_argument("--models", default="resnet50,efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma-separated variants to skip (a,c,d,r,ref)")
    parser.add_argument("--pairs", type=int, default=2, help="runs each of (b) and (d), side by side in mirrored order")
    parser.add_argument("--agreement-images", type=int, default=1000, help="images for the bf16-vs-fp32 check (0: skip)")
    parser.add_argument("--rss-images", default="", help="comma-separated image counts for the peak-RSS scaling check, e.g. 1000,10000")
    args = parser.parse_args()
    keep_freed_memory()  # for the forward passes timed in this process (bf16's, the eager one), as a Predictor does
    if args.pairs < 1:
        parser.error("--pairs must be at least 1: (b) is what the benchmark measures")
    skip = set(filter(None, args.skip.split(",")))
    files = list_images(open_source(args.data)).files
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    os.environ[CACHE_ENV] = str(work / "graphs")  # a fresh cache: every number below starts from nothing kept
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cpu = f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    print(f"{len(files)} images from {args.data}; {cpu}; batch {args.batch_size}", flush=True)
    rows = []
    for model in args.models.split(","):
        random_weights = ensure_weights(model, work / "torch_home")
        env["TORCH_HOME"] = os.environ.get("TORCH_HOME", env.get("TORCH_HOME", ""))
        if not env["TORCH_HOME"]:
            env.pop("TORCH_HOME")
        n = len(files)
        result = {"model": model, "random_weights": random_weights}
        precision = resolve_precision("auto", "cpu", model)
        layout = plan(n, psutil.cpu_count(), 0, args.batch_size, None, None)  # the actors (b) will run
        result["layout"] = f"{layout.concurrency} × {layout.threads} thread(s)"
        result["start_cold"] = first_prediction_s(model, env, threads=layout.threads)  # builds and keeps the graph
        result["start_kept"] = first_prediction_s(model, env, threads=layout.threads)
        if "a" not in skip:
            tutorial = measure([sys.executable, "bench/tutorial_pipeline.py", args.data, model, str(args.batch_size), "1"], env)
            result.update(a=n / tutorial.seconds, a_rss=tutorial.rss)
        loop = [sys.executable, "bench/dataloader_loop.py", args.data, model, str(args.batch_size)]
        loop.append("bf16" if precision == "bf16" else "fp32")
        batch = ("--batch-size", str(args.batch_size))
        taken: list[tuple[str, float]] = []
        for variant in mirrored(args.pairs, skip):
            if variant == "c":
                rate = forward_only(model, files, args.batch_size, precision, layout.concurrency, layout.threads)
            elif variant in ("b", "r"):
                engine = ("--engine", "auto" if variant == "b" else "ray")
                timed = timed_project_run(args.data, model, work, env, f"{variant}-{len(rows)}-{len(taken)}", *batch, *engine)
                rate = n / timed["seconds"]
                result[f"{variant}_rss"] = max(timed["rss"], result.get(f"{variant}_rss", 0.0))
                result[f"{variant}_device"] = timed["device"]
                result.setdefault("run_dir", timed["run_dir"])
                result.setdefault(f"{variant}_timeline", []).append((timed["first_predictions_s"], timed["steady"]))
            else:
                rate = n / measure(loop, env).seconds
            taken.append((variant, rate))
            print(f"  {model} ({variant}) {rate:.1f} img/s", flush=True)
        result.update({v: float(np.mean([rate for variant, rate in taken if variant == v])) for v, _ in taken})
        result["taken"] = taken
        if "c" not in skip:
            result["c_eager"] = eager_forward(model, files, args.batch_size)
        if "ref" not in skip and precision != "fp32":
            reference_dir = project_run(args.data, model, work, env, *batch, "--precision", "fp32")[1]
            result["agreement"] = agreement(result["run_dir"], reference_dir)
        else:
            result["agreement"] = 1.0
        if args.agreement_images:
            result["bf16_agree"], result["c_bf16"] = bf16_fast_path(model, files, args.batch_size, args.agreement_images)
        rows.append(result)
        print(format_row(result), flush=True)
    if args.rss_images:
        rss_scaling(args, files, work, env)
    print("\nmodel               a img/s  b img/s  c img/s  d img/s  r img/s   b/a   b/c   b/d   b/r   r/d  agree  peak RSS b, r (GiB)")
    for result in rows:
        print(format_row(result))
    for result in rows:
        taken = ", ".join(f"({variant}) {rate:.1f}" for variant, rate in result["taken"])
        print(f"{result['model']}: each measurement in the order taken, img/s: {taken}")
    for result in rows:
        for variant in ("b", "r"):
            if f"{variant}_timeline" not in result:
                continue
            first, steady = (float(np.mean(values)) for values in zip(*result[f"{variant}_timeline"], strict=True))
            then = "too few batches to time a steady rate" if math.isnan(steady) else f"then ran {steady:.1f} img/s steady"
            if "c" in result and not math.isnan(steady):
                then += f" = {steady / result['c']:.2f} of (c)"
            print(
                f"{result['model']}: ({variant}) ran as {result[f'{variant}_device']}; it wrote its first predictions {first:.1f} s "
                f"after the command started; {then} (means of {len(result[f'{variant}_timeline'])} runs)"
            )
    for result in rows:
        if "c_eager" in result:
            print(
                f"{result['model']}: forward pass {result['c']:.1f} img/s as the actors run it ({result['layout']}), "
                f"{result['c_eager']:.1f} img/s as plain eager fp32 on batches of {args.batch_size} with every core"
            )
    for result in rows:
        print(
            f"{result['model']}: fresh process to first prediction {result['start_cold']:.1f} s building the frozen graph, "
            f"{result['start_kept']:.1f} s loading the kept one"
        )
    for result in rows:
        if "bf16_agree" in result:
            verdict = "fast enough to use" if result["bf16_agree"] >= 0.99 else "below 99%: fp32 stays the CPU default"
            if result["random_weights"]:
                verdict = "random weights: says nothing about the real model"
            print(
                f"{result['model']}: bf16 forward {result['c_bf16']:.1f} img/s; its top-1 equals fp32's on "
                f"{result['bf16_agree']:.2%} of {min(args.agreement_images, len(files))} images ({verdict})"
            )


def mirrored(pairs: int, skip: set[str]) -> list[str]:
    """The order of the side-by-side measurements: (c) first and last, (b), (r) and (d) in mirrored
    pairs (c b r d d r b c), so that a drift that is steady over the block weighs on each alike."""
    middle = [variant for i in range(pairs) for variant in (("b", "r", "d") if i % 2 == 0 else ("d", "r", "b")) if variant not in skip]
    ends = [] if "c" in skip else ["c"]
    return ends + middle + ends


def rss_scaling(args, files: list[str], work: Path, env: dict) -> None:
    """Peak RSS of (b) and (r) with the dataset repeated to each count: memory must not grow with the dataset."""
    model = args.models.split(",")[-1]
    for count in (int(c) for c in args.rss_images.split(",")):
        folder = repeat_folder(files, count, work / f"repeat-{count}")
        for variant, engine in (("b", "auto"), ("r", "ray")):
            measured, _ = project_run(
                str(folder), model, work, env, "--batch-size", str(args.batch_size), "--engine", engine, track_pss=True
            )
            print(
                f"{model} ({variant}) on {count} images: {count / measured.seconds:.1f} img/s, peak of the whole run "
                f"{measured.rss:.2f} GiB summed RSS, {measured.pss:.2f} GiB summed PSS",
                flush=True,
            )


def repeat_folder(files: list[str], count: int, folder: Path) -> Path:
    """``count`` images in class folders, the originals repeated as often as needed: hard links, so
    that the copies are plain files as in a real dataset (symbolic links where the originals are on
    another filesystem). One thread per class folder: a million links take minutes one by one."""
    originals = [Path(f).resolve() for f in files]
    by_class: dict[Path, list[tuple[int, Path]]] = {}
    for i in range(count):
        original = originals[i % len(originals)]
        by_class.setdefault(folder / original.parent.name, []).append((i, original))

    def link(parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        for i, original in by_class[parent]:
            target = parent / f"{i:07d}-{original.name}"
            try:
                os.link(original, target)
            except OSError:
                os.symlink(original, target)

    with ThreadPoolExecutor(min(len(by_class), 16) or 1) as pool:
        list(pool.map(link, by_class))
    return folder


def format_row(r: dict) -> str:
    def num(key, fmt="8.1f"):
        return format(r[key], fmt) if key in r else "       -"

    def ratio(top, bottom):
        return f"{r[top] / r[bottom]:5.2f}" if top in r and bottom in r else "    -"

    return (
        f"{r['model']:<18} {num('a')} {num('b')} {num('c')} {num('d')} {num('r')}  {ratio('b', 'a')} {ratio('b', 'c')} "
        f"{ratio('b', 'd')} {ratio('b', 'r')} {ratio('r', 'd')}  {r['agreement']:.1%}  {r.get('b_rss', 0):.2f}, {r.get('r_rss', 0):.2f}"
    )


if __name__ == "__main__":
    main()
