import gc
import importlib.util
import json
import math
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision

from pipeline.cache import CACHE_ENV
from pipeline.errors import UserError
from pipeline.inference import (
    ACTORS_PER_GPU,
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    MAX_CPU_ACTORS,
    MAX_INPUT_BLOCKS,
    Classifier,
    Plan,
    Predictor,
    PredictorOptions,
    build_dataset,
    collector_paused,
    cpu_micro_batch,
    plan,
    resolve_precision,
    ship_checkpoint,
)
from pipeline.models import DEFAULT_MODEL, describe, parse_model
from pipeline.preprocess import decode

from .conftest import ROOT, SAMPLE, cli_env, run_cli


def sample_crops(n: int, prep) -> np.ndarray:
    files = sorted(SAMPLE.rglob("*.JPEG"))[:n]
    return np.stack([decode(f.read_bytes(), prep) for f in files])


def decoded_batch(crops: np.ndarray, truth: str) -> dict[str, np.ndarray]:
    """A batch as decode tasks hand it to a Predictor: crops that all decoded, each with the same ground truth."""
    n = len(crops)
    return {
        "path": np.array([f"{i}.jpg" for i in range(n)], dtype=object),
        "ground_truth": np.array([truth] * n, dtype=object),
        "image": crops,
        "error": np.array([None] * n, dtype=object),
    }


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16])
def test_cpu_actors_decode_their_own_images_within_the_cluster_cpus(cpus):
    for concurrency in range(1, cpus + 1):
        work = plan(1000, cpus, 0, 64, concurrency, None)
        assert work.actors_decode and work.decode_cpus == 0
        assert work.actor_cpus * work.concurrency <= cpus
        assert work.actor_cpus > 0 and work.threads * work.concurrency <= cpus


def test_cpu_actors_are_single_threaded_one_per_cpu_until_the_cap():
    two = plan(1000, 2, 0, 64, None, None)
    assert (two.concurrency, two.threads) == (2, 1)
    big = plan(1000, 4 * MAX_CPU_ACTORS, 0, 64, None, None)
    assert (big.concurrency, big.threads) == (MAX_CPU_ACTORS, 4)
    few = plan(9, 2, 0, 64, None, None)  # one batch: one actor, with both CPUs
    assert (few.concurrency, few.threads) == (1, 2)
    asked = plan(9, 2, 0, 64, 2, None)  # even asked for two: the second would only load a model
    assert (asked.concurrency, asked.threads) == (1, 2)
    assert plan(100, 16, 1, 64, 4, None).concurrency == 2  # two batches for four GPU actors


@pytest.mark.parametrize("gpus", [0, 1])
def test_blocks_stay_small_until_there_would_be_too_many(gpus):
    assert plan(3925, 2, gpus, None, None, None).block_rows == 64
    assert plan(40, 2, gpus, None, None, None).block_rows == 10  # a block per CPU twice over: both actors start at once
    huge = plan(1_000_000, 16, gpus, None, None, None)
    assert huge.block_rows == 500 and math.ceil(1_000_000 / huge.block_rows) <= MAX_INPUT_BLOCKS


def test_cpu_actors_never_get_more_threads_than_a_node_has():
    spread = plan(1000, 64, 0, 64, None, None, node_cpus=4)  # sixteen 4-CPU nodes
    assert (spread.concurrency, spread.threads) == (MAX_CPU_ACTORS, 4)
    assert plan(1000, 64, 0, 64, 2, None, node_cpus=16).threads == 16


def test_gpu_actors_leave_room_for_decode_tasks():
    work = plan(1000, 4, 4, 64, None, None)
    assert (work.concurrency, work.num_gpus, work.threads) == (4 * ACTORS_PER_GPU, 1 / ACTORS_PER_GPU, None)
    assert not work.actors_decode and work.decode_cpus > 0
    assert work.actor_cpus * work.concurrency + work.decode_cpus <= 4


