"""torchvision's classifiers and their weights, described without importing torchvision.

Naming, checking and describing a torchvision model (its weights, categories, preprocessing and
checkpoint URL) needs torchvision's metadata, and importing torchvision costs ~6 s on 2 cores (torch
3.3 s, its model zoo 2.7 s): on every run's driver, where nothing else needs torch. So the metadata is
read once per torchvision version, by importing it, and kept as JSON in this project's cache
(``cache``); later processes read the file instead. Weights without categories (vgg16's
``IMAGENET1K_FEATURES``, a feature extractor) are not classifiers and are left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .cache import cache_dir, package_version, write_atomically
from .preprocess import Preprocessing

CATALOGUE_FORMAT = 1  # bump whenever what is kept per weights changes


@dataclass(frozen=True)
class Weights:
    name: str
    url: str
    categories: tuple[str, ...]
    preprocessing: Preprocessing


@dataclass(frozen=True)
class Architecture:
    name: str
    default: str  # the name of torchvision's DEFAULT weights
    weights: dict[str, Weights]


@lru_cache(maxsize=1)
def architectures() -> dict[str, Architecture]:
    """Every torchvision classifier by name: read from the kept file, or built (and kept) on first use."""
    path = cache_dir() / f"torchvision-{package_version('torchvision')}-catalogue-{CATALOGUE_FORMAT}.json"
    try:
        return _parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # absent or unreadable: build it again
        pass
    catalogue = _build()
    write_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(catalogue)))
    return _parse(catalogue)


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME") or os.path.join(cache, "torch"))) / "hub"


def preprocessing_of(transforms) -> Preprocessing:
    """What torchvision's ``weights.transforms()`` does, as this project's ``Preprocessing``."""
    interpolation = getattr(transforms.interpolation, "value", "bilinear")
    return Preprocessing(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


def _build() -> dict:
    import torchvision.models as models

    category_lists: list[list[str]] = []
    architectures_: dict[str, dict] = {}
    for name in models.list_models(module=models):
        enum = models.get_model_weights(name)
        weights = {}
        for member in enum:
            categories = member.meta.get("categories")
            if not categories:
                continue
            if list(categories) not in category_lists:
                category_lists.append(list(categories))
            weights[member.name] = {
                "url": member.url,
                "categories": category_lists.index(list(categories)),
                "preprocessing": asdict(preprocessing_of(member.transforms())),
            }
        architectures_[name] = {"default": enum.DEFAULT.name, "weights": weights}
    return {"categories": category_lists, "architectures": architectures_}


def _parse(catalogue: dict) -> dict[str, Architecture]:
    lists = [tuple(names) for names in catalogue["categories"]]

    def weights(name: str, entry: dict) -> Weights:
        prep = entry["preprocessing"]
        preprocessing = Preprocessing(prep["resize"], prep["crop"], tuple(prep["mean"]), tuple(prep["std"]), prep["interpolation"])
        return Weights(name, entry["url"], lists[entry["categories"]], preprocessing)

    return {
        name: Architecture(name, entry["default"], {w: weights(w, e) for w, e in entry["weights"].items()})
        for name, entry in catalogue["architectures"].items()
    }
