import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from pipeline import graphs
from pipeline.cache import CACHE_ENV
from pipeline.inference import Classifier
from pipeline.models import DEFAULT_MODEL, describe, parse_model

from .conftest import ROOT
from .test_inference import sample_crops


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "graphs"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def fast_classifier() -> Classifier:
    return Classifier(parse_model(DEFAULT_MODEL), device="cpu", precision="fp32", threads=2)


def test_a_kept_graph_replaces_building_the_network_and_answers_the_same(cache):
    first = fast_classifier()
    assert first.module is not None and first.graph is None  # nothing kept yet: the network is built
    crops = sample_crops(6, first.preprocessing)
    built = first.probabilities(crops)
    assert first.graph_path.parent == cache and first.graph_path.is_file()

    second = fast_classifier()
    assert second.module is None and isinstance(second.graph, torch.jit.ScriptModule)
    assert torch.allclose(second.probabilities(crops), built, atol=1e-6)


def test_concurrent_first_calls_build_the_graph_once_and_agree(cache, monkeypatch):
    """The dashboard shares one Classifier between sessions; two previews may be its first calls."""
    builds = []
    build = graphs.frozen_graph
    monkeypatch.setattr(graphs, "frozen_graph", lambda module, chunk: builds.append(chunk.shape) or build(module, chunk))
    classifier = fast_classifier()
    crops = sample_crops(6, classifier.preprocessing)
    together = threading.Barrier(2)

    def first_call(_):
        together.wait()
        return classifier.probabilities(crops)

    with ThreadPoolExecutor(2) as pool:
        one, other = pool.map(first_call, range(2))
    assert len(builds) == 1 and classifier.module is None
    assert torch.allclose(one, other, atol=1e-6)


def test_a_kept_graph_spares_the_actor_timm_and_torchvision(cache):
    fast_classifier().probabilities(sample_crops(4, describe(parse_model(DEFAULT_MODEL)).preprocessing))
    code = (
        "import sys; from pipeline.inference import Classifier; from pipeline.models import ModelSpec; "
        "c = Classifier(ModelSpec(), device='cpu', precision='fp32', threads=2); "
        "print(c.module is None, 'timm' in sys.modules, 'torchvision' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr


def test_the_key_follows_the_weights_file_the_micro_batch_the_device_and_the_precision(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"weights")
    info = replace(describe(parse_model(DEFAULT_MODEL)), weights_path=str(weights))
    path = graphs.graph_path(info, 4)
    assert path == graphs.graph_path(info, 4, "cpu", "fp32") != graphs.graph_path(info, 2)
    others = {graphs.graph_path(info, 4, "cpu", "bf16"), *(graphs.graph_path(info, None, "cuda", p) for p in ("bf16", "fp32"))}
    assert len(others) == 3 and path not in others
    assert graphs.graph_path(info, None, "cuda:1", "bf16") == graphs.graph_path(info, None, "cuda", "bf16")  # one graph for every GPU
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # retrained, saved under the same name
    assert graphs.graph_path(info, 4) != path
    assert graphs.graph_path(replace(info, weights_path=str(tmp_path / "absent.pth")), 4) is None


def test_past_its_budget_the_cache_forgets_the_graphs_used_longest_ago(cache, monkeypatch):
    cache.mkdir()
    network = torch.nn.Conv2d(3, 4, 1).eval()
    with torch.inference_mode():
        graph = graphs.frozen_graph(network, torch.rand(2, 3, 8, 8))
    for age, name in enumerate(["newest.pt", "recent.pt", "old.pt", "oldest.pt"]):
        graphs.keep(graph, cache / name)
        os.utime(cache / name, (1e9 - age * 1000, 1e9 - age * 1000))
    size = (cache / "newest.pt").stat().st_size
    (cache / ".partial-x.pt").write_bytes(b"a graph being written")
    (cache / "torchvision-0.29.1-catalogue-1.json").write_text("{}")
    assert graphs.load(cache / "oldest.pt") is not None  # used now: the last to go
    monkeypatch.setattr(graphs, "MAX_KEPT_BYTES", 3 * size)
    graphs.keep(graph, cache / "new.pt")
    left = {p.name for p in cache.iterdir()}
    assert left == {"new.pt", "oldest.pt", "newest.pt", ".partial-x.pt", "torchvision-0.29.1-catalogue-1.json"}


def test_an_unreadable_kept_graph_is_rebuilt(cache):
    path = fast_classifier().graph_path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")
    classifier = fast_classifier()
    assert classifier.graph is None and classifier.module is not None
    classifier.probabilities(sample_crops(4, classifier.preprocessing))
    assert isinstance(graphs.load(path), torch.jit.ScriptModule)


def test_a_cache_that_cannot_be_written_still_classifies(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "graphs"))
    classifier = fast_classifier()
    probabilities = classifier.probabilities(sample_crops(4, classifier.preprocessing))
    assert isinstance(classifier.graph, torch.jit.ScriptModule) and probabilities.shape == (4, 1000)
    assert not (blocker / "graphs").exists()


