"""The preview: a seeded sample through the real default model, in this process."""

import numpy as np

from pipeline.inference import Classifier
from pipeline.models import ModelSpec, parse_model
from pipeline.preprocess import decode
from pipeline.preview import preview
from pipeline.runs import UnmatchedTruth
from pipeline.sources import list_images, open_source

from .conftest import add_kittens, small_input_program


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
