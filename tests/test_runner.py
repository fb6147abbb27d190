"""Runs through real Ray (started in this process) and real local worker processes, with the real
embedded model and real images."""

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import local, runner, runs
from pipeline.errors import UserError
from pipeline.labels import label_inputs
from pipeline.models import ModelSpec, parse_model
from pipeline.runner import RunRequest, engine_for, execute, in_background, resume, run, start
from pipeline.sources import Listing, Source

from .conftest import ROOT, small_input_program


def read_all(path):
    return runs.read_predictions(path).to_pylist(), runs.read_errors(path).to_pylist()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_run_accounts_for_every_input_and_writes_the_manifest(small_folder, tmp_path, engine):
    (small_folder / "README.txt").write_text("not an image")
    (small_folder / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (small_folder / "loose.png").write_bytes((small_folder.parent / "images" / "n01440764").iterdir().__next__().read_bytes())
    path, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path / "runs"), batch_size=4, engine=engine))

    predictions, errors = read_all(path)
    inputs = [str(p) for p in small_folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    assert sorted(r["path"] for r in predictions + errors) == sorted(inputs)
    assert [e["path"] for e in errors] == [str(small_folder / "n01440764" / "broken.jpg")]
    assert "not a recognised image" in errors[0]["error"]

    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk["status"] == "complete" and manifest.status == "complete"
    assert on_disk["counts"] == {"inputs": 11, "predicted": 10, "failed": 1, "skipped": 1}
    assert on_disk["model"]["name"] == "efficientnet_lite0" and on_disk["dataset"] == str(small_folder)
    assert on_disk["finished_at"] and on_disk["elapsed_s"] > 0 and on_disk["images_per_s"] > 0
    assert on_disk["params"]["batch_size"] == 4 and on_disk["params"]["engine"] == engine == on_disk["engine"]
    assert on_disk["unmatched_truth"] is None  # every folder names a class of the model

    loose = next(r for r in predictions if r["path"].endswith("loose.png"))
    assert loose["ground_truth"] is None
    labelled = [r for r in predictions if r["ground_truth"] is not None]
    assert {r["ground_truth"] for r in labelled} == {"tench", "English springer", "cassette player"}
    top1 = sum(r["label"] == r["ground_truth"] for r in labelled) / len(labelled)
    assert on_disk["accuracy"]["top1"] == pytest.approx(top1) and on_disk["accuracy"]["labelled"] == 9
    for row in predictions:
        assert len(row["topk_labels"]) == 5 and row["topk_labels"][0] == row["label"]
        assert row["topk_scores"][0] == pytest.approx(row["score"]) and 0 < row["score"] <= 1
    assert "image" not in pq.read_schema(runs.prediction_parts(path)[0]).names

    # label-set-restricted evaluation: the dataset's 3 classes, their scores on every row
    assert on_disk["label_set"] == ["tench", "English springer", "cassette player"]  # ImageNet order
    for row in predictions:
        scores = dict(zip(on_disk["label_set"], row["label_set_scores"], strict=True))
        for label, score in zip(row["topk_labels"], row["topk_scores"], strict=True):
            if label in scores:  # the same probability, whichever column it is read from
                assert scores[label] == pytest.approx(score, rel=1e-5)
    restricted = sum(on_disk["label_set"][max(range(3), key=r["label_set_scores"].__getitem__)] == r["ground_truth"] for r in labelled)
    assert on_disk["accuracy"]["label_set_correct"] == restricted
    assert on_disk["accuracy"]["label_set_top1"] >= on_disk["accuracy"]["top1"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cancel_keeps_rows_and_resume_finishes_without_duplicates(small_folder, tmp_path, engine):
    path, _ = start(RunRequest(data=str(small_folder), out=str(tmp_path), batch_size=2, engine=engine))

    def cancel_after_first_batch(progress):
        if progress.counts.done:
            runs.request_cancel(path)

    manifest = execute(path, cancel_after_first_batch)
    assert manifest.status == "cancelled"
    partial = manifest.counts.done
    assert 0 < partial < 9
    assert len(runs.read_predictions(path)) == manifest.counts.predicted

    other = "ray" if engine == "local" else "local"
    manifest = resume(path, engine=other)  # the rest on the other engine
    assert manifest.status == "complete" and manifest.resumed == 1 and manifest.engine == other
    paths = runs.read_predictions(path).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 9 == manifest.counts.predicted


def test_auto_runs_small_cpu_runs_without_ray_and_bigger_ones_on_ray(small_folder, tmp_path, monkeypatch):
    if local.has_gpu():
        pytest.skip("this machine has a GPU: auto runs on it (the CUDA test in test_local covers that)")
    _, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path)))
    assert manifest.engine == "local" and manifest.device == "1× CPU worker process(es), fp32, batch 64, on this machine, without Ray"
    monkeypatch.setattr(runner, "LOCAL_MAX_IMAGES", 8)  # 9 images: one too many
    _, manifest = run(RunRequest(data=str(small_folder), out=str(tmp_path)))
    assert manifest.engine == "ray" and manifest.device.endswith("on Ray (local)")


