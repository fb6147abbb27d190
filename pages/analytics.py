"""Analytics of one run: label distributions, accuracy, per-class scores, confusion, calibration,
galleries, failures and exports. Live while the run is still writing rows."""

from functools import partial
from pathlib import Path

import numpy as np
import streamlit as st

from pages import widgets
from pipeline import charts, metrics, report, runs
from pipeline.errors import UserError

GALLERY = 12
NO_TRUTH = "These images have no ground truth (no class folders)."
OUTCOMES = ["All", "Correct", "Wrong", "No ground truth"]
EXPORTS = (("CSV", "csv", "text/csv"), ("Parquet", "parquet", "application/vnd.apache.parquet"))
SHARES = ("precision", "recall", "f1", "share of class")  # table columns drawn as bars, in percent
PROGRESS = {name: st.column_config.ProgressColumn(name, min_value=0.0, max_value=100.0, format=widgets.PERCENT_FORMAT) for name in SHARES}

settings = widgets.current_settings()
st.title("Analytics")

all_runs = widgets.runs_in(settings)
if not all_runs:
    st.info(f"No runs in {widgets.runs_root(settings)} yet. Start one from the Run page.")
    st.stop()
path, picked = widgets.pick_run("Run", all_runs, key="run")


def filters(p: metrics.Predictions, manifest: runs.Manifest) -> tuple[metrics.Predictions, str | None]:
    """The rows the user wants to look at, and a description of the filter (None when all rows)."""
    with st.expander("Filters", expanded=False):
        c1, c2, c3 = st.columns([3, 2, 2])
        chosen = c1.multiselect("Class (ground truth or prediction)", list(p.classes), key="filter_classes")
        low, high = c2.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.01, key="filter_confidence")
        outcome = c3.selectbox("Outcome", OUTCOMES, key="filter_outcome")  # fits any width, where four buttons were cut off
        restricted = False
        if p.label_set_label is not None:
            restricted = st.toggle(
                f"Answer only with the dataset's {len(manifest.label_set or ())} classes (label-set-restricted evaluation)",
                key="filter_restricted",
                help="Takes the argmax among the dataset's ground-truth classes instead of all the model's classes.",
            )
    if restricted:
        p = p.restricted()
    mask = (p.score >= low) & (p.score <= high)
    if chosen:
        codes = [p.code(name) for name in chosen]
        mask &= np.isin(p.label, codes) | np.isin(p.truth, codes)
    mask &= {"All": True, "Correct": p.correct, "Wrong": p.labelled & ~p.correct, "No ground truth": ~p.labelled}[outcome]
    parts = [f"classes {', '.join(chosen)}"] if chosen else []
    if (low, high) != (0.0, 1.0):
        parts.append(f"confidence {low:.2f}–{high:.2f}")
    if outcome != "All":
        parts.append(outcome.lower())
    if restricted:
        parts.append("label-set-restricted")
    return (p.subset(mask) if not mask.all() else p), ("; ".join(parts) or None)


def overview(view: metrics.Predictions) -> None:
    left, right = st.columns(2)
    distribution = metrics.label_distribution(view, 20)
    left.plotly_chart(charts.label_counts(distribution, height=540), width="stretch")
    right.plotly_chart(charts.confidence_histogram(metrics.confidence_histogram(view), height=540), width="stretch")


def confusion_tab(view: metrics.Predictions, manifest: runs.Manifest) -> None:
    size = st.slider("Classes in the matrix", 5, 40, 20, key="confusion_classes", help="With more classes, the most confused are shown.")
    matrix = metrics.confusion(view, size)
    height = max(480, 28 * len(matrix) + 160)
    st.plotly_chart(
        charts.heatmap(matrix, "Ground truth vs prediction (confused classes side by side)", "predicted", "truth", height),
        width="stretch",
    )
    pairs = metrics.confused_pairs(view, 20)
    st.subheader("Most confused pairs")
    if pairs.empty:
        st.caption("No mistakes here.")
        return
    st.dataframe(widgets.in_percent(pairs, ["share of class"]), hide_index=True, width="stretch", column_config=PROGRESS)
    choice = st.selectbox(
        "Examples of", range(len(pairs)), format_func=lambda i: f"{pairs['truth'][i]} → {pairs['predicted'][i]} ({pairs['count'][i]:,})"
    )
    truth, label = view.code(pairs["truth"][choice]), view.code(pairs["predicted"][choice])
    widgets.gallery(metrics.examples(view, (view.truth == truth) & (view.label == label), GALLERY), manifest, _caption)