def test_gpus_are_shared_evenly_by_the_actors_asked_for():
    assert plan(1000, 16, 1, None, 3, None).num_gpus == pytest.approx(1 / 3)
    assert plan(1000, 16, 4, None, 2, None).num_gpus == 1.0  # never more than one GPU per actor unasked
    assert (plan(1000, 16, 2, None, None, 1).concurrency, plan(1000, 16, 2, None, None, 1).num_gpus) == (2, 1.0)
    with pytest.raises(UserError, match="concurrency must be a positive integer"):
        plan(1000, 16, 1, None, 0, None)
    with pytest.raises(UserError, match="GPUs per actor must be ≥ 0"):
        plan(1000, 16, 1, None, None, -0.5)


def test_auto_precision_is_bf16_on_gpus_unless_the_model_answers_differently():
    assert resolve_precision("auto", "cuda", "resnet152") == "bf16"
    assert resolve_precision("auto", "cuda", DEFAULT_MODEL) == "fp32"  # in KEEP_FP32: 98.9 % agreement
    assert resolve_precision("auto", "cpu", "resnet152") == "fp32"
    assert resolve_precision("bf16", "cuda", DEFAULT_MODEL) == "bf16"


def test_batch_size_left_out_is_chosen_for_the_device():
    assert plan(1000, 2, 0, None, None, None).batch_size == CPU_BATCH_SIZE
    assert plan(1000, 16, 1, None, None, None).batch_size == GPU_BATCH_SIZE
    assert plan(1000, 16, 1, 96, None, None).batch_size == 96


def test_plan_refuses_what_the_cluster_cannot_hold():
    with pytest.raises(UserError, match="concurrency 3 exceeds the 2 CPUs this run can use"):
        plan(10, 2, 0, 64, 3, None)
    with pytest.raises(UserError, match="no GPU"):
        plan(10, 2, 0, 64, None, 1)


def test_as_many_actors_as_cpus_still_finishes(small_folder, tmp_path):
    """Two single-thread actors hold both CPUs of a 2-CPU Ray: nothing else in the run may wait for a CPU."""
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--concurrency", "2", timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs" / result.stdout.strip().splitlines()[-1].split("/")[-1] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9
    assert manifest["params"]["batch_size"] is None and f"batch {CPU_BATCH_SIZE}" in manifest["device"]


def test_decode_tasks_and_self_decoding_actors_give_the_same_rows(small_folder):
    """GPU plans feed actors from decode tasks; CPU plans let actors decode: both paths run here on CPUs."""
    from pipeline import cluster
    from pipeline.labels import label_inputs
    from pipeline.sources import list_images, open_source

    (small_folder / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cluster.connect()
    source = open_source(str(small_folder))
    spec = parse_model(DEFAULT_MODEL)
    inputs = label_inputs(list_images(source), describe(spec).categories)
    rows = {}
    for actors_decode in (True, False):
        layout = Plan(1, 0.0, 1, 4, 3, actor_cpus=0.5, decode_cpus=0.5, actors_decode=actors_decode)
        dataset = build_dataset(inputs, PredictorOptions(describe(spec), threads=1, source=source), layout)
        assert ("MapBatches(decode_batch)" in str(dataset)) is not actors_decode
        table = pa.concat_tables(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
        rows[actors_decode] = sorted(table.select(["path", "label", "error"]).to_pylist(), key=lambda row: row["path"])
    assert rows[True] == rows[False] and len(rows[True]) == 10
    assert [row["path"].endswith("broken.jpg") for row in rows[True] if row["error"]] == [True]


def test_cpu_fast_path_is_a_frozen_graph_that_answers_like_the_eager_network():
    spec = parse_model(DEFAULT_MODEL)
    crops = sample_crops(7, describe(spec).preprocessing)  # 7 = a full micro-batch and a padded short one
    fast = Classifier(spec, device="cpu", precision="fp32", threads=2)
    assert fast.micro_batch == cpu_micro_batch(2) == 4
    fast_probabilities = fast.probabilities(crops)
    assert isinstance(fast.graph, torch.jit.ScriptModule)
    eager = Classifier(spec, device="cpu", precision="fp32", threads=2, fast_path=False)
    reference = eager.probabilities(crops)
    assert eager.graph is None
    assert fast_probabilities.shape == reference.shape == (7, 1000)
    assert torch.equal(fast_probabilities.argmax(1), reference.argmax(1))
    assert torch.allclose(fast_probabilities, reference, atol=1e-5)


def test_a_model_of_fewer_classes_than_top_k_ranks_all_of_them(tmp_path):
    """A user's 3-class model asked for the top 5: each image gets its 3 classes, best first, no error."""
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), tmp_path / "three.pt")
    info = describe(parse_model(checkpoint=str(tmp_path / "three.pt"), labels_file=str(tmp_path / "labels.txt")))
    batch = decoded_batch(sample_crops(5, info.preprocessing), "cat")
    rows = Predictor(PredictorOptions(info, topk=5, threads=1))(batch).to_pylist()
    assert len(rows) == 5 and all(row["error"] is None for row in rows)
    for row in rows:
        assert sorted(row["topk_labels"]) == ["bird", "cat", "dog"] and row["label"] == row["topk_labels"][0]
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True) and math.isclose(sum(row["topk_scores"]), 1, rel_tol=1e-4)


