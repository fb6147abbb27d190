"""A real GCS-protocol server over HTTP (gcp-storage-emulator, in-process) holding a bucket of sample images."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.errors import UserError
from pipeline.sources import GCS_EMULATOR_ENV, list_images, open_source

from .conftest import SAMPLE, free_port, run_cli
from .test_s3 import labels_by_name


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's address, and a local folder holding the 9 images (3 classes) uploaded under ``images/set/``."""
    server_module = pytest.importorskip("gcp_storage_emulator.server", reason="gcp-storage-emulator is not installed")
    port = free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="images")
    server.start()
    bucket = pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{port}", scheme="http")
    local = tmp_path_factory.mktemp("gcs-local")
    for wnid in sorted(p.name for p in SAMPLE.iterdir())[:3]:
        (local / wnid).mkdir()
        for image in sorted((SAMPLE / wnid).iterdir())[:3]:
            with bucket.open_output_stream(f"images/set/{wnid}/{image.name}") as out:
                out.write(image.read_bytes())
            (local / wnid / image.name).write_bytes(image.read_bytes())
    with bucket.open_output_stream("images/set/README.txt") as out:
        out.write(b"not an image")
    yield f"http://127.0.0.1:{port}", local
    server.stop()


def test_listing_over_gcs_finds_the_images_and_skips_the_rest(gcs, monkeypatch):
    monkeypatch.setenv(GCS_EMULATOR_ENV, gcs[0])
    listing = list_images(open_source("gs://images/set/"))
    assert len(listing.files) == 9 and listing.skipped == 1
    assert listing.source.to_uri(listing.files[0]).startswith("gs://images/set/n01440764/")


def test_a_run_over_gcs_matches_the_local_run(gcs, tmp_path):
    address, local = gcs
    remote = run_cli("run", "--data", "gs://images/set", "--out", str(tmp_path), env={GCS_EMULATOR_ENV: address})
    here = run_cli("run", "--data", str(local), "--out", str(tmp_path))
    dirs = []
    for result in (remote, here):
        assert result.returncode == 0, result.stderr
        dirs.append(Path(result.stdout.strip().splitlines()[-1]))
    assert len(labels_by_name(dirs[1])) == 9 and labels_by_name(dirs[0]) == labels_by_name(dirs[1])
    manifest = json.loads((dirs[0] / "manifest.json").read_text())
    assert manifest["dataset"] == "gs://images/set" and manifest["counts"]["skipped"] == 1


def test_a_missing_gcs_bucket_exits_2_with_one_line(gcs):
    result = run_cli("preview", "--data", "gs://no-such-bucket/x", env={GCS_EMULATOR_ENV: gcs[0]})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_public_bucket_is_read_anonymously(gcs, monkeypatch):
    monkeypatch.setenv(GCS_EMULATOR_ENV, gcs[0])
    listing = list_images(open_source("gs://anonymous@images/set/"))
    assert len(listing.files) == 9 and listing.source.uri == "gs://anonymous@images/set/"
    assert listing.source.read(listing.files[0])[:3] == b"\xff\xd8\xff"  # a JPEG's first bytes


def test_keys_in_a_gcs_uri_are_refused_without_echoing_them():
    with pytest.raises(UserError) as refused:
        open_source("gs://KEY:verysecret@images/set/")
    assert "gs:// takes no keys in the URI" in str(refused.value) and "verysecret" not in str(refused.value)


def test_an_unreachable_gcs_ends_in_one_line_without_the_clients_quarter_hour_of_retries(tmp_path):
    """Nothing listens at the endpoint: each try is refused, and the client retries for GCS_RETRY_LIMIT (20 s)."""
    result = run_cli("preview", "--data", "gs://images/set", env={GCS_EMULATOR_ENV: f"http://127.0.0.1:{free_port()}"}, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: cannot read gs://images/set: ")
