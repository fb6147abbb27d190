"""Ground truth from folder names, mapped onto a model's categories.

A folder named with an ImageNet WordNet id (``n01440764``) means that ImageNet class; any other
folder name is a class name, matched to the model's categories ignoring case, spaces and underscores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

WNID = re.compile(r"^n\d{8}$")


def normalize(name: str) -> str:
    """Canonical form for matching class names: case, underscores and runs of spaces don't matter."""
    return " ".join(name.replace("_", " ").lower().split())


@lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    """ImageNet-1k WordNet id → class index, from the table timm ships (works offline)."""
    info = _imagenet_info()
    return {info.index_to_label_name(i): i for i in range(info.num_classes())}


def wnid_description(wnid: str) -> str | None:
    """First synonym of a WordNet id's description (``n01440764`` → ``tench``)."""
    if wnid not in wnid_to_index():
        return None
    return _imagenet_info().label_name_to_description(wnid).split(",")[0].strip()


class LabelMapper:
    """Turns a parent-folder name into the model's category name (or keeps the folder name)."""

    def __init__(self, categories: Sequence[str]):
        self.categories = list(categories)
        self._by_name: dict[str, str] = {}
        for category in self.categories:
            self._by_name.setdefault(normalize(category), category)
        self._cache: dict[str, str] = {}

    def __call__(self, folder: str) -> str:
        hit = self._cache.get(folder)
        if hit is None:
            hit = self._cache[folder] = self._resolve(folder)
        return hit

    def _resolve(self, folder: str) -> str:
        if WNID.match(folder):
            index = wnid_to_index().get(folder)
            if index is not None and len(self.categories) == 1000:
                return self.categories[index]
            description = wnid_description(folder)
            if description is not None:
                return self._by_name.get(normalize(description), folder)
            return folder
        return self._by_name.get(normalize(folder), folder)


def folder_of(relative_path: str) -> str | None:
    """The parent folder of a path relative to the dataset root; None for files at the root."""
    parts = relative_path.strip("/").split("/")
    return parts[-2] if len(parts) >= 2 else None
