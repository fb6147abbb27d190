"""The batch-inference pipeline on Ray Data, in the tutorial's shape but lean.

GPU actors: paths (driver) → ``decode_batch`` tasks on the CPUs (read, decode, resize, crop → uint8)
→ ``Predictor`` actors (model loaded once; normalise, forward, top-k) → small prediction rows.
CPU actors read and decode their own batches of paths: the CPUs that would decode are the ones the
model runs on, so separate tasks would only preempt the forward pass and copy crops through the object store.
Pixels stop at the actor; failures to read or decode travel as rows with an ``error`` so the
driver can account for every input. ``local`` runs the same ``Predictor`` in worker processes, without Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from . import graphs
from .errors import UserError
from .local import MAX_CPU_ACTORS
from .models import ModelInfo, ModelSpec, describe, landed, load_module
from .preprocess import Preprocessing, decode, describe_error
from .sources import Source

PRECISIONS = ("auto", "fp32", "bf16")
DECODE_BYTES_PER_IMAGE = 4 * 1024 * 1024  # a photo's bytes plus its decoded pixels, generously
MIN_OBJECT_STORE_BUDGET = 256 * 1024 * 1024  # decoded crops waiting for the model actors, at most
CPU_BATCH_SIZE = 64  # images per batch a CPU actor receives (its forward pass uses micro-batches)
REMOTE_READ_THREADS = 8  # a CPU actor reading from s3:// or gs:// waits on the network, not on its CPU
# Blocks of paths are at most 64 rows, so that work spreads evenly and progress arrives often, until
# there would be more than this many: the driver puts and describes each block (~1.3 ms apiece), and
# 1,000,000 paths in 64-row blocks took 23 s before the first task, in 500-row blocks 3.8 s.
MAX_INPUT_BLOCKS = 2000
GPU_BATCH_SIZE = 512  # enough to keep a data-centre GPU busy; bf16 activations of resnet152 fit in a few GiB
# Two actors share each GPU, so that one's host-side work (assembling a batch, copying it over, building
# rows) overlaps the other's forward pass: ResNet-152 on an H200, 3,610 → 5,479 img/s steady.
ACTORS_PER_GPU = 2
# Models whose bf16 top-1 differs from fp32's on more than 1 % of images keep fp32 everywhere:
# efficientnet_lite0 agreed on 98.90 % of 1,000 Imagenette images on an H200 (98.83 % of 256 on a CPU).
KEEP_FP32 = frozenset({"efficientnet_lite0"})


# mallopt(3) parameters: how freed memory goes back to the OS, in glibc
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory a worker keeps at its heap's top: more than a batch's buffers (a 64-image batch of resnet50
# needs under 150 MB), so only a rare bigger spike (a huge photo, a huge --batch-size) goes back.
KEPT_FREE_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next batch instead of giving it back to the OS.

    Every batch allocates the same big buffers (activations, crops, rows; the 64-image float batch built
    whole before micro-batches were normalised apart was 38.5 MB, past the 32 MB up to which glibc can be
    told to serve from its heap); given back and faulted in again each time, they cost a CPU worker
    ~200,000 page faults and a third of its CPU time a second (efficientnet_lite0, 2-core EPYC); without
    this, a 64-image batch of the embedded model still takes ~164,000. The process then keeps up to
    ``KEPT_FREE_BYTES`` free for reuse. For processes that only run batches (Ray actors, local workers,
    benchmarks), not for a server that also does other work.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)  # every allocation from the heap, none mapped and unmapped on its own
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)  # nor the heap's top trimmed after each batch
    except (OSError, AttributeError):  # not glibc (musl): its allocator is left as it is
        pass


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while a network is imported and built: hundreds of thousands
    of new objects, none of them garbage, that each collection they trigger walks again. In a fresh process,
    efficientnet_lite0 (torch, timm, the network) loaded in 1.90–1.93 s instead of 2.31–2.37, from its kept
    graph in 0.87–0.89 s instead of 0.96–1.01 (2 cores, three interleaved pairs each): a Ray actor's start,
    the dashboard's first preview. Where the collector was already off (another thread of the dashboard
    loading a model), it is left to whoever turned it off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def pick_device(prefer_gpu: bool = True) -> str:
    import torch

    return "cuda" if prefer_gpu and torch.cuda.is_available() else "cpu"


class Classifier:
    """A model ready for uint8 batches: normalisation, layout, precision and the fast paths handled here.

    On a CPU in fp32 the network runs as a frozen TorchScript graph (batch norm folded into the
    convolutions, fused ops) on micro-batches of a few images: activations that stay in cache make
    small batches 2-3× faster per image than large ones on a small CPU. On a GPU (and in bf16) it runs
    as a traced graph of the same operations, autocast's casts included, on whole batches. Either graph
    is used only if it reproduces the eager network's logits on the first batch it can be checked on
    (otherwise the eager module runs), and is then kept on disk (``graphs``) so that later runs load it
    with torch alone instead of importing the network's code and building it: on a GPU worker, the
    import of torchvision (and of ``torch._dynamo``, which it imports) took 5.2 s on the H100 machines.
    ``fast_path=False`` runs the eager network on whole batches (the reference it is measured against).
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        precision: str = "auto",
        threads: int | None = None,
        fast_path: bool = True,
        info: ModelInfo | None = None,
    ):
        with collector_paused():  # imports and the network's build: objects kept, none of them garbage
            import torch

            if threads:
                torch.set_num_threads(threads)
            info = info or describe(spec)
            self.categories = info.categories
            self.preprocessing = info.preprocessing
            self.device = device or pick_device()
            self.device_type = torch.device(self.device).type
            self.precision = resolve_precision(precision, self.device, spec.name)
            on_cpu = fast_path and self.device_type == "cpu"
            self.micro_batch = cpu_micro_batch(torch.get_num_threads()) if on_cpu else None
            self.frozen = on_cpu and self.precision == "fp32"  # else traced with autocast's casts (``graphs.traced_graph``)
            self.graph_path = graphs.graph_path(info, self.micro_batch, self.device, self.precision) if fast_path else None
            self.graph = graphs.load(self.graph_path, self.device) if fast_path else None
            self.graph_checked = self.graph is not None or not fast_path
            self.checking = threading.Lock()
            # A kept graph is the whole network: without it torch alone is imported, not timm or torchvision.
            self.module = None if self.graph is not None else load_module(spec, self.device).to(memory_format=torch.channels_last)
            # (pixel / 255 - mean) / std as one multiply-add: pixel * scale + shift, per channel
            std = torch.tensor(self.preprocessing.std, device=self.device)
            self.scale = 1.0 / (255.0 * std)
            self.shift = -torch.tensor(self.preprocessing.mean, device=self.device) / std
            self.rows: dict[int, tuple] = {}  # image width → (scale, shift) repeated along a row of pixels

    def probabilities(self, images: np.ndarray):
        """(N, H, W, 3) uint8 → (N, classes) float32 softmax probabilities, as a torch tensor."""
        return self.probabilities_of(self.uploaded(images))

    def uploaded(self, images: np.ndarray):
        """The uint8 batch as a tensor on the model's device."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)

    def probabilities_of(self, batch):
        import torch

        with torch.inference_mode():
            if self.micro_batch is None:
                logits = self.forward(self.normalised(batch))
            else:
                # Each micro-batch is normalised just before its forward pass, in one multiply-add, and is still
                # in cache when the network reads it: normalising the whole 64-image batch first (38.5 MB of floats,
                # three passes) made two single-threaded processes side by side 4-5 % slower per image (efficientnet_lite0).
                logits = torch.cat([self.forward(self.normalised(chunk)) for chunk in batch.split(self.micro_batch)])
        return torch.softmax(logits.float(), dim=1)

    def normalised(self, pixels):
        """uint8 (N, H, W, 3), contiguous → the network's float input (N, 3, H, W), channels-last.

        One multiply-add over rows of W × 3 values, against the scale and shift repeated along a row:
        20 µs an image (224 px, one core), where broadcasting them over a channel dimension of 3 took
        108 (torch then loops over 3 values at a time), and 191 from 4-byte pixels.
        """
        import torch

        n, height, width, channels = pixels.shape
        if width not in self.rows:
            self.rows[width] = (self.scale.repeat(width), self.shift.repeat(width))
        scale, shift = self.rows[width]
        rows = torch.addcmul(shift, pixels.reshape(n * height, width * channels).float(), scale)
        return rows.view(n, height, width, channels).permute(0, 3, 1, 2)

    def top_k(
        self, images: np.ndarray, k: int = 5, label_set: Sequence[int] = (), turn: AbstractContextManager | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices and scores of the k most likely classes, best first, and the scores of ``label_set``'s classes.

        ``turn`` is held from the forward pass until its results are back, not while the batch is copied to
        the device: the processes sharing a GPU (``local``) take turns on it. Left to the GPU's time slices,
        two workers' batches ran side by side and ended together, and then both workers decoded while the
        GPU waited."""
        import torch

        batch = self.uploaded(images)
        with turn or contextlib.nullcontext():
            probabilities = self.probabilities_of(batch)
            scores, indices = torch.topk(probabilities, min(k, probabilities.shape[1]), dim=1)
            subset = probabilities[:, list(label_set)] if label_set else probabilities[:, :0]
            return indices.cpu().numpy(), scores.cpu().numpy(), subset.cpu().numpy()

    def forward(self, inputs):
        """Logits of a normalised batch (a micro-batch on a CPU) from the kept graph, else the eager network.
        A micro-batch is padded to the frozen graph's shape, so that the graph never sees another."""
        import torch

        if not self.graph_checked:
            # The dashboard shares one Classifier between sessions: until the graph is built and checked,
            # calls take turns, so it is built once and the network is never dropped under another call.
            with self.checking:
                if not self.graph_checked and self.can_check(inputs):
                    self.graph = (
                        graphs.frozen_graph(self.module, inputs)
                        if self.frozen
                        else graphs.traced_graph(self.module, inputs, self.precision)
                    )
                    if self.graph is not None:
                        graphs.keep(self.graph, self.graph_path)
                        self.module = None  # the graph holds the weights (a frozen one, folded): do not hold two copies
                    self.graph_checked = True
                if self.graph is None:  # not checked yet (a short batch), or no usable graph
                    return self.eager(inputs)
        elif self.graph is None:
            return self.eager(inputs)
        if self.micro_batch is None:
            return graphs.run(self.graph, inputs)
        short = self.micro_batch - len(inputs)
        if short:
            inputs = torch.cat([inputs, inputs[-1:].expand(short, -1, -1, -1)]).contiguous(memory_format=torch.channels_last)
        return graphs.run(self.graph, inputs)[: self.micro_batch - short]

    def can_check(self, inputs) -> bool:
        """A graph is checked on a whole micro-batch, or on a batch of more than the two images it is traced on."""
        return len(inputs) == self.micro_batch if self.micro_batch else len(inputs) > 2

    def eager(self, inputs):
        import torch

        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.module(inputs)


