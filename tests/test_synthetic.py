"""A synthetic run at the scale the analytics must handle: a million rows in the documented layout."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import metrics, runs
from pipeline.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    path = write_synthetic_run(tmp_path_factory.mktemp("runs"), 1_000_000)
    return path, runs.read_manifest(path)


def test_layout_is_the_documented_one(million):
    path, manifest = million
    parts = runs.prediction_parts(path)
    assert len(parts) == 1_000_000 // runs.RunWriter.default_part_rows
    assert pq.read_schema(parts[0]) == runs.PREDICTION_SCHEMA
    assert manifest.status == "complete" and manifest.counts.predicted == 1_000_000 and len(manifest.label_set) == 10
    assert json.loads((path / "manifest.json").read_text())["accuracy"]["label_set_top1"] > manifest.accuracy.top1


def test_a_million_rows_load_and_agree_with_the_manifest(million):
    path, manifest = million
    loaded = metrics.load(path, manifest.label_set)
    s = metrics.summary(loaded)
    assert s.predicted == 1_000_000
    assert s.top1 == pytest.approx(manifest.accuracy.top1) and s.top5 == pytest.approx(manifest.accuracy.top5)
    assert s.label_set_top1 == pytest.approx(manifest.accuracy.label_set_top1)
    assert metrics.label_distribution(loaded, 20)["predicted"].sum() == 1_000_000
    assert metrics.confusion_counts(loaded).sum() == s.labelled
    assert metrics.per_class(loaded)["support"].sum() == s.labelled
    assert metrics.calibration(loaded).bins["count"].sum() == s.labelled
    # charts get aggregates, never a point per image
    assert len(metrics.coverage_curve(loaded)) <= 101 and len(metrics.confidence_histogram(loaded)) == 60
    pairs = metrics.confused_pairs(loaded, 10)
    assert (pairs["count"].to_numpy()[:-1] >= pairs["count"].to_numpy()[1:]).all()


def test_hundreds_of_classes_show_only_the_most_confused(tmp_path):
    path = write_synthetic_run(tmp_path, 50_000, classes=300)
    loaded = metrics.load(path)
    matrix = metrics.confusion(loaded, max_classes=20)
    assert matrix.shape[0] == 20 and metrics.OTHER in matrix.columns
    # each class is mostly confused with one partner: the pair sits side by side in the order
    top = metrics.confused_pairs(loaded, 1).iloc[0]
    if top["truth"] in matrix.index and top["predicted"] in matrix.index:
        order = list(matrix.index)
        assert abs(order.index(top["truth"]) - order.index(top["predicted"])) == 1


def test_comparing_two_million_row_runs(million, tmp_path):
    path, manifest = million
    other = write_synthetic_run(tmp_path, 1_000_000, seed=1)
    comparison = metrics.compare(metrics.load(path, manifest.label_set), metrics.load(other))
    assert comparison.common == 1_000_000 and comparison.only_a == comparison.only_b == 0
    assert 0.3 < comparison.agreement() < 0.9  # different seeds: related but different predictions
    assert comparison.outcomes()["count"].sum() == 1_000_000
    assert np.isfinite(comparison.drift()[1])
