"""Page logic through Streamlit's AppTest: widgets, messages and state, without a browser."""

from __future__ import annotations

import ast
import json

import pyarrow as pa
import pytest
import torch
from streamlit.testing.v1 import AppTest

from pipeline import runs
from pipeline.models import ModelSpec
from pipeline.runs import Counts, Manifest, RunParams, RunWriter
from pipeline.synthetic import write_synthetic_run

from .conftest import ROOT, SAMPLE, small_input_program


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DASHBOARD_RUNS_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py")
        at.run()
    return at


def write_run(runs_dir, run_id="20260101-000000-demo", status="complete", wrong_every: int = 3) -> str:
    """A run in the documented schema over real sample images, as the pipeline would leave it."""
    files = sorted(SAMPLE.rglob("*.JPEG"))[:30]
    truths = ["tench" if f.parent.name == "n01440764" else "English springer" for f in files]
    labels = [t if i % wrong_every else "goldfish" for i, t in enumerate(truths)]
    path = runs.run_dir(runs_dir, run_id)
    path.mkdir()
    table = pa.table(
        {
            "path": [str(f) for f in files],
            "ground_truth": truths,
            "label": labels,
            "label_index": pa.array([0] * len(files), pa.int32()),
            "score": pa.array([0.3 + 0.02 * i for i in range(len(files))], pa.float32()),
            "topk_labels": [[label, "tench", "goldfish", "a", "b"] for label in labels],
            "topk_scores": [[0.5, 0.2, 0.1, 0.1, 0.1]] * len(files),
        }
    )
    writer = RunWriter(path)
    writer.add(table, pa.table({"path": ["/x/broken.jpg"], "error": ["truncated image data"]}))
    writer.flush()
    manifest = Manifest(
        run_id,
        str(SAMPLE),
        {**ModelSpec().to_dict(), "display_name": "efficientnet_lite0"},
        RunParams(64, None, None, None, None, None),
        status=status,
        counts=Counts(inputs=31, predicted=30, failed=1),
        device="2× CPU worker process(es), fp32, batch 64, on this machine, without Ray",
    )
    manifest.claim()
    runs.write_manifest(path, manifest)
    return run_id


def test_home_shows_settings_and_no_runs(runs_dir):
    at = app()
    assert not at.exception
    assert at.title[0].value == "Batch image classification"
    assert at.sidebar.text_input(key="setting_data").value.endswith("imagenette")
    assert any("No runs yet" in info.value for info in at.info)


def test_bad_dataset_shows_one_error_in_the_sidebar(runs_dir):
    at = app()
    at.sidebar.text_input(key="setting_data").set_value("/definitely/not/here").run()
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "dataset not found" in errors[0] and "\n" not in errors[0]
    assert not at.exception


def test_settings_persist_across_pages(runs_dir, tmp_path):
    at = app()
    at.sidebar.text_input(key="setting_out").set_value(str(tmp_path / "elsewhere")).run()
    at.switch_page("pages/run.py").run()
    assert at.sidebar.text_input(key="setting_out").value == str(tmp_path / "elsewhere")
    assert any("No runs in" in info.value and "elsewhere" in info.value for info in at.info)


def test_preview_classifies_a_sample(runs_dir):
    at = app("preview")
    assert not at.exception
    assert at.slider[0].value == 16
    caption = next(c.value for c in at.caption if "images in" in c.value)
    assert caption.startswith("16 images in") and "correct" in caption
    assert sum("truth:" in c.value for c in at.caption) == 16