def test_the_engine_follows_the_address_gpus_and_size():
    assert engine_for("auto", None, None, 100) == "local"  # on this machine's GPUs, or its CPUs
    assert engine_for("auto", None, 0.0, 100) == "local"  # CPUs asked for
    assert engine_for("auto", None, 0.5, 100) == ("local" if local.has_gpu() else "ray")  # none here: Ray says so
    assert engine_for("auto", "10.0.0.5:6379", 0.0, 100) == "ray"  # a cluster
    assert engine_for("auto", None, 0.0, runner.LOCAL_MAX_IMAGES + 1) == "ray"
    assert engine_for("ray", None, 0.0, 1) == "ray" and engine_for("local", None, None, 10**6) == "local"


@pytest.mark.parametrize("gpus_here", [True, False])
def test_auto_gives_local_workers_every_run_on_this_machines_gpus(monkeypatch, gpus_here):
    """On one H100 the local workers started sooner than Ray (5.4-6.1 s against 19-28 s) and ran faster after."""
    monkeypatch.setattr(local, "has_gpu", lambda: gpus_here)
    big = 10 * runner.LOCAL_MAX_IMAGES
    assert engine_for("auto", None, None, 10**8) == ("local" if gpus_here else "ray")
    assert engine_for("auto", None, 0.5, big) == ("local" if gpus_here else "ray")
    assert engine_for("auto", None, 0.0, runner.LOCAL_MAX_IMAGES + 1) == "ray"  # kept on the CPUs
    assert engine_for("auto", None, 0.0, runner.LOCAL_MAX_IMAGES) == "local"
    assert engine_for("auto", "10.0.0.5:6379", None, 100) == "ray"  # a cluster's GPUs are Ray's


