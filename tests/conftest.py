"""Shared fixtures: small real image folders, a temporary torch hub with a real (random) checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "pipeline" / "sample_data" / "imagenette"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(env: dict | None = None) -> dict:
    """The environment of a ``python -m pipeline`` process: this checkout first on the path, keeping
    whatever the caller's PYTHONPATH adds (packages installed with --target, say)."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **(env or {})}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a fresh process, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout, env=cli_env(env), cwd=cwd or ROOT
    )


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory) -> Path:
    """Frozen graphs and the torchvision catalogue kept by this session go to a temporary folder, never the user's cache."""
    from pipeline.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("graphs")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(autouse=True)
def main_module_kept():
    """Streamlit's AppTest leaves the app it ran as ``__main__``: every worker process a later test starts
    (local workers, as spawned processes do) would import the app again, running the whole dashboard there."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """Three real Imagenette images per class for three classes, in WordNet-id folders."""
    root = tmp_path / "images"
    for wnid in sorted(p.name for p in SAMPLE.iterdir())[:3]:
        (root / wnid).mkdir(parents=True)
        for image in sorted((SAMPLE / wnid).iterdir())[:3]:
            shutil.copy(image, root / wnid / image.name)
    return root


def add_kittens(root: Path) -> None:
    """A folder named after no ImageNet class (``kittens``), holding one real photo from ``root``."""
    (root / "kittens").mkdir()
    shutil.copy(next((root / "n01440764").iterdir()), root / "kittens" / "cat.jpg")


def small_input_program(folder: Path, images: Path) -> tuple[Path, Path]:
    """A user's own network of 32-px inputs only (a linear layer over their 3 × 32 × 32 values) saved by
    torch.export for batches of any size, and its labels file: the class folders of ``images``."""
    import torch

    classes = sorted(child.name for child in images.iterdir() if child.is_dir())
    labels = folder / "labels.txt"
    labels.write_text("\n".join(classes) + "\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, len(classes))).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "small-input.pt2")
    return folder / "small-input.pt2", labels


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding resnet18's checkpoint under torchvision's file name, randomly initialised.

    The real loader reads it exactly as it would read downloaded weights.
    """
    import torch
    import torchvision

    from pipeline.models import hub_checkpoint_path

    home = tmp_path_factory.mktemp("torch_home")
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        target = hub_checkpoint_path(weights.url)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), target)
    finally:
        if previous is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = previous
    return home