def test_a_users_own_checkpoint_is_checked_in_the_sidebar_and_previews(runs_dir, tmp_path, monkeypatch):
    checkpoint, labels = small_input_program(tmp_path, SAMPLE)  # a torch.export program of 32-px inputs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    at = app()
    at.sidebar.selectbox(key="setting_model").set_value("custom").run()
    assert [e.value for e in at.sidebar.error] == ["Enter the path of your checkpoint file, or pick a model from the list"]
    at.sidebar.text_input(key="setting_checkpoint").set_value(str(checkpoint)).run()
    (error,) = [e.value for e in at.sidebar.error]
    assert error == "a custom checkpoint needs a labels file, one class name per line (the Labels file field)"
    at.sidebar.text_input(key="setting_labels").set_value(str(labels)).run()
    (error,) = [e.value for e in at.sidebar.error]  # tried on ImageNet's 224-px crops in the driver: refused in one line
    assert "small-input.pt2 cannot classify a batch of 1 image(s) of 3 × 224 × 224" in error and "\n" not in error
    at.sidebar.text_input(key="setting_preprocess").set_value("crop=tiny").run()
    (error,) = [e.value for e in at.sidebar.error]
    assert error.startswith("the Input field 'crop=tiny': ") and "--" not in error
    whole = tmp_path / "whole.pt"  # a pickled module where Architecture asks for a state dict
    torch.save(torch.nn.Linear(2, 2), whole)
    at.sidebar.text_input(key="setting_checkpoint").set_value(str(whole))
    at.sidebar.text_input(key="setting_preprocess").set_value("")
    at.sidebar.text_input(key="setting_arch").set_value("resnet18").run()
    (error,) = [e.value for e in at.sidebar.error]
    assert error.endswith("and drop the Architecture field") and "--" not in error
    at.sidebar.text_input(key="setting_checkpoint").set_value(str(checkpoint))
    at.sidebar.text_input(key="setting_arch").set_value("")
    at.sidebar.text_input(key="setting_preprocess").set_value("crop=32").run()
    assert not at.sidebar.error and not at.exception
    at.sidebar.selectbox(key="setting_model").set_value("efficientnet_lite0").run()  # the checkpoint's inputs are hidden…
    at.sidebar.selectbox(key="setting_model").set_value("custom").run()
    assert at.sidebar.text_input(key="setting_checkpoint").value == str(checkpoint)  # …and kept
    assert at.sidebar.text_input(key="setting_preprocess").value == "crop=32"

    at.switch_page("pages/preview.py").run()
    assert not at.exception and not at.error
    assert next(c.value for c in at.caption if "images in" in c.value).startswith("16 images in")
    classes = set(labels.read_text().split())
    shown = [m.value for m in at.markdown if " · " in m.value and "**" in m.value]
    assert len(shown) == 16 and all(line.split("**")[1] in classes for line in shown)  # its own labels, not ImageNet's
    at.switch_page("pages/run.py").run()
    assert any("**custom:small-input.pt2** on" in m.value for m in at.markdown)

    monkeypatch.setenv("DASHBOARD_DATA_ROOTS", str(elsewhere))  # a dashboard that may read only other folders
    at.run()
    assert any("outside the folders this dashboard may read" in e.value for e in at.sidebar.error)


def test_run_page_disables_gpus_without_a_gpu_and_lists_runs(runs_dir):
    write_run(runs_dir)
    at = app("run")
    assert not at.exception
    gpus = next(n for n in at.number_input if n.label == "GPUs per actor")
    assert gpus.disabled and gpus.value is None and gpus.placeholder == "no GPU"
    engine = next(s for s in at.selectbox if s.label == "Engine")
    assert engine.value == "auto" and engine.options[0].startswith("auto: local processes")
    precision = next(s for s in at.selectbox if s.label == "Precision")
    assert precision.value == "auto" and precision.options == ["auto", "fp32", "bf16"]
    table = [element for element in at.main if type(element).__name__ == "Dataframe"][-1].value
    assert list(table["run"]) == ["20260101-000000-demo"] and table["status"][0] == "complete"
    synthetic = runs.read_manifest(write_synthetic_run(runs_dir, 100, "20260101-000001-synthetic"))
    at.run()
    table = [element for element in at.main if type(element).__name__ == "Dataframe"][-1].value.set_index("run")
    assert table.loc["20260101-000001-synthetic", "top-1"] == pytest.approx(synthetic.accuracy.top1 * 100)
    assert table.loc["20260101-000000-demo", "ran on"].startswith("2× CPU worker process(es), fp32")  # what its img/s came from
    assert table["top-1"].isna().sum() == 1  # the demo run has no ground truth


def test_run_page_offers_to_delete_every_run_but_the_running_ones(runs_dir):
    """Deleting for real is the browser test's (tests/e2e): here, what is offered."""
    write_run(runs_dir)
    write_synthetic_run(runs_dir, 100, "20260101-000001-synthetic")
    write_run(runs_dir, "20260101-000002-live", status="running")  # owned by this test's live process
    at = app("run")
    picker = next(m for m in at.multiselect if m.label == "Runs to delete")
    assert sorted(picker.options) == ["20260101-000000-demo", "20260101-000001-synthetic"]
    assert next(b for b in at.button if b.label == "Delete").disabled  # nothing picked yet


def test_analytics_shows_metrics_and_filters(runs_dir):
    run_id = write_run(runs_dir)
    at = app("analytics")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Predicted"] == "30" and metrics["Failed"] == "1"
    assert metrics["Top-1"] == f"{20 / 30:.1%}"
    assert at.main.selectbox[0].value == run_id
    at.main.slider[0].set_value((0.5, 1.0)).run()
    assert any("Showing" in c.value for c in at.caption)
    at.main.slider[0].set_value((0.0, 1.0))
    at.main.selectbox(key="filter_outcome").set_value("Wrong").run()
    assert "Showing 10 of 30 predictions: wrong" in [c.value for c in at.caption]  # every 3rd of 30 is wrong
    assert {m.label: m.value for m in at.metric}["Top-1"] == "0.0%"