class Noisy(torch.nn.Module):
    """Answers differently on every call: a traced copy cannot reproduce it."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) + torch.rand(x.shape[0], 3)


class Untraceable(torch.nn.Module):
    def forward(self, x):
        return {"logits": x.mean(dim=(2, 3)), "shape": list(x.shape)}


class KeepsItsExamplesBatch(torch.nn.Module):
    """Traced on two images, answers two images whatever it is given."""

    def forward(self, x):
        return x.mean(dim=(2, 3))[: int(x.shape[0])]


@pytest.mark.parametrize("module", [Noisy(), Untraceable()])
def test_a_graph_that_fails_or_disagrees_is_not_used(module):
    with torch.inference_mode():
        assert graphs.frozen_graph(module.eval(), torch.ones(2, 3, 8, 8)) is None
        assert graphs.traced_graph(module.eval(), torch.ones(3, 3, 8, 8), "fp32") is None


def test_a_traced_graph_that_kept_its_examples_batch_size_is_not_used():
    with torch.inference_mode():
        assert graphs.traced_graph(KeepsItsExamplesBatch(), torch.rand(5, 3, 8, 8), "fp32") is None
        assert graphs.traced_graph(KeepsItsExamplesBatch(), torch.rand(2, 3, 8, 8), "fp32") is not None  # nothing to tell it by


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_traced_graph_answers_batches_of_any_size_like_the_network(precision):
    """What a GPU worker runs (on a CPU here): autocast's casts are in the graph, which runs without autocast."""
    torch.manual_seed(0)
    layers = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    network = torch.nn.Sequential(*layers, torch.nn.Linear(8, 4)).eval()
    with torch.inference_mode():
        graph = graphs.traced_graph(network, torch.rand(6, 3, 16, 16), precision)
        assert graph is not None
        for size in (1, 2, 9):
            x = torch.rand(size, 3, 16, 16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                expected = network(x)
            got = graphs.run(graph, x)
            assert got.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32) and torch.equal(got, expected)
        assert not torch.is_autocast_enabled("cpu") and torch._C._jit_set_autocast_mode(True)  # both left as they were


def test_every_convolution_of_a_kept_graph_calls_onednn_and_answers_like_the_network(cache):
    """On one thread PyTorch would send the 1×1 convolutions of a micro-batch to its slow im2col path."""
    threads = torch.get_num_threads()
    try:
        classifier = Classifier(parse_model(DEFAULT_MODEL), device="cpu", precision="fp32", threads=1)
        network = classifier.module
        crops = sample_crops(5, classifier.preprocessing)  # a full micro-batch and a padded short one
        probabilities = classifier.probabilities(crops)
    finally:
        torch.set_num_threads(threads)  # the Classifier set one thread for the whole process
    kept = graphs.load(classifier.graph_path).graph
    assert len(kept.findAllNodes("aten::mkldnn_convolution")) == sum(isinstance(m, torch.nn.Conv2d) for m in network.modules()) > 30
    assert not kept.findAllNodes("aten::_convolution")
    assert not kept.findAllNodes("aten::pad") and not kept.findAllNodes("aten::constant_pad_nd")  # same_padding_at_the_border
    eager = Classifier(parse_model(DEFAULT_MODEL), device="cpu", precision="fp32", fast_path=False)
    assert torch.allclose(probabilities, eager.probabilities(crops), atol=1e-4)


def test_a_transposed_convolution_keeps_pytorchs_kernel():
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ConvTranspose2d(4, 3, 2, stride=2)).eval()
    with torch.inference_mode():
        graph = graphs.frozen_graph(module, torch.rand(2, 3, 8, 8))
    assert len(graph.graph.findAllNodes("aten::mkldnn_convolution")) == 1
    assert len(graph.graph.findAllNodes("aten::_convolution")) == 1


def test_a_torch_without_onednn_keeps_its_own_convolutions(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.inference_mode():
        graph = graphs.frozen_graph(torch.nn.Conv2d(3, 4, 1).eval(), torch.rand(2, 3, 8, 8))
    assert not graph.graph.findAllNodes("aten::mkldnn_convolution") and graph.graph.findAllNodes("aten::_convolution")


def test_same_padding_at_the_border_answers_like_timms_padding():
    from timm.layers import Conv2dSame

    network = torch.nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), Conv2dSame(8, 8, 5, stride=2, groups=8), Conv2dSame(8, 4, 3, dilation=2)
    ).eval()
    rewritten = graphs.same_padding_at_the_border(network)
    assert rewritten is not network and all(type(m) is Conv2dSame for m in network[:])  # the network itself is left as it was
    assert not any(isinstance(m, Conv2dSame) for m in rewritten.modules())
    with torch.inference_mode():
        for size in [(32, 32), (33, 30), (7, 9)]:  # even and odd sides: the odd pixel of padding goes after
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.rand(2, 3, *size).contiguous(memory_format=layout)
                assert torch.equal(rewritten(x), network(x))
        graph = graphs.frozen_graph(network, torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert graph is not None and not graph.graph.findAllNodes("aten::pad") and not graph.graph.findAllNodes("aten::constant_pad_nd")
    plain = torch.nn.Conv2d(3, 4, 3)
    assert graphs.same_padding_at_the_border(plain) is plain


def test_a_kept_graph_runs_as_frozen_with_the_same_logits_as_the_executors_optimisation(cache):
    classifier = fast_classifier()
    crops = sample_crops(classifier.micro_batch, classifier.preprocessing)
    classifier.probabilities(crops)  # builds and keeps the graph
    with torch.inference_mode():
        batch = classifier.normalised(torch.from_numpy(crops))
        frozen = graphs.load(classifier.graph_path)
        as_frozen = [graphs.run(frozen, batch) for _ in range(3)]
        assert torch._C._get_graph_executor_optimize()  # the thread's setting is back
        optimised = graphs.load(classifier.graph_path)
        by_the_executor = [optimised(batch) for _ in range(3)]  # profiled, rewritten, then run
    assert all(torch.equal(logits, by_the_executor[-1]) for logits in as_frozen + by_the_executor)
