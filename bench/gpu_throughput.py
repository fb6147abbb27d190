"""The GPU path, measured on one CUDA GPU: ResNet-152 (by default) end to end against the model's limit.

(bl) ``python -m pipeline run`` as a user types it on one GPU machine (``auto``: local worker processes,
     whatever the size; ``--engine local`` here): two workers share the GPU, each with
     its share of the CPUs in processes that decode its batches, bf16 + channels_last, batches of 512
(b)  the same on Ray Data (``--engine ray``: what a cluster runs), with
     the defaults it picks on a GPU (two actors sharing it, decoding in CPU tasks that overlap inference);
     also (b2) one actor holding the whole GPU (``--num-gpus 1``) and (b3) three sharing it (``--concurrency 3``)
(c)  the forward pass as the actor runs it (uint8 crops in host memory → GPU → normalise → top-k),
     and the model alone on a batch already on the GPU (the card's limit)
(d)  a plain PyTorch DataLoader loop on the same GPU, one decoding worker per spare CPU
(a)  Ray's tutorial pipeline as written (row-wise ``map``, fp32, batch 720, one GPU actor)

Whole processes for (a), (b), (bl), (d), start-up included; for (b) and (bl) also their steady rate, read off the
run's manifest (counts against time once the first predictions are in). The folder is repeated
(hard links) to ``--images``. The CUDA path's numbers are checked too: top-1 of fp32 on the GPU
against fp32 on the CPU, and of the default bf16 against fp32, with real (embedded) weights.

    python bench/gpu_throughput.py [--data DIR] [--model resnet152] [--images 40000]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ROOT, SHARED, ensure_weights, first_prediction_s, measure, repeat_folder, timed_project_run

from pipeline.cache import CACHE_ENV
from pipeline.inference import GPU_BATCH_SIZE, Classifier
from pipeline.models import DEFAULT_MODEL, describe, parse_model
from pipeline.preprocess import decode
from pipeline.sources import list_images, open_source

TUTORIAL_BATCH_SIZE = 720


def crops_for(files: list[str], model: str, count: int) -> np.ndarray:
    prep = describe(parse_model(model)).preprocessing
    return np.stack([decode(Path(f).read_bytes(), prep) for f in islice(cycle(files), count)])


def decode_rate(files: list[str], model: str, count: int = 500) -> float:
    """Images per second that one CPU core decodes and crops (the CPU side's ceiling is this × cores)."""
    prep = describe(parse_model(model)).preprocessing
    blobs = [Path(f).read_bytes() for f in islice(cycle(files), count)]
    began = time.perf_counter()
    for blob in blobs:
        decode(blob, prep)
    return count / (time.perf_counter() - began)


def forward_rates(model: str, crops: np.ndarray, batches: int = 10) -> dict[str, float]:
    """img/s as the actor runs a batch (host uint8 in, top-k out), and of the network alone on a batch
    already on the GPU: as the actor runs it (its kept graph, cuDNN's autotuner off), and the eager network
    with the autotuner on."""
    import torch

    spec = parse_model(model)
    classifier = Classifier(spec, device="cuda")
    rates = {}
    for _ in range(2):
        classifier.top_k(crops)  # warm-up: CUDA context, the graph built, checked and kept, cuDNN's choice of kernels
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(batches):
        classifier.top_k(crops)
    rates["c"] = batches * len(crops) / (time.perf_counter() - began)
    rates["c_graph"] = float(classifier.graph is not None)
    batch = classifier.normalised(torch.from_numpy(crops).cuda())
    eager = Classifier(spec, device="cuda", fast_path=False)
    chosen = torch.backends.cudnn.benchmark
    for autotune, network in ((False, classifier), (True, eager)):
        torch.backends.cudnn.benchmark = autotune
        with torch.inference_mode():
            for _ in range(3):
                network.forward(batch)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(batches):
                network.forward(batch)
            torch.cuda.synchronize()
        rates["c_autotuned" if autotune else "c_resident"] = batches * len(crops) / (time.perf_counter() - began)
    torch.backends.cudnn.benchmark = chosen
    return rates


def top1_agreement(files: list[str], model: str, batch_size: int = 256) -> dict[str, float]:
    """How often the GPU's answers equal the CPU's in fp32, and bf16's equal fp32's on the GPU."""
    spec = parse_model(model)
    cpu = Classifier(spec, device="cpu", precision="fp32", fast_path=False)
    gpu32 = Classifier(spec, device="cuda", precision="fp32")
    gpu16 = Classifier(spec, device="cuda", precision="bf16")
    same_device = same_precision = 0
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        crops = crops_for(chunk, model, len(chunk))
        reference = gpu32.top_k(crops, 1)[0][:, 0]
        same_device += int((cpu.top_k(crops, 1)[0][:, 0] == reference).sum())
        same_precision += int((gpu16.top_k(crops, 1)[0][:, 0] == reference).sum())
    return {"gpu_vs_cpu": same_device / len(files), "bf16_vs_fp32": same_precision / len(files)}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else str(ROOT / "pipeline" / "sample_data" / "imagenette"))
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--images", type=int, default=40_000, help="the folder is repeated to this many images")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip (a,b,b2,b3,bl,c,d,check,start)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark measures the GPU path (bench/throughput.py measures CPUs)")
    skip = set(filter(None, args.skip.split(",")))
    files = list_images(open_source(args.data)).files
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    os.environ[CACHE_ENV] = str(work / "graphs")
    began = time.perf_counter()
    data = repeat_folder(files, args.images, work / "data")
    linked_s = time.perf_counter() - began
    random_weights = ensure_weights(args.model, work / "torch_home")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cpus = psutil.cpu_count()
    print(
        f"{torch.cuda.get_device_name()}, {cpus} CPUs, torch {torch.__version__}; {args.model}"
        f"{' (random weights)' if random_weights else ''}; {args.images} images ({len(files)} distinct) from {args.data}"
        f" (linked in {linked_s:.0f} s)",
        flush=True,
    )
    r: dict[str, float] = {}
    if "check" not in skip:
        agreement = top1_agreement(files, DEFAULT_MODEL)
        print(
            f"{DEFAULT_MODEL} on {len(files)} images, real weights: GPU fp32 top-1 = CPU fp32 on {agreement['gpu_vs_cpu']:.2%}; "
            f"GPU bf16 = GPU fp32 on {agreement['bf16_vs_fp32']:.2%}",
            flush=True,
        )
    r["decode_per_core"] = decode_rate(files, args.model)
    ceiling = r["decode_per_core"] * cpus
    print(f"decode + crop on one CPU core: {r['decode_per_core']:.0f} img/s ({cpus} cores: ≤ {ceiling:.0f})", flush=True)
    if "c" not in skip:
        r.update(forward_rates(args.model, crops_for(files, args.model, GPU_BATCH_SIZE)))
        print(
            f"(c) forward as the actor runs it {r['c']:.0f} img/s ({'its kept graph' if r['c_graph'] else 'no graph: the eager network'}); "
            f"network alone on a resident batch {r['c_resident']:.0f} img/s, eager with cuDNN autotuning {r['c_autotuned']:.0f}",
            flush=True,
        )
    if "start" not in skip:
        cold = first_prediction_s(args.model, {**env, CACHE_ENV: str(work / "graphs-cold")}, "cuda")
        kept = first_prediction_s(args.model, env, "cuda")
        ray_init = ""
        if importlib.util.find_spec("ray") is not None:
            seconds = measure([sys.executable, "-c", "import ray; ray.init(include_dashboard=False)"], env).seconds
            ray_init = f"a fresh process through ray.init {seconds:.1f} s; "
        first = f"to a first GPU prediction {cold:.1f} s building the network, {kept:.1f} s from its kept graph"
        print(f"start-up: {ray_init}{first}", flush=True)
    ray_runs = (("b", ()), ("b2", ("--num-gpus", "1")), ("b3", ("--concurrency", "3")))
    for name, extra in (*((name, ("--engine", "ray", *extra)) for name, extra in ray_runs), ("bl", ("--engine", "local"))):
        if name not in skip:
            result = timed_project_run(str(data), args.model, work, env, f"bench-{name}", *extra, track_pss=True)
            r[name], r[f"{name}_steady"] = result["whole"], result["steady"]
            print(
                f"({name}) {result['device']}: whole process {result['whole']:.0f} img/s ({result['seconds']:.1f} s), "
                f"steady {result['steady']:.0f} img/s, {result['after_connect']:.0f} img/s after connecting; first predictions "
                f"after {result['first_predictions_s']:.1f} s; {result['failed']} failed; peak summed RSS {result['rss']:.1f} GiB, "
                f"PSS {result['pss']:.1f} GiB",
                flush=True,
            )
    if "d" not in skip:
        loop = measure(
            [sys.executable, "bench/dataloader_loop.py", str(data), args.model, str(GPU_BATCH_SIZE), "auto", "cuda", str(cpus - 1)], env
        )
        r["d"] = args.images / loop.seconds
        rate = f"{r['d']:.0f} img/s ({loop.seconds:.1f} s)"
        print(f"(d) DataLoader loop, {cpus - 1} workers: {rate}, peak RSS {loop.rss:.1f} GiB", flush=True)
    if "a" not in skip:
        command = [sys.executable, "bench/tutorial_pipeline.py", str(data), args.model, str(TUTORIAL_BATCH_SIZE), "1"]
        tutorial = measure(command, env)
        r["a"] = args.images / tutorial.seconds
        print(f"(a) tutorial pipeline: {r['a']:.0f} img/s ({tutorial.seconds:.1f} s), peak RSS {tutorial.rss:.1f} GiB", flush=True)
    pairs = (("b", "a"), ("b", "c"), ("b", "d"), ("b_steady", "c"), ("b_steady", "b2_steady"), ("b_steady", "b3_steady"))
    pairs += (("bl", "b"), ("bl_steady", "b_steady"), ("bl", "d"))
    print("ratios: " + ", ".join(f"{top}/{bottom} {r[top] / r[bottom]:.2f}" for top, bottom in pairs if top in r and bottom in r))


if __name__ == "__main__":
    main()