def test_a_shipped_checkpoint_loads_where_the_drivers_files_are_not(tmp_path):
    """A state dict of a torchvision architecture, put in Ray's object store (``ship_checkpoint``): a Predictor
    whose node has neither the checkpoint nor its labels file answers with the labels, like one that has them."""
    import ray

    from pipeline.cluster import connect

    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "three.pth")
    info = describe(parse_model(checkpoint=str(tmp_path / "three.pth"), arch="resnet18", labels_file=str(tmp_path / "labels.txt")))
    batch = decoded_batch(sample_crops(4, info.preprocessing), "cat")
    at_home = Predictor(PredictorOptions(info, threads=1))(batch)
    connect(None)  # a local Ray: its object store is what a cluster's would be
    shipped = ship_checkpoint(PredictorOptions(info, threads=1))
    assert isinstance(shipped.shipped_checkpoint, ray.ObjectRef)
    (tmp_path / "three.pth").unlink()
    (tmp_path / "labels.txt").unlink()
    away = Predictor(shipped)(batch)
    assert away.column("topk_labels").to_pylist() == at_home.column("topk_labels").to_pylist()
    assert np.allclose(away.column("score").to_numpy(), at_home.column("score").to_numpy(), atol=1e-6)
    assert set(away.column("label").to_pylist()) <= {"cat", "dog", "bird"}


def test_normalised_input_is_the_per_channel_formula_in_channels_last():
    spec = parse_model(DEFAULT_MODEL)
    info = describe(spec)
    imagenet = replace(info.preprocessing, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # a value per channel
    classifier = Classifier(spec, device="cpu", precision="fp32", threads=1, info=replace(info, preprocessing=imagenet))
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (imagenet.mean, imagenet.std))
    for width in (224, 97):  # the crop, and any other width
        pixels = torch.from_numpy(np.random.default_rng(width).integers(0, 256, (3, 50, width, 3), dtype=np.uint8))
        expected = (pixels.permute(0, 3, 1, 2).double() / 255 - mean) / std
        got = classifier.normalised(pixels)
        assert got.shape == (3, 3, 50, width) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got.double(), expected, atol=1e-5)


class RecordedTurn:
    """A turn on a shared device that notes when it is held: the batch must already be uploaded, and
    the results must be back when it is let go."""

    def __init__(self):
        self.held = []

    def __enter__(self):
        self.held.append("held")

    def __exit__(self, *exc):
        self.held.append("let go")


