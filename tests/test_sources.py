import pytest

from pipeline.errors import UserError
from pipeline.sources import credentials_to_environment, list_images, open_source, redact_uri

from .conftest import SAMPLE


def test_local_listing_is_recursive_case_insensitive_and_counts_skipped(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["x.JPG", "a/y.jpeg", "a/b/z.PnG", "a/b/w.webp", "a/b/v.TIFF", "a/q.gif", "a/r.bmp", "a/s.tif"]:
        (tmp_path / name).write_bytes(b"x")
    for name in ["notes.txt", "a/b/data.csv", "a/.DS_Store"]:
        (tmp_path / name).write_bytes(b"x")
    listing = list_images(open_source(str(tmp_path)))
    assert len(listing.files) == 8
    assert listing.skipped == 3


def test_sample_data_ships_200_images_in_ten_wnid_folders():
    listing = list_images(open_source(str(SAMPLE)))
    assert len(listing.files) == 200 and listing.skipped == 0
    assert len({path.split("/")[-2] for path in listing.files}) == 10


def test_sample_is_reproducible_and_spans_classes():
    listing = list_images(open_source(str(SAMPLE)))
    first, second = listing.sample(20, seed=3), listing.sample(20, seed=3)
    assert first == second and len(set(first)) == 20
    assert len({path.split("/")[-2] for path in first}) >= 5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: p, "is empty"),
        (lambda p: (p / "notes.txt").write_text("x") and p, "no images"),
    ],
)
def test_bad_folders_are_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        list_images(open_source(str(make(tmp_path))))


def test_tutorial_s3_uri_is_accepted_as_is():
    source = open_source("s3://anonymous@air-example-data-2/imagenette2/val/", s3_endpoint="http://127.0.0.1:9")
    assert source.scheme == "s3" and source.root == "air-example-data-2/imagenette2/val"
    assert source.to_uri(source.root + "/n01/x.JPEG") == "s3://air-example-data-2/imagenette2/val/n01/x.JPEG"


def test_credentials_are_redacted_from_uris():
    assert redact_uri("s3://AKIA:SECRET@bucket/prefix") == "s3://bucket/prefix"
    assert redact_uri("s3://anonymous@bucket/prefix") == "s3://anonymous@bucket/prefix"


def test_keys_in_a_uri_move_to_environment_variables():
    keys = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "SE:CRET"}
    assert credentials_to_environment("s3://AKIA:SE:CRET@bucket/prefix") == ("s3://bucket/prefix", keys)
    secret_with_slash = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "ab/c+d"}
    assert credentials_to_environment("s3://AKIA:ab%2Fc+d@bucket/p") == ("s3://bucket/p", secret_with_slash)
    for uri in ("s3://anonymous@bucket/p", "s3://bucket/p", "/data/images", "gs://bucket/p"):
        assert credentials_to_environment(uri) == (uri, {})


def test_unsupported_scheme():
    with pytest.raises(UserError, match="unsupported"):
        open_source("ftp://host/images")


def test_local_listing_follows_linked_folders_but_not_link_loops(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "elsewhere" / "dogs").mkdir(parents=True)
    (tmp_path / "data" / "cats" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere" / "dogs" / "b.jpg").write_bytes(b"x")
    (tmp_path / "data" / "dogs").symlink_to(tmp_path / "elsewhere" / "dogs")
    (tmp_path / "data" / "cats" / "loop").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "cats" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "data" / ".cache" / "c").mkdir(parents=True)
    (tmp_path / "data" / ".cache" / "c" / "thumb.jpg").write_bytes(b"x")
    listing = list_images(open_source(str(tmp_path / "data")))
    root = str((tmp_path / "data").resolve())
    assert listing.files == [f"{root}/cats/a.jpg", f"{root}/dogs/b.jpg"]
    assert listing.skipped == 1  # the thumbnail in the hidden folder; a dangling link is no file at all
