"""A quick look before a full run: a seeded sample of images through the model, in this process.

No Ray here: a preview must answer in a couple of seconds, and the model (a ``Classifier``) is
meant to be created once and reused by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
from PIL import Image

from .inference import Classifier
from .labels import LabelMapper, dataset_classes, folder_of
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
    # Every class of the dataset's label set, best first, its probability renormalised over them
    label_set_ranking: list[tuple[str, float]] = field(default_factory=list)

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
    # The model classes the whole dataset's folders name, where they are a few of many (``labels.label_set``)
    label_set: list[str] | None = None

    def restricted(self) -> PreviewResult:
        """The answers as if the model could only answer with the dataset's classes (label-set-restricted,
        as Analytics offers for a run): each row's top classes among them."""
        rows = [replace(row, topk=row.label_set_ranking[: len(row.topk)]) if row.label_set_ranking else row for row in self.rows]
        return replace(self, rows=rows)


def preview(listing: Listing, classifier: Classifier, n: int = 10, seed: int = 0, k: int = 5) -> PreviewResult:
    """Classify ``n`` images sampled with ``seed``; unreadable ones come back with an error."""
    began = time.perf_counter()
    source = listing.source
    categories = classifier.categories
    classes = dataset_classes(listing, categories)
    set_indices = [categories.index(name) for name in classes or ()]
    mapper = LabelMapper(categories)
    known = set(categories)
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
        indices, scores, set_scores = classifier.top_k(np.stack(crops), k, set_indices)
        for row, idx, sc, among in zip(good, indices, scores, set_scores, strict=True):
            row.topk = [(categories[i], float(s)) for i, s in zip(idx, sc, strict=True)]
            if classes:
                shares = among / max(float(among.sum()), np.finfo(np.float32).tiny)  # as a run's analytics renormalise
                row.label_set_ranking = [(classes[i], float(shares[i])) for i in np.argsort(-shares, kind="stable")]
    truths = pa.array([row.ground_truth for row in rows], pa.string())
    return PreviewResult(rows, time.perf_counter() - began, unmatched_truth(truths, categories), classes)