def calibration_tab(view: metrics.Predictions) -> None:
    calibration = metrics.calibration(view)
    left, right = st.columns(2)
    left.plotly_chart(charts.reliability(calibration), width="stretch")
    right.plotly_chart(charts.coverage(metrics.coverage_curve(view)), width="stretch")
    st.caption(
        "Expected calibration error: the gap between confidence and accuracy, averaged over 15 confidence bins weighted by "
        "their share of images. Accuracy vs coverage: keep only the most confident predictions."
    )


def _caption(row) -> str:
    truth = f"  \n:red[truth: {row.truth}]" if isinstance(row.truth, str) and row.truth != row.label else ""
    return f"**{row.label}** · {row.score:.0%}{truth}"


def export_tab(path: Path, view: metrics.Predictions, scope: str | None, run_id: str) -> None:
    st.caption(f"{len(view):,} predictions{f' ({scope})' if scope else ''}. Files are built when you click.")
    *tables, html = st.columns(3)
    for column, (name, file_format, mime) in zip(tables, EXPORTS, strict=True):
        column.download_button(
            f"Predictions as {name}",
            partial(report.export_predictions, path, view.rows, file_format),
            f"{run_id}-predictions.{file_format}",
            mime,
            on_click="ignore",
        )
    html.download_button(
        "Report (self-contained HTML)",
        partial(report.build_report, path, view, scope),
        f"{run_id}-report.html",
        "text/html",
        on_click="ignore",
        type="primary",
    )


@st.fragment(run_every=3.0 if picked.status == "running" else None)
def body() -> None:
    try:
        manifest = runs.read_manifest(path)
        p = widgets.load_predictions(path, manifest)
        errors = runs.read_errors(path).to_pandas()
    except (UserError, OSError, ValueError) as error:
        st.error(f"Cannot read run {picked.run_id}: {error}. The run folder may be damaged; pick another run.")
        return
    if manifest.status != picked.status:
        st.rerun()  # started or stopped polling: the whole page picks the new status up
    if manifest.status == "running":
        st.info(f"{widgets.status_badge('running')}: {len(p):,} of {manifest.counts.inputs:,} images so far; updating every 3 s.")
    st.caption(f"**{manifest.model.get('display_name', '?')}** on {manifest.dataset} · {widgets.status_badge(manifest.status)}")
    if manifest.unmatched_truth:
        st.warning(f"{manifest.unmatched_truth.sentence()}.", icon=":material/label_off:")
    if not len(p):
        st.warning("No predictions in this run yet.")
        return
    view, scope = filters(p, manifest)
    if scope:
        st.caption(f"Showing {len(view):,} of {len(p):,} predictions: {scope}")
    s = metrics.summary(view)
    k = st.columns(6)
    k[0].metric("Predicted", f"{s.predicted:,}")
    k[1].metric("Failed", f"{len(errors):,}")
    k[2].metric("Top-1", widgets.percent(s.top1))
    k[3].metric(f"Top-{manifest.params.topk}", widgets.percent(s.top5))
    k[4].metric(
        "Label-set top-1",
        widgets.percent(s.label_set_top1),
        help="Top-1 with the answer taken among the dataset's own classes only (their scores are stored per row at run time).",
    )
    k[5].metric("Mean confidence", widgets.percent(s.mean_score))
    labelled = s.labelled > 0
    names = ["Overview", "Per class", "Confusion", "Calibration", "Examples", f"Failed ({len(errors):,})", "Export"]
    tabs = dict(zip(names, st.tabs(names), strict=True))
    with tabs["Overview"]:
        overview(view)
    with tabs["Per class"]:
        if labelled:
            table = metrics.per_class(view)
            st.dataframe(
                widgets.in_percent(table.sort_values("f1"), ["precision", "recall", "f1"]),
                hide_index=True,
                width="stretch",
                column_config=PROGRESS,
                height=min(600, 35 * (len(table) + 1) + 3),  # the header and every row, no empty band below
            )
            st.caption("Click a column header to sort. Precision counts every labelled image predicted as the class.")
        else:
            st.caption(NO_TRUTH)
    with tabs["Confusion"]:
        if labelled:
            confusion_tab(view, manifest)
        else:
            st.caption(NO_TRUTH)
    with tabs["Calibration"]:
        if labelled:
            calibration_tab(view)
        else:
            st.caption(NO_TRUTH)
    with tabs["Examples"]:
        if labelled:
            st.subheader("Misclassified, most confident first")
            widgets.gallery(metrics.examples(view, view.labelled & ~view.correct, GALLERY), manifest, _caption)
        st.subheader("Lowest confidence")
        widgets.gallery(metrics.examples(view, view.score >= 0, GALLERY, most_confident=False), manifest, _caption)
    with tabs[names[5]]:
        if errors.empty:
            st.caption("Every image was read and classified.")
        else:
            st.dataframe(errors, hide_index=True, width="stretch")
    with tabs["Export"]:
        export_tab(path, view, scope, manifest.run_id)


body()
