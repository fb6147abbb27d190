"""The preview: a seeded sample through the real default model, in this process."""

from pipeline.inference import Classifier
from pipeline.models import ModelSpec
from pipeline.preview import preview
from pipeline.runs import UnmatchedTruth
from pipeline.sources import list_images, open_source

from .conftest import add_kittens


def test_preview_says_which_ground_truth_is_no_class_of_the_model(small_folder):
    add_kittens(small_folder)
    result = preview(list_images(open_source(str(small_folder))), Classifier(ModelSpec(), device="cpu"), n=10)
    by_folder = {row.relative.split("/")[0]: row for row in result.rows}
    assert len(result.rows) == 10 and all(row.error is None and row.label for row in result.rows)
    assert by_folder["kittens"].ground_truth == "kittens" and by_folder["kittens"].truth_unmatched
    assert by_folder["kittens"].correct is False
    assert by_folder["n01440764"].ground_truth == "tench" and not by_folder["n01440764"].truth_unmatched
    assert result.unmatched_truth == UnmatchedTruth(images=1, classes=1, names=["kittens"])
