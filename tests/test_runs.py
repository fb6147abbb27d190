"""Run records: what the manifest says about a run's ground truth, and that it survives a round trip."""

import pyarrow as pa
import pytest

from pipeline import runs
from pipeline.errors import UserError
from pipeline.runs import Manifest, RunParams, UnmatchedTruth


def test_unmatched_truth_names_the_commonest_classes_first_and_counts_the_rest():
    truths = pa.array(["tench"] * 4 + ["cats"] * 3 + ["dogs"] * 5 + [None] * 2 + [f"other{i}" for i in range(5)])
    found = runs.unmatched_truth(truths, ["tench", "goldfish"])
    assert found == UnmatchedTruth(images=13, classes=7, names=["dogs", "cats", "other0", "other1", "other2"])
    assert found.sentence() == (
        "13 images have a ground truth that is not a class of this model (dogs, cats, other0, other1, other2 and 2 more); "
        "they count as misclassified"
    )
    assert runs.unmatched_truth(pa.array(["tench", None]), ["tench"]) is None
    assert runs.unmatched_truth(pa.array(["cats"]), ["tench"]).sentence().startswith("1 image has a ground truth")


def test_manifest_keeps_unmatched_truth_and_reads_manifests_written_before_or_after_it(tmp_path):
    manifest = Manifest("r1", "/data", {"name": "m"}, RunParams(None, None, None, None, None, None))
    manifest.unmatched_truth = UnmatchedTruth(3, 1, ["cats"])
    runs.write_manifest(tmp_path, manifest)
    assert runs.read_manifest(tmp_path).unmatched_truth == UnmatchedTruth(3, 1, ["cats"])
    older = manifest.to_json()
    del older["unmatched_truth"]
    assert Manifest.from_json(older).unmatched_truth is None
    newer = manifest.to_json()
    newer["unmatched_truth"]["by_folder"] = {"cats": 3}  # a field a later version might add
    assert Manifest.from_json(newer).unmatched_truth == UnmatchedTruth(3, 1, ["cats"])


def write_run_folder(runs_dir, run_id: str, status: str = "complete"):
    """A run folder as a run leaves it (manifest, a predictions part, errors) and its launch log."""
    path = runs_dir / run_id
    (path / runs.PREDICTIONS).mkdir(parents=True)
    runs.atomic_write_table(path / runs.PREDICTIONS / "part-000000.parquet", runs.PREDICTION_SCHEMA.empty_table())
    runs.atomic_write_table(path / runs.ERRORS, runs.ERROR_SCHEMA.empty_table())
    manifest = Manifest(run_id, "/data", {"name": "m"}, RunParams(None, None, None, None, None, None), status=status)
    manifest.claim()  # this process: a "running" run is then really running
    runs.write_manifest(path, manifest)
    log = runs.launch_log(runs_dir, run_id)
    log.parent.mkdir(exist_ok=True)
    log.write_text("progress\n")
    return path


def test_deleting_a_run_removes_its_folder_and_launch_log_and_nothing_else(tmp_path):
    gone, kept = write_run_folder(tmp_path, "r1"), write_run_folder(tmp_path, "r2", status="cancelled")
    assert runs.delete_run(gone).run_id == "r1"
    assert not gone.exists() and not runs.launch_log(tmp_path, "r1").exists()
    assert (kept / runs.MANIFEST).is_file() and runs.launch_log(tmp_path, "r2").is_file()
    assert [m.run_id for _, m in runs.list_runs(tmp_path)] == ["r2"]


def test_a_running_run_and_a_folder_that_is_no_run_are_not_deleted(tmp_path):
    running = write_run_folder(tmp_path, "r1", status="running")
    with pytest.raises(UserError, match="r1 is still running: cancel it first"):
        runs.delete_run(running)
    with pytest.raises(UserError, match="not a run folder"):
        runs.delete_run(tmp_path)  # the runs folder itself
    assert (running / runs.MANIFEST).is_file() and (running / runs.PREDICTIONS).is_dir()
