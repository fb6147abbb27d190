"""Figures built from the tables ``metrics`` returns: what the title and bars say about the run."""

from __future__ import annotations

from pipeline import charts, metrics

from .test_metrics import row, write_run


def test_label_counts_of_a_labelled_run_pair_truth_with_predictions_and_say_when_cut(tmp_path):
    rows = [row(str(i), truth, label, 0.5) for i, (truth, label) in enumerate([("cat", "cat"), ("dog", "cat"), ("owl", "owl")])]
    predictions = write_run(tmp_path / "run", rows)
    whole = charts.label_counts(metrics.label_distribution(predictions))
    assert whole.layout.title.text == "Labels: predicted vs ground truth" and [t.name for t in whole.data] == ["ground truth", "predicted"]
    cut = charts.label_counts(metrics.label_distribution(predictions, top_n=2), scope=" so far")
    assert cut.layout.title.text == "Labels so far: predicted vs ground truth (top 2)"


def test_label_counts_of_an_unlabelled_run_show_predictions_alone(tmp_path):
    predictions = write_run(tmp_path / "run", [row(str(i), None, label, 0.5) for i, label in enumerate(["cat", "cat", "owl"])])
    figure = charts.label_counts(metrics.label_distribution(predictions))
    assert figure.layout.title.text == "Predicted labels" and [t.name for t in figure.data] == ["predicted"]
