"""A real S3-protocol server over HTTP (moto's standalone server) holding a bucket of sample images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.inference import Classifier
from pipeline.models import ModelSpec
from pipeline.preview import preview
from pipeline.sources import list_images, open_source

from .conftest import free_port, run_cli

KEY_ID, SECRET = "AKIATESTKEYID0000001", "s3cr3t-test-value-that-must-not-leak"


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """9 sample images under wnid prefixes, twice: ``public/`` (readable anonymously) and ``private/``."""
    import boto3

    from .conftest import SAMPLE

    local = tmp_path_factory.mktemp("s3-local")
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="images")
    for wnid in sorted(p.name for p in SAMPLE.iterdir())[:3]:
        (local / wnid).mkdir()
        for image in sorted((SAMPLE / wnid).iterdir())[:3]:
            client.put_object(Bucket="images", Key=f"public/{wnid}/{image.name}", Body=image.read_bytes(), ACL="public-read")
            client.put_object(Bucket="images", Key=f"private/{wnid}/{image.name}", Body=image.read_bytes())
            (local / wnid / image.name).write_bytes(image.read_bytes())
    for prefix in ("public", "private"):
        client.put_object(Bucket="images", Key=f"{prefix}/README.txt", Body=b"not an image", ACL="public-read")
    return local


def labels_by_name(run_dir: Path) -> dict[str, tuple[str, str]]:
    table = pq.read_table(run_dir / "predictions").to_pylist()
    return {row["path"].rsplit("/", 2)[-2] + "/" + row["path"].rsplit("/", 1)[-1]: (row["label"], row["ground_truth"]) for row in table}


def test_listing_and_preview_over_s3_match_the_local_folder(s3_endpoint, bucket):
    listing = list_images(open_source("s3://anonymous@images/public/", s3_endpoint=s3_endpoint))
    assert len(listing.files) == 9 and listing.skipped == 1
    assert listing.source.to_uri(listing.files[0]).startswith("s3://images/public/n01440764/")
    classifier = Classifier(ModelSpec(), device="cpu")
    remote = preview(listing, classifier, n=9)
    local = preview(list_images(open_source(str(bucket))), classifier, n=9)

    def outcome(result):
        return [(row.relative, row.label, row.ground_truth) for row in result.rows]

    assert outcome(remote) == outcome(local) and all(row.label for row in remote.rows)


def test_runs_over_s3_anonymous_and_keyed_match_the_local_run(s3_endpoint, bucket, tmp_path):
    local = run_cli("run", "--data", str(bucket), "--out", str(tmp_path))
    anonymous = run_cli("run", "--data", "s3://anonymous@images/public/", "--s3-endpoint", s3_endpoint, "--out", str(tmp_path))
    keyed = run_cli(
        "run",
        "--data",
        "s3://images/private",
        "--out",
        str(tmp_path),
        env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3_endpoint},
    )
    dirs = []
    for result in (local, anonymous, keyed):
        assert result.returncode == 0, result.stderr
        dirs.append(Path(result.stdout.strip().splitlines()[-1]))
        assert SECRET not in result.stdout + result.stderr and KEY_ID not in result.stdout + result.stderr
    expected = labels_by_name(dirs[0])
    assert len(expected) == 9
    assert labels_by_name(dirs[1]) == expected == labels_by_name(dirs[2])
    manifest = json.loads((dirs[2] / "manifest.json").read_text())
    assert manifest["dataset"] == "s3://images/private" and manifest["counts"]["skipped"] == 1
    for run_dir in dirs[1:]:
        for file in run_dir.rglob("*"):
            if file.is_file():
                assert SECRET.encode() not in file.read_bytes() and KEY_ID.encode() not in file.read_bytes(), file


def test_keys_in_the_uri_are_not_written_anywhere(s3_endpoint, bucket, tmp_path):
    result = run_cli("run", "--data", f"s3://{KEY_ID}:{SECRET}@images/private", "--s3-endpoint", s3_endpoint, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((run_dir / "manifest.json").read_text())["dataset"] == "s3://images/private"
    assert SECRET not in result.stdout + result.stderr
    for file in run_dir.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_missing_bucket_exits_2(s3_endpoint):
    result = run_cli("preview", "--data", "s3://anonymous@no-such-bucket/x", "--s3-endpoint", s3_endpoint)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_launched_run_gets_keys_from_the_uri_through_its_environment_not_its_command_line(s3_endpoint, bucket, tmp_path):
    """Any user can read a process's command line (``ps``); only its owner can read its environment."""
    import psutil

    from pipeline.launcher import launch_run
    from pipeline.runner import RunRequest

    request = RunRequest(data=f"s3://{KEY_ID}:{SECRET}@images/private", out=str(tmp_path), s3_endpoint=s3_endpoint)
    launched = launch_run(request)
    child = psutil.Process(launched.pid)
    command_line = " ".join(child.cmdline())
    assert "s3://images/private" in command_line and SECRET not in command_line and KEY_ID not in command_line
    assert child.environ()["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert child.wait(timeout=300) == 0, launched.log.read_text()
    manifest = json.loads((tmp_path / launched.run_id / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9
    assert SECRET not in launched.log.read_text()


def test_a_run_resumed_from_the_dashboard_gets_the_keys_its_dataset_was_given_with(s3_endpoint, bucket, tmp_path):
    """The manifest keeps the URI without its keys: resumed from the dashboard, whose dataset setting still
    holds them, the run gets them again (through its environment), and only for that dataset."""
    import psutil

    from pipeline import runs
    from pipeline.launcher import launch_resume

    keyed = f"s3://{KEY_ID}:{SECRET}@images/private"
    result = run_cli("run", "--data", keyed, "--s3-endpoint", s3_endpoint, "--out", str(tmp_path), "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])

    def lose_predictions() -> None:  # as if its process had died before it wrote any
        shutil.rmtree(run_dir / runs.PREDICTIONS, ignore_errors=True)
        manifest = runs.read_manifest(run_dir)
        manifest.status, manifest.counts.predicted, manifest.resumed = "cancelled", 0, 0
        runs.write_manifest(run_dir, manifest)

    lose_predictions()
    other = psutil.Process(launch_resume(run_dir, f"s3://{KEY_ID}:{SECRET}@images/public"))  # another dataset: not its keys
    assert other.environ().get("AWS_SECRET_ACCESS_KEY") != SECRET
    other.kill()
    other.wait(timeout=60)
    lose_predictions()
    child = psutil.Process(launch_resume(run_dir, keyed))
    assert child.environ()["AWS_SECRET_ACCESS_KEY"] == SECRET and SECRET not in " ".join(child.cmdline())
    assert child.wait(timeout=300) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9 and manifest["resumed"] == 1
    assert SECRET not in runs.launch_log(run_dir.parent, run_dir.name).read_text()