def test_a_turn_on_a_shared_device_is_held_for_the_forward_pass_only():
    classifier = Classifier(parse_model(DEFAULT_MODEL), device="cpu", precision="fp32", threads=1)
    crops = sample_crops(4, classifier.preprocessing)
    turn = RecordedTurn()
    uploaded, forward = classifier.uploaded, classifier.probabilities_of
    classifier.uploaded = lambda images: (turn.held.append("uploaded"), uploaded(images))[1]
    classifier.probabilities_of = lambda batch: (turn.held.append("forward"), forward(batch))[1]
    indices, scores, _ = classifier.top_k(crops, 3, turn=turn)
    assert turn.held == ["uploaded", "held", "forward", "let go"]
    reference = classifier.top_k(crops, 3)
    assert np.array_equal(indices, reference[0]) and np.array_equal(scores, reference[1])


def test_bf16_on_cpu_runs_a_traced_graph_that_answers_like_autocast_to_the_bit():
    """Not frozen (folding batch norm into bf16 convolutions would change the answers): traced with
    autocast's casts recorded, micro-batches padded as the frozen graph's are."""
    spec = parse_model(DEFAULT_MODEL)
    classifier = Classifier(spec, device="cpu", precision="bf16", threads=2)
    crops = sample_crops(7, classifier.preprocessing)  # a whole micro-batch, then a padded short one
    fast = classifier.probabilities(crops)
    assert isinstance(classifier.graph, torch.jit.ScriptModule) and classifier.module is None
    assert classifier.graph.inlined_graph.findAllNodes("aten::to")  # the casts to bf16 are the graph's own
    eager = Classifier(spec, device="cpu", precision="bf16", fast_path=False).probabilities(crops)
    assert torch.equal(fast, eager)
    fp32 = Classifier(spec, device="cpu", precision="fp32", fast_path=False).probabilities(crops)
    assert not torch.equal(fast, fp32)  # it does run in bf16


def test_whole_batches_as_a_gpu_runs_them_check_the_graph_on_the_first_batch_of_more_than_two(tmp_path, monkeypatch):
    """A GPU's path (whole batches, any size) on this CPU: the graph is traced on two images, so it is checked
    on a bigger batch; the eager network answers until then."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # nothing kept yet
    spec = parse_model(DEFAULT_MODEL)
    classifier = Classifier(spec, device="cpu", precision="bf16", threads=2)
    classifier.micro_batch = None  # as on a GPU
    crops = sample_crops(6, classifier.preprocessing)
    eager = Classifier(spec, device="cpu", precision="bf16", fast_path=False)
    assert torch.equal(classifier.probabilities(crops[:2]), eager.probabilities(crops[:2]))
    assert classifier.graph is None and not classifier.graph_checked
    assert torch.equal(classifier.probabilities(crops[:5]), eager.probabilities(crops[:5]))
    assert classifier.graph is not None and classifier.module is None and classifier.graph_path.is_file()
    assert torch.equal(classifier.probabilities(crops), eager.probabilities(crops))  # another size, from the graph


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@needs_cuda
def test_gpu_classifier_answers_like_the_cpu():
    spec = parse_model(DEFAULT_MODEL)
    crops = sample_crops(64, describe(spec).preprocessing)
    cpu = Classifier(spec, device="cpu", precision="fp32", fast_path=False).probabilities(crops)
    gpu = Classifier(spec, device="cuda", precision="bf16")
    assert gpu.micro_batch is None
    fast = gpu.probabilities(crops)
    exact = Classifier(spec, device="cuda").probabilities(crops).cpu()  # auto: fp32 for this model
    assert fast.shape == (64, 1000) and torch.allclose(fast.sum(1).cpu(), torch.ones(64), atol=1e-3)
    assert (exact.argmax(1) == cpu.argmax(1)).float().mean() >= 0.98
    assert (fast.argmax(1).cpu() == cpu.argmax(1)).float().mean() >= 0.95


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_gpu_worker_keeps_a_traced_graph_and_the_next_one_loads_it_with_the_same_answers(precision):
    """What spares a GPU worker torchvision's import (and torch._dynamo's): the graph holds the whole network."""
    spec = parse_model(DEFAULT_MODEL)
    crops = sample_crops(48, describe(spec).preprocessing)
    first = Classifier(spec, device="cuda", precision=precision)
    built = first.probabilities(crops)
    assert isinstance(first.graph, torch.jit.ScriptModule) and first.graph_path.is_file(), "no graph kept on the GPU"
    second = Classifier(spec, device="cuda", precision=precision)
    assert second.module is None and isinstance(second.graph, torch.jit.ScriptModule)
    eager = Classifier(spec, device="cuda", precision=precision, fast_path=False).probabilities(crops)
    assert torch.allclose(second.probabilities(crops), eager, atol=1e-3) and torch.allclose(built, eager, atol=1e-3)
    assert torch.allclose(second.probabilities(crops[:5]), eager[:5], atol=1e-3)  # a batch of another size


@needs_cuda
def test_a_ray_run_on_a_gpu_machine_uses_the_gpu(small_folder, tmp_path):
    """Ray's GPU path (a small run's auto, local workers, is test_local's CUDA test)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray (not installed here)")
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--engine", "ray", timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs" / result.stdout.strip().splitlines()[-1].split("/")[-1] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9
    assert f"{ACTORS_PER_GPU}× CUDA actor(s), fp32, batch {GPU_BATCH_SIZE}" in manifest["device"]