def cpu_micro_batch(threads: int) -> int:
    """Images per forward call on a CPU: two per thread, at least four. Measured on 2 cores, efficientnet_lite0
    (resnet50): 2 threads × 4 images 114 (20) img/s against 64 (19) with 64 images, and 233 against 167
    with 8 images on an AVX-512 EPYC; two 1-thread processes there, 4 against 2 images: 280-285 against
    259-273 (46.1-46.4 against 43.6-45.1)."""
    return max(4, 2 * threads)


def resolve_precision(precision: str, device: str, model: str) -> str:
    """``auto``: bf16 autocast on CUDA unless the model's answers change (``KEEP_FP32``), fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device == "cuda" and model not in KEEP_FP32 else "fp32"
    return precision


def decode_batch(
    batch: dict[str, np.ndarray],
    source: Source,
    preprocessing: Preprocessing,
    pool: ThreadPoolExecutor | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode a block of paths (on ``pool``'s threads when given: reads wait on the network);
    an unreadable file becomes a row with an ``error``."""
    paths = batch["path"]
    images = np.empty((len(paths), preprocessing.crop, preprocessing.crop, 3), dtype=np.uint8)
    errors = decode_into(images, paths, source, preprocessing, pool)
    return {"path": paths, "ground_truth": batch["ground_truth"], "image": images, "error": np.array(errors, dtype=object)}