def test_analytics_says_when_ground_truth_is_no_class_of_the_model(runs_dir):
    run_id = write_run(runs_dir)
    assert not any("not a class of this model" in w.value for w in app("analytics").warning)
    path = runs.run_dir(runs_dir, run_id)
    manifest = runs.read_manifest(path)
    manifest.unmatched_truth = runs.UnmatchedTruth(12, 2, ["cats", "dogs"])
    runs.write_manifest(path, manifest)
    warnings = [w.value for w in app("analytics").warning]
    assert "12 images have a ground truth that is not a class of this model (cats, dogs); they count as misclassified." in warnings


def test_analytics_reports_a_corrupt_run_in_one_line(runs_dir):
    run_id = write_run(runs_dir)
    (runs_dir / run_id / "predictions" / "part-000000.parquet").write_bytes(b"not parquet")
    at = app("analytics")
    assert not at.exception
    assert len(at.error) == 1 and "Cannot read run" in at.error[0].value


def test_an_interrupted_run_offers_resume(runs_dir):
    run_id = write_run(runs_dir, status="running")
    manifest_file = runs_dir / run_id / "manifest.json"
    import json

    data = json.loads(manifest_file.read_text())
    data.update(pid=2**22 + 1, pid_started=0.0)  # a process that does not exist: the run was interrupted
    manifest_file.write_text(json.dumps(data))
    at = app("run")
    assert not at.exception
    assert any(button.label == "Resume" for button in at.button)
    assert any("process stopped" in warning.value for warning in at.warning)


def test_the_data_allow_list_is_enforced(runs_dir, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("DASHBOARD_DATA_ROOTS", str(allowed))
    at = app()
    at.sidebar.text_input(key="setting_data").set_value("/etc").run()
    assert any("outside the folders this dashboard may read" in e.value for e in at.sidebar.error)
    at.sidebar.text_input(key="setting_data").set_value(str(SAMPLE)).run()  # the embedded sample stays allowed
    assert not at.sidebar.error


def test_credentials_in_a_dataset_uri_are_not_shown(runs_dir):
    at = app()
    at.sidebar.text_input(key="setting_data").set_value("s3://AKIAEXAMPLE:verysecret@bucket/images").run()
    shown = " ".join(str(getattr(element, "value", "")) for element in [*at.main, *at.sidebar.error, *at.sidebar.caption])
    assert "verysecret" not in shown and "AKIAEXAMPLE" not in shown


def test_unreachable_cluster_and_bad_output_folder_are_reported(runs_dir, tmp_path):
    from .conftest import free_port

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    at = app()
    at.sidebar.text_input(key="setting_address").set_value(f"127.0.0.1:{free_port()}").run()
    at.sidebar.text_input(key="setting_out").set_value(str(blocker / "runs")).run()
    errors = [e.value for e in at.sidebar.error]
    assert any("cannot connect to the Ray cluster" in e for e in errors)
    assert any("cannot be created or written" in e for e in errors)
    assert not at.exception


def test_analytics_tabs_label_set_view_and_exports(runs_dir):
    run_id = write_run(runs_dir)
    path = runs_dir / run_id
    manifest = runs.read_manifest(path)
    manifest.label_set = ["tench", "English springer"]
    runs.write_manifest(path, manifest)
    at = app("analytics")
    assert not at.exception
    assert [t.label for t in at.tabs][:5] == ["Overview", "Per class", "Confusion", "Calibration", "Examples"]
    per_class = next(e for e in at.main if type(e).__name__ == "Dataframe").value
    assert set(per_class["class"]) == {"tench", "English springer"}
    # these rows were written without label-set scores: the restricted view keeps their full answers
    at.toggle[0].set_value(True).run()
    assert not at.exception and any("label-set-restricted" in c.value for c in at.caption)
    assert {m.label: m.value for m in at.metric}["Top-1"] == f"{20 / 30:.1%}"


def test_compare_page_matches_two_runs(runs_dir):
    write_run(runs_dir, "20260101-000000-a")
    write_run(runs_dir, "20260101-000001-b", wrong_every=5)
    at = app("compare")
    assert not at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown["Images in common"] == "30"
    # a is wrong on every 3rd image, b on every 5th: they differ where exactly one of them is wrong
    differ = sum((i % 3 == 0) != (i % 5 == 0) for i in range(30))
    assert shown["Agreement"] == f"{1 - differ / 30:.1%}"
    assert {shown["Top-1 A"], shown["Top-1 B"]} == {f"{20 / 30:.1%}", f"{24 / 30:.1%}"}
    delta = next(m.delta for m in at.metric if m.label == "Top-1 B")
    assert delta in {f"{(24 - 20) / 30 * 100:+.1f} pts", f"{(20 - 24) / 30 * 100:+.1f} pts"}
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]
    assert f"Where they disagree ({differ} images): A's label vs B's" in titles and not at.success