def test_a_dead_owner_process_reads_as_interrupted_and_can_be_resumed(small_folder, tmp_path):
    path, _ = start(RunRequest(data=str(small_folder), out=str(tmp_path)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(pid=dead.pid, pid_started=0.0)
    del manifest["model"]["preprocess"]  # as a run written before that field existed
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert runs.read_manifest(path).status == "interrupted"
    assert json.loads((path / "manifest.json").read_text())["status"] == "interrupted"
    assert resume(path).status == "complete"
    with pytest.raises(UserError, match="already complete"):
        resume(path)


def test_a_run_finishes_with_the_input_its_manifest_gave_the_model(small_folder, tmp_path):
    """``execute`` (how ``resume`` finishes a run) rebuilds the model from the manifest, with its own input
    size: at ImageNet's default every image of this 32-px network would fail."""
    checkpoint, labels = small_input_program(tmp_path, small_folder)
    spec = parse_model(checkpoint=str(checkpoint), labels_file=str(labels), preprocess="crop=32")
    path, _ = start(RunRequest(data=str(small_folder), model=spec, out=str(tmp_path / "runs")))
    manifest = execute(path)
    assert manifest.status == "complete" and (manifest.counts.predicted, manifest.counts.failed) == (9, 0)


def test_limit_takes_a_reproducible_sample(tmp_path):
    first, _ = start(RunRequest(out=str(tmp_path), limit=15, run_id="a"))
    second, _ = start(RunRequest(out=str(tmp_path), limit=15, run_id="b"))
    a = pq.read_table(first / runs.INPUTS).column("path").to_pylist()
    assert a == pq.read_table(second / runs.INPUTS).column("path").to_pylist() and len(a) == 15


def test_a_run_predicts_in_a_reproducible_shuffle_so_its_first_rows_span_the_classes(tmp_path):
    path, _ = start(RunRequest(out=str(tmp_path), run_id="a", batch_size=16, engine="local"))  # the embedded 200 images
    order = pq.read_table(path / runs.INPUTS).column("path").to_pylist()
    assert order == pq.read_table(start(RunRequest(out=str(tmp_path), run_id="b"))[0] / runs.INPUTS).column("path").to_pylist()
    assert len(set(order)) == 200 and order != sorted(order)

    def cancel_after_first_batch(progress):
        if progress.counts.done:
            runs.request_cancel(path)

    assert execute(path, cancel_after_first_batch).status == "cancelled"
    truths = runs.read_predictions(path).column("ground_truth").to_pylist()
    assert 16 <= len(truths) < 200 and len(set(truths)) >= 6  # folder by folder, it would be one class or two


@pytest.mark.parametrize(
    "request_, message",
    [
        (dict(batch_size=0), "batch size"),
        (dict(limit=0), "limit"),
        (dict(data="/nonexistent/folder"), "not found"),
        (dict(concurrency=-1), "concurrency"),
        (dict(engine="warp"), "engine must be one of auto, ray, local"),
        (dict(engine="local", address="10.0.0.5:6379"), "--engine local runs on this machine, not on the Ray cluster at '10.0.0.5:6379'"),
        (dict(engine="local", num_gpus=1.0), "--num-gpus 1 asked for, but this machine has no GPU for --engine local"),
    ],
)
def test_bad_requests_fail_before_a_run_folder_exists(tmp_path, request_, message):
    if request_.get("num_gpus") and local.has_gpu():
        pytest.skip("this machine has a GPU: local workers may use it")
    with pytest.raises(UserError, match=message):
        start(RunRequest(out=str(tmp_path / "runs"), **request_))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_folder_without_images_fails_before_a_run_folder_exists(tmp_path):
    # Listed while Ray starts: the listing's error still reaches the caller, and no run folder is made.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        start(RunRequest(data=str(tmp_path / "data"), out=str(tmp_path / "runs")))
    assert not any((tmp_path / "runs").iterdir())


def test_background_work_hands_back_its_result_or_its_error():
    assert in_background(lambda: 42)() == 42

    def fails():
        raise UserError("listing failed")

    with pytest.raises(UserError, match="listing failed"):
        in_background(fails)()


def test_run_ids_cannot_escape_the_runs_folder(tmp_path):
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(UserError):
            runs.run_dir(tmp_path, bad)


def test_unwritable_output_folder_is_a_user_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "runs"  # a path under a regular file can never be created, even by root
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        start(RunRequest(out=str(out)))


def test_torchvision_model_run_through_ray(torch_home, small_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    import ray

    ray.shutdown()  # workers must see the temporary TORCH_HOME
    try:
        request = RunRequest(data=str(small_folder), out=str(tmp_path), model=ModelSpec("resnet18", "IMAGENET1K_V1"), limit=4, engine="ray")
        _path, manifest = run(request)
        assert manifest.status == "complete" and manifest.counts.predicted == 4
        assert manifest.model["name"] == "resnet18"
    finally:
        ray.shutdown()


def test_package_has_no_streamlit_import():
    for module in (ROOT / "pipeline").glob("*.py"):
        assert "streamlit" not in module.read_text(), module


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_inputs_are_labelled_by_their_folder_and_keep_their_order(scheme):
    root = "/data" if scheme == "file" else "bucket/data"
    names = ["n01440764/a.jpg", "loose.jpg", "n01440764/sub/b.jpg", "tench/c.jpg", "n01440764/d.jpg", "mystery/e.jpg"]
    files = [f"{root}/{name}" for name in names]
    listing = Listing(Source(f"{scheme}://{root}", pafs.LocalFileSystem(), root, scheme), files, 0)
    inputs = label_inputs(listing, ["tench", "goldfish"])
    prefix = "" if scheme == "file" else "s3://"
    assert inputs.column("path").to_pylist() == [prefix + f for f in files]
    assert inputs.column("ground_truth").to_pylist() == ["tench", None, "sub", "tench", "tench", "mystery"]
