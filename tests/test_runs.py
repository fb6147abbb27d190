"""Run records: what the manifest says about a run's ground truth, and that it survives a round trip."""

import pyarrow as pa

from pipeline import runs
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
