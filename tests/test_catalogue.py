import subprocess
import sys

import pytest
import torch.hub
import torchvision.models as models

from pipeline import catalogue
from pipeline.cache import CACHE_ENV

from .conftest import ROOT


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "efficientnet_b0", "inception_v3", "vgg16"])
def test_the_catalogue_says_what_torchvision_says(name):
    kept = catalogue.architectures()[name]
    enum = models.get_model_weights(name)
    assert kept.default == enum.DEFAULT.name
    assert list(kept.weights) == [w.name for w in enum if w.meta.get("categories")]  # vgg16's feature weights are no classifier
    for weights in kept.weights.values():
        expected = enum[weights.name]
        assert weights.url == expected.url and weights.categories == tuple(expected.meta["categories"])
        assert weights.preprocessing == catalogue.preprocessing_of(expected.transforms())
    assert list(catalogue.architectures()) == models.list_models(module=models)


def test_a_kept_catalogue_describes_models_without_importing_torch(tmp_path):
    code = (
        "import sys; from pipeline.models import describe, parse_model; info = describe(parse_model('resnet50')); "
        "print(info.preprocessing.resize, len(info.categories), 'torch' in sys.modules)"
    )
    env = {"PYTHONPATH": str(ROOT), CACHE_ENV: str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True) for _ in range(2))
    assert first.stdout.split() == ["232", "1000", "True"]  # built: torchvision imported once
    assert second.stdout.split() == ["232", "1000", "False"]


def test_an_unreadable_catalogue_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    catalogue.architectures.cache_clear()
    try:
        catalogue.architectures()
        (kept,) = tmp_path.glob("torchvision-*-catalogue-*.json")
        kept.write_text('{"categories": [], "architectures": {"resnet50": {')
        catalogue.architectures.cache_clear()
        assert catalogue.architectures()["resnet50"].default == "IMAGENET1K_V2"
        assert '"resnet50"' in kept.read_text()
    finally:
        catalogue.architectures.cache_clear()


@pytest.mark.parametrize("variables", [{}, {"TORCH_HOME": "/opt/th"}, {"XDG_CACHE_HOME": "/var/cache/x"}])
def test_the_hub_folder_is_torchs(variables, monkeypatch):
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert str(catalogue.torch_hub_dir()) == torch.hub.get_dir()
