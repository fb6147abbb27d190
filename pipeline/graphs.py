"""Kept TorchScript graphs of the networks, built once per model and machine and kept on disk.

Building a network needs its Python code first (torchvision imports ``torch._dynamo``, and timm
imports torchvision: ~1 s on 2 cores, 5.2 s on the H100 machines' CPUs), on the critical path of every
run's model actor. Loading a kept graph needs only torch and takes a tenth of a second. Two kinds:
on a CPU in fp32, the network traced and frozen for the micro-batch it runs (``frozen_graph``); on a
GPU (whole batches of any size), or in bf16, the network traced with autocast's casts recorded
(``traced_graph``), giving the eager network's answers (to the bit on the CPUs here). A graph is kept only after it
reproduced the eager network's logits, under a key naming everything that shapes it: the model, its
weights file (path, size, modification time), the micro-batch and crop, the device and precision, the
torch/torchvision/timm versions, the CPU's instruction set and this project's way of building graphs
(``GRAPH_FORMAT``). Set ``PIPELINE_GRAPH_CACHE`` to move the folder; delete it to rebuild every graph.
Past ``MAX_KEPT_BYTES`` of graphs, the least recently used are deleted.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from .cache import cache_dir, package_version, write_atomically
from .models import ModelInfo

GRAPH_FORMAT = 4  # bump whenever this project changes how a network is built, wrapped or traced
# Graphs kept in all, at most: past it, the least recently used go (resnet152's is 242 MB, vit_h_14's 2.5 GB;
# each model has one per micro-batch size, device kind and precision it ran with).
MAX_KEPT_BYTES = 4 * 1024**3


def graph_path(info: ModelInfo, micro_batch: int | None, device: str = "cpu", precision: str = "fp32") -> Path | None:
    """Where the graph for this model, weights file, micro-batch (None: batches of any size), device and
    precision on this machine lives; None when the weights file is not on this machine (a cluster node laid
    out unlike the driver): no cache then."""
    import torch

    weights = Path(info.weights_path)
    if not weights.is_file():
        return None
    stat = weights.stat()
    identity = {
        "format": GRAPH_FORMAT,
        "spec": info.spec.to_dict(),
        "weights": [str(weights.resolve()), stat.st_size, stat.st_mtime_ns],
        "input": [micro_batch, 3, info.preprocessing.crop, info.preprocessing.crop],
        "device": torch.device(device).type,
        "precision": precision,
        "versions": [package_version("torch"), package_version("torchvision"), package_version("timm")],
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", info.spec.display_name)
    return cache_dir() / f"{name}-{digest}.pt"


def load(path: Path | None, device: str = "cpu"):
    """The kept graph on ``device``, or None when there is none or it cannot be read (it is then rebuilt)."""
    import torch

    if path is None or not path.is_file():
        return None
    try:
        with _jit_quietly():
            graph = torch.jit.load(str(path), map_location=device)
    except Exception:
        return None
    with contextlib.suppress(OSError):  # a read-only cache keeps no order of use
        os.utime(path)  # used now: the last to go (``_forget_least_recently_used``)
    return graph


def keep(graph, path: Path | None) -> None:
    """Keep a verified graph where ``graph_path`` said; a read-only disk just means no cache."""
    import torch

    def save(temporary: str) -> None:
        with _jit_quietly():
            torch.jit.save(graph, temporary)

    if path is not None:
        write_atomically(path, save)
        _forget_least_recently_used(path, MAX_KEPT_BYTES)


def _forget_least_recently_used(kept: Path, budget: int) -> None:
    """Delete the graphs used longest ago until those left, ``kept`` included, fit in ``budget`` bytes:
    every new model, device or precision keeps one more, and nothing else would ever free the disk."""
    with contextlib.suppress(OSError):
        others = [p for p in kept.parent.glob("*.pt") if p != kept and not p.name.startswith(".")]  # not a file being written
        total = kept.stat().st_size
        for path in sorted(others, key=lambda p: p.stat().st_mtime_ns, reverse=True):
            total += path.stat().st_size
            if total > budget:
                path.unlink(missing_ok=True)


def frozen_graph(module, example):
    """``module`` traced and frozen for ``example``'s shape, or None when tracing fails or changes the answer."""
    import torch

    try:
        with _jit_quietly():
            graph = torch.jit.freeze(torch.jit.trace(same_padding_at_the_border(module), example, check_trace=False))
            convolutions_on_onednn(graph.graph)  # before the first call: the executor keeps the graph it first ran
        expected, got = module(example), run(graph, example)
    except Exception:
        return None
    return graph if _same_logits(got, expected) else None


def traced_graph(module, batch, precision: str):
    """``module`` traced on two images of ``batch`` as it runs in ``precision``, for batches of any size; None
    when tracing fails or the graph does not give ``module``'s logits on the whole of ``batch``.

    In bf16 the trace is taken under autocast, with TorchScript's own handling of autocast off, so that the
    casts autocast makes (inputs and weights to bf16 before each convolution, back to fp32 where autocast
    keeps fp32) are recorded as operations of the graph: it then runs without autocast and gives the eager
    network's answers (to the bit on a CPU). A graph traced in fp32 and run under autocast would not: TorchScript
    records convolutions as ``aten::_convolution``, which CPU autocast leaves in fp32. Checked on a batch of
    another size than the trace's, so that a graph that kept its example's batch size is refused.
    """
    import torch

    device = batch.device.type
    try:
        with _jit_quietly(), _autocast_recorded(device, enabled=precision == "bf16"):
            graph = torch.jit.trace(module, batch[:2], check_trace=False)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            expected = module(batch)
        got = run(graph, batch)
    except Exception:
        return None
    return graph if _same_logits(got, expected) else None


