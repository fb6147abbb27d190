"""A quick look before a full run: a seeded sample of images through the model, in this process.

No Ray here: a preview must answer in a couple of seconds, and the model (a ``Classifier``) is
meant to be created once and reused by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from .inference import Classifier
from .labels import LabelMapper, folder_of
from .preprocess import describe_error, open_rgb, resize_crop
from .runs import UnmatchedTruth, unmatched_truth
from .sources import Listing

THUMBNAIL = 256


@dataclass
class PreviewRow:
    path: str
    relative: str
    ground_truth: str | None
    topk: list[tuple[str, float]]
    thumbnail: Image.Image | None
    error: str | None = None
    truth_unmatched: bool = False  # the ground truth names no class of the model: never predicted

    @property
    def label(self) -> str | None:
        return self.topk[0][0] if self.topk else None

    @property
    def score(self) -> float | None:
        return self.topk[0][1] if self.topk else None

    @property
    def correct(self) -> bool | None:
        return None if self.ground_truth is None or self.label is None else self.label == self.ground_truth


@dataclass
class PreviewResult:
    rows: list[PreviewRow]
    seconds: float
    unmatched_truth: UnmatchedTruth | None = None  # the sample's ground truth that names no class of the model


def preview(listing: Listing, classifier: Classifier, n: int = 10, seed: int = 0, k: int = 5) -> PreviewResult:
    """Classify ``n`` images sampled with ``seed``; unreadable ones come back with an error."""
    began = time.perf_counter()
    source = listing.source
    mapper = LabelMapper(classifier.categories)
    known = set(classifier.categories)
    rows, crops = [], []
    for fs_path in listing.sample(n, seed):
        relative = source.relative(fs_path)
        folder = folder_of(relative)
        truth = mapper(folder) if folder else None
        row = PreviewRow(source.to_uri(fs_path), relative, truth, [], None, truth_unmatched=truth is not None and truth not in known)
        try:
            data = source.read(fs_path)
            resize = classifier.preprocessing.resize
            image = open_rgb(data, min_side=resize)  # at reduced scale where a run decodes so: the same pixels, answers
            crops.append(resize_crop(image, classifier.preprocessing))
            if resize < THUMBNAIL:  # a model of small inputs: its decode would make a blurred thumbnail
                image = open_rgb(data, min_side=THUMBNAIL)
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            row.thumbnail = image
        except Exception as error:
            row.error = describe_error(error)
        rows.append(row)
    good = [row for row in rows if row.error is None]
    if good:
        indices, scores, _ = classifier.top_k(np.stack(crops), k)
        for row, idx, sc in zip(good, indices, scores, strict=True):
            row.topk = [(classifier.categories[i], float(s)) for i, s in zip(idx, sc, strict=True)]
    truths = pa.array([row.ground_truth for row in rows], pa.string())
    return PreviewResult(rows, time.perf_counter() - began, unmatched_truth(truths, classifier.categories))