def decode_into(
    images: np.ndarray, paths: Sequence, source: Source, preprocessing: Preprocessing, pool: ThreadPoolExecutor | None = None
) -> list[str]:
    """Decode ``paths`` into ``images``, row by row; why each one that failed did ("" where none did), its row black."""
    errors = [""] * len(paths)

    def decode_one(i: int) -> None:
        try:
            decode(source.read(str(paths[i])), preprocessing, images[i])
        except Exception as error:
            errors[i] = describe_error(error)
            images[i] = 0  # not the crop that memory last held (a decoder's is reused block after block)

    if pool is None:
        for i in range(len(paths)):
            decode_one(i)
    else:
        list(pool.map(decode_one, range(len(paths))))
    return errors


@dataclass(frozen=True)
class PredictorOptions:
    info: ModelInfo  # described by the driver: the actor then imports no model package it does not need
    topk: int = 5
    precision: str = "auto"
    threads: int | None = None
    label_set: tuple[int, ...] = ()
    # Set: the actor receives paths and reads and decodes them itself (build_dataset clears it where
    # decode tasks feed the actors).
    source: Source | None = None
    # None: CUDA where this process sees a GPU (Ray gives a GPU actor its own), else the CPU. A local GPU
    # worker asks for "cuda": without one, its run fails in one line instead of crawling on one CPU thread.
    device: str | None = None
    # A custom network's checkpoint file in Ray's object store (``ship_checkpoint``), for a cluster's nodes
    shipped_checkpoint: object | None = None


