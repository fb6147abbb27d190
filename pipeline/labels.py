"""Ground truth from folder names, mapped onto a model's categories.

A folder named with an ImageNet WordNet id (``n01440764``) means that ImageNet class; any other
folder name is a class name, matched to the model's categories ignoring case, spaces and underscores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from .sources import Listing

WNID = re.compile(r"^n\d{8}$")


def normalize(name: str) -> str:
    """Canonical form for matching class names: case, underscores and runs of spaces don't matter."""
    return " ".join(name.replace("_", " ").lower().split())


MAX_LABEL_SET = 100  # classes whose scores every row stores for label-set-restricted evaluation
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")


@dataclass(frozen=True)
class ImageNetClass:
    """One ImageNet-1k class: WordNet id, torchvision's display name, WordNet's description."""

    wnid: str
    name: str
    description: str


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1,000 classes in model order, shipped as text (torchvision's names, timm's WordNet table) so
    that a driver labelling its inputs never imports torch, whose import costs seconds of every run."""
    lines = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(ImageNetClass(*line.split("\t")) for line in lines)


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    """ImageNet-1k WordNet id → class index."""
    return {imagenet_class.wnid: index for index, imagenet_class in enumerate(imagenet_classes())}


def wnid_description(wnid: str) -> str | None:
    """First synonym of a WordNet id's description (``n01440764`` → ``tench``)."""
    index = wnid_to_index().get(wnid)
    if index is None:
        return None
    return imagenet_classes()[index].description.split(",")[0].strip()


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


def label_inputs(listing: Listing, categories: Sequence[str]) -> pa.Table:
    """(path, ground_truth) for every input, ground truth from the parent folder's name, worked out
    once per folder (a million inputs live in a few thousand folders)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mapper = LabelMapper(categories)
    source = listing.source
    paths = pa.array([source.to_uri(fs_path) for fs_path in listing.files], pa.string())  # chunked past 2 GiB
    folders = pc.replace_substring_regex(paths, pattern="/[^/]*$", replacement="")
    folder_ids = pc.index_in(folders, value_set=pc.unique(folders)).to_numpy()
    _, first_file = np.unique(folder_ids, return_index=True)
    truths = []
    for index in first_file:
        folder = folder_of(source.relative(listing.files[index]))
        truths.append(mapper(folder) if folder else None)
    return pa.table({"path": paths, "ground_truth": pa.array(truths, pa.string()).take(folder_ids)})


def dataset_classes(listing: Listing, categories: Sequence[str]) -> list[str] | None:
    """``label_set`` of a listing's inputs, worked out once per listing and model categories."""
    key = ("label_set", tuple(categories))
    if key not in listing.derived:
        listing.derived[key] = label_set(label_inputs(listing, categories), categories)
    return listing.derived[key]


def label_set(inputs: pa.Table, categories: Sequence[str]) -> list[str] | None:
    """The model classes the dataset's ground truth uses, in model order, when they are a real subset
    small enough to store their scores on every row (Imagenette: 10 of ImageNet's 1,000)."""
    import pyarrow.compute as pc

    known = set(categories)
    present = {truth for truth in pc.unique(inputs.column("ground_truth")).to_pylist() if truth in known}
    if not 2 <= len(present) <= MAX_LABEL_SET or len(present) == len(categories):
        return None
    return list(dict.fromkeys(name for name in categories if name in present))  # a few ImageNet names repeat