def _same_logits(got, expected) -> bool:
    """Whether a graph's logits are the eager network's: the condition for keeping it."""
    import torch

    if got.dtype != expected.dtype or got.shape != expected.shape:
        return False
    return torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3)


@contextlib.contextmanager
def _autocast_recorded(device: str, enabled: bool):
    """bf16 autocast for a trace, whose casts the trace records (``traced_graph``)."""
    import torch

    if not enabled:
        yield
        return
    jit_autocast = torch._C._jit_set_autocast_mode(False)  # returns the mode it replaces
    try:
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):
            yield
    finally:
        torch._C._jit_set_autocast_mode(jit_autocast)


def run(graph, batch):
    """``graph`` on ``batch``, as it was frozen. The TorchScript executor's own optimisation of a graph
    (profiling its first call, rewriting it on the second) changes neither a frozen graph's answers nor
    its later calls' speed on the CPU, and slows those two calls: one core, micro-batches of 4, the
    first two took 77-83 and 50-53 ms with it, 47-52 and 27-31 without (efficientnet_lite0, ~24 ms
    a call after), 208-212 and 160-169 against 178-193 and 159-167 (resnet50, ~153 after). The
    setting is the calling thread's."""
    import torch

    with torch.jit.optimized_execution(False):
        return graph(batch)


def same_padding_at_the_border(module):
    """A copy of ``module`` whose TF-"same" convolutions (timm's ``Conv2dSame``) pad the same way but write
    zeros on the border only; ``module`` itself when it has none.

    ``Conv2dSame`` pads with ``F.pad``, which zero-fills the whole padded tensor and then copies the input
    into it. efficientnet_lite0 pads five times a forward pass, up to 96 channels at 113 × 113: its frozen
    graph went from 6.28 to 5.86 ms an image on micro-batches of 4 (one core), with the same logits.
    """
    layers = sys.modules.get("timm.layers")  # a network with timm's layers was built by timm, imported then
    if layers is None or not any(isinstance(m, layers.Conv2dSame) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for child in module.modules():
        if isinstance(child, layers.Conv2dSame):
            child.__class__ = _border_padded_conv()  # the same parameters and attributes; padding is 0 in both
    return module


@functools.cache
def _border_padded_conv():
    import torch

    class BorderPaddedConv2d(torch.nn.Conv2d):
        """timm's ``Conv2dSame``: TF's "same" padding (the odd pixel after), zeros written on the border only."""

        def forward(self, x):
            *_, height, width = x.shape
            pad_h = _same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
            pad_w = _same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
            top, left = pad_h // 2, pad_w // 2
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            padded = torch.empty((*x.shape[:2], height + pad_h, width + pad_w), dtype=x.dtype, device=x.device, memory_format=layout)
            padded[:, :, top : top + height, left : left + width] = x
            padded[:, :, :top] = 0
            padded[:, :, top + height :] = 0
            padded[:, :, top : top + height, :left] = 0
            padded[:, :, top : top + height, left + width :] = 0
            return torch.nn.functional.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    return BorderPaddedConv2d


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding of TF's "same" convolution along one dimension, as timm's ``get_same_padding`` gives
    it, in whole numbers: timm's, handed the sizes torch's tracer makes tensors of, divides in floats, and
    a float tensor cannot slice the padded tensor."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def convolutions_on_onednn(graph) -> None:
    """Every (non-transposed) convolution of a frozen graph calls oneDNN directly.

    PyTorch picks a convolution's kernel per call, and on one thread it sends 1×1 convolutions of fewer
    than 16 images to its im2col path, in the belief that it is faster there than oneDNN. A
    single-threaded actor on micro-batches is exactly that case, and there it is much slower: measured
    on a 2-core AVX-512 EPYC, one thread, micro-batches of 2, 103 → 154 img/s for efficientnet_lite0
    (49 convolutions, 32 of them 1×1) and 16.7 → 23.8 for resnet50. With more threads PyTorch
    already picks oneDNN, so they run the same kernels as before. With oneDNN, ATen and MKL held to
    AVX2 on that CPU (one thread, micro-batches of 4): 85 → 98-102 and 12.5 → 13.6 img/s. A torch built
    without oneDNN keeps PyTorch's choice."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return
    for node in list(graph.findAllNodes("aten::_convolution")):
        # _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
        source, weight, bias, stride, padding, dilation, transposed, _, groups = list(node.inputs())[:9]
        if transposed.toIValue() is not False:
            continue
        onednn = graph.create("aten::mkldnn_convolution", [source, weight, bias, padding, stride, dilation, groups], 1)
        onednn.insertBefore(node)
        onednn.output().setType(node.output().type())
        node.output().replaceAllUsesWith(onednn.output())
        node.destroy()


@contextlib.contextmanager
def _jit_quietly():
    """torch.jit warns that it is deprecated (and tracing warns about shapes) on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