def ship_checkpoint(options: PredictorOptions) -> PredictorOptions:
    """Options whose actors load a user's own checkpoint from Ray's object store: a cluster's nodes need
    not have the driver's file (its labels travel in ``info.categories``), as the package is shipped with the job."""
    import ray

    spec = options.info.spec
    if spec.name != "custom":
        return options
    return replace(options, shipped_checkpoint=ray.put(Path(spec.checkpoint or "").read_bytes()))


def actor_start_failure(error: BaseException) -> UserError | None:
    """A Ray actor whose network would not load (a file or package its node lacks, a GPU without the memory)
    as one line saying why: the last of its traceback. None for any other error."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None or not isinstance(error, ray_exceptions.RayActorError) or not error.actor_init_failed:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return UserError(f"a model actor could not start on Ray: {lines[-1][:300] if lines else type(error).__name__}")


class Predictor:
    """A Ray Data actor, or a local worker's model (``local``): loads the model once, then turns batches
    (uint8 crops, or paths it reads and decodes itself) into prediction rows."""

    def __init__(self, options: PredictorOptions, turn: AbstractContextManager | None = None):
        self.turn = turn  # on a GPU shared with other processes: held while the GPU runs a batch (``Classifier.top_k``)
        info, spec, shipped = options.info, options.info.spec, options.shipped_checkpoint
        # A shipped checkpoint is written to a folder of its own, gone once the network is loaded; the network
        # is still known by the driver's spec and file (``info``), as its kept graph is.
        with tempfile.TemporaryDirectory(prefix="batch-classify-model-") if shipped else contextlib.nullcontext() as folder:
            if folder:
                import ray

                spec = landed(spec, ray.get(shipped), info.categories, Path(folder))
            self.classifier = Classifier(spec, options.device, options.precision, options.threads, info=info)
        if self.classifier.device == "cpu":
            keep_freed_memory()
        self.topk = min(options.topk, len(self.classifier.categories))  # a user's model may know fewer classes than k
        self.label_set = options.label_set
        self.source = options.source
        readers = options.threads or 1
        if options.source is not None and options.source.scheme != "file":
            readers = max(readers, REMOTE_READ_THREADS)
        self.pool = ThreadPoolExecutor(readers) if options.source is not None and readers > 1 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.predict(batch).rows()

    def predict(self, batch: dict[str, np.ndarray]) -> Predictions:
        if self.source is not None:
            batch = decode_batch(batch, self.source, self.classifier.preprocessing, self.pool)
        errors = [str(e) if e else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        n, k = len(errors), self.topk
        top_idx = np.zeros((n, k), dtype=np.int64)
        top_scores = np.zeros((n, k), dtype=np.float32)
        set_scores = np.zeros((n, len(self.label_set)), dtype=np.float32)
        if ok.any():
            images = batch["image"]
            if not ok.all() or not images.flags.writeable:  # torch takes only writable arrays as they are
                images = images[ok]
            top_idx[ok], top_scores[ok], set_scores[ok] = self.classifier.top_k(images, k, self.label_set, self.turn)
        categories = self.classifier.categories
        names = [[categories[i] for i in row] if good else None for row, good in zip(top_idx, ok, strict=True)]
        return Predictions(batch["path"], batch["ground_truth"], errors, names, top_idx, top_scores, set_scores if self.label_set else None)


class Predictions(NamedTuple):
    """A batch's predictions as plain arrays and lists: what a local worker sends back, because making
    Arrow arrays from them imports pandas (pyarrow looks for it), 0.26 s of a worker's start."""

    paths: Sequence
    truths: Sequence
    errors: list[str | None]  # where one is set, that image has no prediction
    names: list[list[str] | None]
    top_idx: np.ndarray
    top_scores: np.ndarray
    set_scores: np.ndarray | None

    def rows(self) -> pa.Table:
        """The rows as the driver stores them: a prediction, or where ``errors`` has one, an error."""
        errors, top_idx, top_scores = self.errors, self.top_idx, self.top_scores
        ok = np.array([e is None for e in errors], dtype=bool)
        set_rows = self.set_scores if self.set_scores is not None else [None] * len(errors)
        return pa.table(
            {
                "path": pa.array([str(p) for p in self.paths], pa.string()),
                "ground_truth": pa.array([str(g) if g else None for g in self.truths], pa.string()),
                "label": pa.array([row[0] if row else None for row in self.names], pa.string()),
                "label_index": pa.array(np.where(ok, top_idx[:, 0], 0).astype(np.int32), mask=~ok),
                "score": pa.array(top_scores[:, 0], mask=~ok),
                "topk_labels": pa.array(self.names, pa.list_(pa.string())),
                "topk_scores": pa.array(
                    [row.tolist() if good else None for row, good in zip(top_scores, ok, strict=True)], pa.list_(pa.float32())
                ),
                "label_set_scores": pa.array(
                    [row.tolist() if good and row is not None else None for row, good in zip(set_rows, ok, strict=True)],
                    pa.list_(pa.float32()),
                ),
                "error": pa.array(errors, pa.string()),
            }
        )


