"""The preview: a seeded sample through the real default model, in this process."""

import numpy as np
import pytest

from pipeline.inference import Classifier
from pipeline.models import ModelSpec, parse_model
from pipeline.preprocess import decode
from pipeline.preview import preview
from pipeline.runs import UnmatchedTruth
from pipeline.sources import list_images, open_source

from .conftest import SAMPLE, add_kittens, small_input_program


def test_preview_says_which_ground_truth_is_no_class_of_the_model(small_folder):
    add_kittens(small_folder)
    result = preview(list_images(open_source(str(small_folder))), Classifier(ModelSpec(), device="cpu"), n=10)
    by_folder = {row.relative.split("/")[0]: row for row in result.rows}
    assert len(result.rows) == 10 and all(row.error is None and row.label for row in result.rows)
    assert by_folder["kittens"].ground_truth == "kittens" and by_folder["kittens"].truth_unmatched
    assert by_folder["kittens"].correct is False
    assert by_folder["n01440764"].ground_truth == "tench" and not by_folder["n01440764"].truth_unmatched
    assert result.unmatched_truth == UnmatchedTruth(images=1, classes=1, names=["kittens"])


def test_a_model_of_small_inputs_gets_sharp_thumbnails_and_a_runs_pixels(small_folder, tmp_path):
    """A 32-px network's images are decoded at reduced scale (JPEG draft, 56 px for these 224-px photos), as a run
    decodes them; the thumbnail is decoded again at full size instead of enlarging those pixels."""
    checkpoint, labels = small_input_program(tmp_path, small_folder)
    spec = parse_model(checkpoint=str(checkpoint), labels_file=str(labels), preprocess="crop=32")
    classifier = Classifier(spec, device="cpu")
    listing = list_images(open_source(str(small_folder)))
    result = preview(listing, classifier, n=4)
    assert [row.thumbnail.size for row in result.rows] == [(224, 224)] * 4
    crops = np.stack([decode(listing.source.read(path), classifier.preprocessing) for path in listing.sample(4, 0)])
    indices, scores, _ = classifier.top_k(crops)  # what a run answers for these images
    assert [row.topk for row in result.rows] == [
        [(classifier.categories[i], float(s)) for i, s in zip(row_indices, row_scores, strict=True)]
        for row_indices, row_scores in zip(indices, scores, strict=True)
    ]


def test_preview_answers_among_the_datasets_classes_as_the_full_answer_ranks_them(small_folder):
    """Restricted to the classes the folders name (not kittens: no class of the model), each image's ranking
    is the full softmax's order over those classes, renormalised over them."""
    add_kittens(small_folder)
    classifier = Classifier(ModelSpec(), device="cpu")
    listing = list_images(open_source(str(small_folder)))
    result = preview(listing, classifier, n=10)
    assert result.label_set == ["tench", "English springer", "cassette player"]
    crops = np.stack([decode(listing.source.read(path), classifier.preprocessing) for path in listing.sample(10, 0)])
    indices, scores, _ = classifier.top_k(crops, len(classifier.categories))  # every class, best first
    restricted = result.restricted()
    for row, full_order, full_scores, original in zip(restricted.rows, indices, scores, result.rows, strict=True):
        full = {classifier.categories[i]: float(s) for i, s in zip(full_order, full_scores, strict=True)}
        expected = sorted(result.label_set, key=lambda name: -full[name])
        assert [label for label, _ in row.topk] == expected
        total = sum(full[name] for name in result.label_set)
        assert [score for _, score in row.topk] == pytest.approx([full[name] / total for name in expected], rel=1e-4)
        assert row.ground_truth == original.ground_truth and row.topk == original.label_set_ranking
    kittens = next(row for row in restricted.rows if row.ground_truth == "kittens")
    assert kittens.correct is False and kittens.label in result.label_set
    assert sum(bool(row.correct) for row in restricted.rows) >= sum(bool(row.correct) for row in result.rows)


def test_a_dataset_without_a_label_set_previews_with_every_class(tmp_path):
    """One class folder is no subset to restrict to: the answers stay the model's own."""
    folder = tmp_path / "one" / "n01440764"
    folder.mkdir(parents=True)
    for image in sorted((SAMPLE / "n01440764").iterdir())[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    result = preview(list_images(open_source(str(tmp_path / "one"))), Classifier(ModelSpec(), device="cpu"), n=2)
    assert result.label_set is None and all(not row.label_set_ranking for row in result.rows)
    assert result.restricted().rows == result.rows and all(len(row.topk) == 5 for row in result.rows)
