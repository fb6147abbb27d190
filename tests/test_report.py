"""The HTML report and the exports, on a real run of real images."""

import io
import json
import re
import shutil

import numpy as np
import plotly.io as pio
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from pipeline import metrics, report, runs
from pipeline.runner import RunRequest, run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The embedded sample (20 images per class, 10 classes) limited to 60, through Ray, keeping each image's top 3."""
    path, manifest = run(RunRequest(out=str(tmp_path_factory.mktemp("runs")), limit=60, batch_size=16, topk=3))
    assert manifest.status == "complete"
    return path


def test_report_is_self_contained_and_carries_the_runs_numbers(real_run):
    html = report.build_report(real_run)
    manifest = runs.read_manifest(real_run)
    fetched = re.findall(r"""<(?:img|script|link|iframe)\b[^>]*\b(?:src|href)=["']([^"']+)""", html)
    assert fetched and all(url.startswith("data:") for url in fetched)  # nothing to fetch: opens offline
    assert "Plotly.newPlot" in html and html.count("Plotly.newPlot") == 5
    assert html.count("data:image/jpeg;base64,") >= 12  # thumbnails embedded, not linked
    assert f"{manifest.accuracy.top1:.1%}" in html and f"{manifest.accuracy.label_set_top1:.1%}" in html
    assert f"<b>{manifest.accuracy.top5:.1%}</b><span>Top-3</span>" in html and "Top-5" not in html
    assert "Per class" in html and "Most confused pairs" in html and "Reliability" in html


def test_report_draws_its_charts_alike_whatever_plotlys_default_template(real_run, monkeypatch):
    """The dashboard's server has Streamlit's template as plotly's default: no automatic margins there."""
    monkeypatch.setattr(pio.templates, "default", "none")
    html = report.build_report(real_run)
    figures = re.findall(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{\"displaylogo", html, re.S)
    assert len(figures) == 5
    for _, layout in figures:
        axes = json.loads(layout)["template"]["layout"]
        assert axes["xaxis"]["automargin"] and axes["yaxis"]["automargin"]


def test_report_of_a_filtered_view_says_so(real_run):
    manifest = runs.read_manifest(real_run)
    loaded = metrics.load(real_run, manifest.label_set)
    confident = loaded.subset(loaded.score >= 0.5)
    html = report.build_report(real_run, confident, "confidence 0.50–1.00")
    assert "Scope: confidence 0.50–1.00" in html and f"<b>{len(confident):,}</b>" in html


def test_report_says_when_ground_truth_is_no_class_of_the_model(real_run, tmp_path):
    assert "not a class of this model" not in report.build_report(real_run)
    copy = tmp_path / real_run.name
    shutil.copytree(real_run, copy)
    manifest = runs.read_manifest(copy)
    manifest.unmatched_truth = runs.UnmatchedTruth(7, 1, ["<kittens>"])
    runs.write_manifest(copy, manifest)
    assert "Note: 7 images have a ground truth that is not a class of this model (&lt;kittens&gt;)" in report.build_report(copy)


def test_write_report_puts_it_in_the_run_folder(real_run):
    assert report.write_report(real_run) == real_run / "report.html"
    assert (real_run / "report.html").stat().st_size > 1_000_000  # plotly.js is inside


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_exports_hold_exactly_the_chosen_rows(real_run, file_format):
    loaded = metrics.load(real_run)
    wrong = loaded.subset(loaded.labelled & ~loaded.correct)
    data = report.export_predictions(real_run, wrong.rows, file_format)
    table = pq.read_table(io.BytesIO(data)) if file_format == "parquet" else pa_csv.read_csv(io.BytesIO(data))
    assert table.num_rows == len(wrong) > 0
    assert sorted(table.column("path").to_pylist()) == sorted(wrong.path_of(np.arange(len(wrong))))
    if file_format == "csv":
        first = table.column("topk_labels")[0].as_py()
        assert first.count("|") == 2  # the run's three labels, one line
    assert all(a != b for a, b in zip(table.column("label").to_pylist(), table.column("ground_truth").to_pylist(), strict=True))


def test_unknown_export_format_is_refused(real_run):
    with pytest.raises(ValueError, match="unknown export format"):
        report.export_predictions(real_run, np.arange(2), "xlsx")