def failure_rows(paths: Sequence, truths: Sequence, error: str) -> pa.Table:
    """Error rows for a whole batch that could not be predicted at all."""
    n = len(paths)
    return Predictions(paths, truths, [error] * n, [None] * n, np.zeros((n, 1), np.int64), np.zeros((n, 1), np.float32), None).rows()


@dataclass(frozen=True)
class Plan:
    """How the work is spread: actor pool size, GPUs, CPUs and threads per actor, CPUs per decode task,
    block size, and whether the actors decode their own batches (CPU actors) or decode tasks feed them."""

    concurrency: int
    num_gpus: float
    threads: int | None
    batch_size: int
    block_rows: int
    actor_cpus: float = 1.0
    decode_cpus: float = 1.0
    actors_decode: bool = False


def check_pool(batch_size: int | None, concurrency: int | None, num_gpus: float | None) -> None:
    """What a user may ask of the actor pool: checked before the dataset is listed, and by ``plan``
    for callers that go straight to it."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    if concurrency is not None and concurrency < 1:
        raise UserError(f"concurrency must be a positive integer, got {concurrency}")
    if num_gpus is not None and num_gpus < 0:
        raise UserError(f"GPUs per actor must be ≥ 0, got {num_gpus}")


def plan(
    total: int,
    cpus: float,
    gpus: float,
    batch_size: int | None,
    concurrency: int | None,
    num_gpus: float | None,
    node_cpus: float | None = None,
) -> Plan:
    """Sensible defaults: two actors per GPU (``ACTORS_PER_GPU``), or GPUs shared evenly by the actors
    asked for; on CPUs, one single-threaded actor per CPU up to ``MAX_CPU_ACTORS``, then more threads
    per actor, never more threads than a node has CPUs (32 CPUs over eight nodes: eight actors of 4 threads).

    GPU actors never reserve every CPU: a decode task must always fit beside them, or Ray would wait
    forever for a CPU to read the next image. CPU actors reserve the CPUs their threads use.
    ``batch_size`` None picks one for the device: large batches fill a GPU; CPUs micro-batch anyway.
    """
    check_pool(batch_size, concurrency, num_gpus)
    if num_gpus is None and gpus >= 1:
        num_gpus = min(1.0, gpus / concurrency) if concurrency else 1.0 / ACTORS_PER_GPU
    num_gpus = num_gpus or 0.0
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if num_gpus else CPU_BATCH_SIZE
    if num_gpus > 0 and gpus == 0:
        raise UserError(f"--num-gpus {num_gpus} asked for, but the Ray cluster has no GPU")
    if concurrency is None:
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus else max(1, min(MAX_CPU_ACTORS, int(cpus)))
    if num_gpus and concurrency * num_gpus > gpus + 1e-9:
        raise UserError(f"concurrency {concurrency} × {num_gpus} GPU needs {concurrency * num_gpus:g} GPUs; the cluster has {gpus:g}")
    if not num_gpus and concurrency > cpus:
        raise UserError(f"concurrency {concurrency} exceeds the {cpus:g} CPUs this run can use")
    block_rows = max(8, min(64, math.ceil(total / max(1.0, 2 * cpus))), math.ceil(total / MAX_INPUT_BLOCKS))
    # No more actors than batches, even asked for: an actor without work still loads a model (seconds of
    # CPU that the busy ones need), and a Ray actor pool bigger than its inputs warns. An actor's batch
    # is whole blocks, so a block bigger than the batch is one batch.
    concurrency = min(concurrency, max(1, math.ceil(total / max(batch_size, block_rows))))
    threads = None if num_gpus else max(1, int(min(cpus // concurrency, node_cpus or cpus)))
    if num_gpus:
        decode_cpus = min(1.0, cpus / 2)
        return Plan(concurrency, num_gpus, threads, batch_size, block_rows, min(1.0, (cpus - decode_cpus) / concurrency), decode_cpus)
    return Plan(concurrency, 0.0, threads, batch_size, block_rows, min(float(threads), cpus / concurrency), 0.0, actors_decode=True)


def build_dataset(inputs: pa.Table, options: PredictorOptions, plan_: Plan):
    """The lazy Ray Dataset of prediction rows (plus error rows) for ``inputs`` (path, ground_truth), read
    from ``options.source``: by the actors themselves, or by decode tasks when the plan says so."""
    import ray.data
    from ray.data import DataContext, ExecutionResources

    info = options.info
    crop_bytes = info.preprocessing.crop**2 * 3
    # Decoding is much faster than the model, so without a budget decoded crops pile up in the object
    # store and the run's memory grows with the dataset (10,000 images: +57 % peak RSS over 1,000).
    DataContext.get_current().execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=max(MIN_OBJECT_STORE_BUDGET, 8 * plan_.concurrency * plan_.batch_size * crop_bytes)
    )
    blocks = [inputs.slice(start, plan_.block_rows) for start in range(0, inputs.num_rows, plan_.block_rows)]
    # from_blocks keeps the blocks as cut and describes them here; from_arrow runs a remote task per
    # block for that (62 tasks for Imagenette's 3,925 images: 1.4 s before the first actor starts).
    inputs_ds = ray.data.from_blocks(blocks)
    if plan_.actors_decode:
        batches, actor_options = inputs_ds, options
    else:
        batches, actor_options = (
            inputs_ds.map_batches(
                decode_batch,
                fn_kwargs={"source": options.source, "preprocessing": info.preprocessing},
                batch_size=None,
                batch_format="numpy",
                num_cpus=plan_.decode_cpus,
                # A memory estimate (the block's crops, plus the one photo being decoded: decode_batch goes
                # image by image here) is an honest scheduling hint that stays schedulable for big blocks and,
                # being a remote arg the actor lacks, keeps decoding in tasks of its own: Ray would otherwise
                # fuse it into the model actor, where it could not overlap inference.
                memory=plan_.block_rows * crop_bytes + DECODE_BYTES_PER_IMAGE,
            ),
            replace(options, source=None),
        )
    return batches.map_batches(
        Predictor,
        fn_constructor_kwargs={"options": actor_options},
        batch_size=plan_.batch_size,
        batch_format="numpy",
        # One call at a time per actor, run on the actor's own thread. Ray Data's default hands each
        # call to a helper thread instead; measured in the actor on 2 cores, the forward pass then got
        # 1.45 cores instead of 1.85 (45 against 63 img/s for efficientnet_lite0).
        compute=ray.data.ActorPoolStrategy(size=plan_.concurrency, enable_true_multi_threading=True),
        num_gpus=plan_.num_gpus,
        num_cpus=plan_.actor_cpus,
    )