def test_compare_page_lists_disagreements_spread_over_many_classes(runs_dir):
    """Over 100 classes the commonest classes hold few of the disagreements: pairs, most frequent first."""
    for run_id, seed in (("20260101-000000-a", 0), ("20260101-000001-b", 1)):
        write_synthetic_run(runs_dir, 2000, run_id, classes=100, seed=seed)
    at = app("compare")
    assert not at.exception
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]
    assert not any(title.startswith("Where they disagree") for title in titles)
    pairs = next(frame.value for frame in at.dataframe if "label_a" in frame.value)
    assert len(pairs) == 15 and pairs["count"].is_monotonic_decreasing
    assert any("most frequent of" in caption.value for caption in at.caption)


def test_compare_page_of_runs_that_agree_says_so(runs_dir):
    write_run(runs_dir, "20260101-000000-a")
    write_run(runs_dir, "20260101-000001-b")
    at = app("compare")
    assert not at.exception
    assert "same top-1 label" in at.success[0].value
    assert next(m.delta for m in at.metric if m.label == "Top-1 B") == "±0.0 pts"
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]
    assert titles == ["Outcome on images with ground truth"]  # no empty disagreement matrix or drift chart
    assert not any("disagree" in header.value for header in at.subheader)


def test_compare_page_needs_two_runs(runs_dir):
    write_run(runs_dir)
    at = app("compare")
    assert not at.exception and "needs two runs" in at.info[0].value


def test_run_page_says_which_runs_are_running_before_another_starts(runs_dir):
    write_run(runs_dir, "20260101-000000-done")
    at = app("run")
    assert not any("Running now" in c.value for c in at.caption)
    write_run(runs_dir, "20260101-000001-live", status="running")  # owned by this (live) process: running
    at.run()
    assert any(
        c.value.endswith("Running now: 20260101-000001-live (31 of 31). A run started beside it shares the same CPUs or GPUs.")
        for c in at.caption
    )


def test_analytics_of_a_running_run_grows_as_rows_arrive(runs_dir):
    run_id = write_run(runs_dir, status="running")  # owned by this (live) process: it reads as running
    at = app("analytics")
    assert not at.exception
    assert any("30 of 31 images so far" in info.value for info in at.info)
    assert {m.label: m.value for m in at.metric}["Predicted"] == "30"
    more = runs.read_predictions(runs_dir / run_id).slice(0, 10)
    more = more.set_column(0, "path", pa.array([f"/new/{i}.JPEG" for i in range(10)]))
    writer = RunWriter(runs_dir / run_id)
    writer.add(more, runs.ERROR_SCHEMA.empty_table())
    writer.flush()
    at.run()
    assert {m.label: m.value for m in at.metric}["Predicted"] == "40"


def test_live_predictions_read_only_new_parts_and_start_over_when_a_part_changes(runs_dir, monkeypatch):
    from pages import widgets
    from pipeline import metrics

    path = runs_dir / write_run(runs_dir, status="running")
    live = widgets.LivePredictions(path, [])
    assert len(live.current()) == 30 and live.current() is live.current()  # nothing new: nothing read
    more = runs.read_predictions(path).slice(0, 10).set_column(0, "path", pa.array([f"/new/{i}.JPEG" for i in range(10)]))
    writer = RunWriter(path)
    writer.add(more, runs.ERROR_SCHEMA.empty_table())
    writer.flush()
    read, load = [], metrics.load
    monkeypatch.setattr(metrics, "load", lambda p, s, parts=None: read.append(parts) or load(p, s, parts))
    grown = live.current()
    assert [[part.name for part in parts] for parts in read] == [["part-000001.parquet"]]
    assert len(grown) == 40 and grown.paths.equals(load(path).paths)
    runs.atomic_write_table(runs.prediction_parts(path)[0], runs.read_predictions(path).slice(0, 5))  # the folder was replaced
    assert len(live.current()) == 15


def magic_written_lines(source: str) -> list[int]:
    """Lines Streamlit's "magic" would pass to ``st.write``: a bare expression that is not a call, a docstring,
    a yield or an await (``f() if x else g()`` is one: its ``None`` is drawn on the page)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0])
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    quiet = (ast.Call, ast.Yield, ast.YieldFrom, ast.Await)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and id(node) not in docstrings and not isinstance(node.value, quiet)
    ]


def test_magic_guard_sees_a_conditional_expression():
    assert magic_written_lines('"""doc"""\nf()\nf() if x else g()\nx\n') == [3, 4]


@pytest.mark.parametrize("script", ["app.py", *(p.name for p in (ROOT / "pages").glob("*.py"))])
def test_no_page_draws_a_stray_value(script):
    path = ROOT / script if script == "app.py" else ROOT / "pages" / script
    assert magic_written_lines(path.read_text()) == []
