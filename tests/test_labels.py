from dataclasses import replace

import pytest

from pipeline.labels import LabelMapper, dataset_classes, folder_of, label_inputs, label_set, normalize, wnid_to_index
from pipeline.models import ModelSpec, describe
from pipeline.sources import list_images, open_source

IMAGENETTE = {
    "n01440764": ("tench", 0),
    "n02102040": ("English springer", 217),
    "n02979186": ("cassette player", 482),
    "n03000684": ("chain saw", 491),
    "n03028079": ("church", 497),
    "n03394916": ("French horn", 566),
    "n03417042": ("garbage truck", 569),
    "n03425413": ("gas pump", 571),
    "n03445777": ("golf ball", 574),
    "n03888257": ("parachute", 701),
}


@pytest.fixture(scope="module")
def mapper():
    return LabelMapper(describe(ModelSpec()).categories)


@pytest.mark.parametrize("wnid", sorted(IMAGENETTE))
def test_imagenette_wnids_map_to_their_class(mapper, wnid):
    name, index = IMAGENETTE[wnid]
    assert wnid_to_index()[wnid] == index
    assert mapper(wnid) == name


@pytest.mark.parametrize("folder", ["golf ball", "Golf_Ball", "GOLF  BALL", "golf_ball"])
def test_class_names_match_ignoring_case_spaces_and_underscores(mapper, folder):
    assert mapper(folder) == "golf ball"


def test_unknown_folder_keeps_its_name(mapper):
    assert mapper("holiday photos") == "holiday photos"


def test_wnid_maps_by_name_for_models_with_other_label_sets():
    mapper = LabelMapper(["Parachute", "Tench"])
    assert mapper("n03888257") == "Parachute"
    assert mapper("n01440764") == "Tench"


def test_images_at_the_root_have_no_folder():
    assert folder_of("photo.jpg") is None
    assert folder_of("a/b/n01440764/photo.jpg") == "n01440764"


def test_normalize():
    assert normalize("  English_springer ") == "english springer"


def test_a_listings_label_set_is_worked_out_once_and_not_kept_by_a_subset(small_folder):
    categories = describe(ModelSpec()).categories
    listing = list_images(open_source(str(small_folder)))
    classes = dataset_classes(listing, categories)
    assert classes == label_set(label_inputs(listing, categories), categories) and classes is not None
    assert dataset_classes(listing, categories) is classes  # kept with the listing: the dashboard previews it again
    subset = replace(listing, files=listing.files[:1])  # one folder: too few classes for a label set
    assert dataset_classes(subset, categories) is None