FAULTS_PER_BATCH = """
import resource, sys
import numpy as np
from pipeline.inference import Predictor, PredictorOptions
from pipeline.models import DEFAULT_MODEL, describe, parse_model
from pipeline.sources import list_images, open_source

source = open_source(sys.argv[1])
paths = [source.to_uri(f) for f in list_images(source).files][:64]
batch = {"path": np.array(paths, dtype=object), "ground_truth": np.array([None] * 64, dtype=object)}
predictor = Predictor(PredictorOptions(describe(parse_model(DEFAULT_MODEL)), threads=1, source=source))
for _ in range(3):  # the model's first batches build its buffers
    predictor(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    predictor(batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what a CPU Predictor tunes; this is not glibc")
def test_a_cpu_predictor_reuses_its_memory_from_batch_to_batch():
    """Freed buffers given back to the OS come back as page faults in the next batch: thousands of them
    per batch (~164,000 for this one without the setting), a third of a worker's CPU time."""
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_BATCH, str(SAMPLE)], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 1000


@needs_cuda
def test_an_exported_program_answers_on_the_gpu_like_on_the_cpu(tmp_path):
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 224, 224),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "mine.pt2")
    spec = parse_model(checkpoint=str(tmp_path / "mine.pt2"), labels_file=str(tmp_path / "labels.txt"))
    crops = sample_crops(16, describe(spec).preprocessing)
    cpu = Classifier(spec, device="cpu", precision="fp32").probabilities(crops)
    gpu = Classifier(spec, device="cuda", precision="fp32").probabilities(crops).cpu()
    assert gpu.shape == (16, 10) and torch.allclose(gpu, cpu, atol=1e-2)  # cuDNN's convolutions may run in TF32


def test_the_collector_is_paused_while_a_model_loads_and_left_as_it_was_found():
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        assert not gc.isenabled()
        raise ValueError("a model that fails to load")
    assert gc.isenabled()
    gc.disable()  # turned off by someone else: theirs to turn on
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    code = (
        "import gc, sys; from pipeline.inference import Classifier; from pipeline.models import ModelSpec; "
        "assert 'torch' not in sys.modules; before = sum(g['collections'] for g in gc.get_stats()); "
        "Classifier(ModelSpec(), device='cpu', fast_path=False); "
        "print(sum(g['collections'] for g in gc.get_stats()) - before, gc.isenabled())"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
    collections, enabled = loaded.stdout.split()
    assert int(collections) < 10 and enabled == "True", loaded.stderr  # torch's import alone triggers hundreds
