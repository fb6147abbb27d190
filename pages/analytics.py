"""Analytics: label distributions, accuracy, confusion, per-class scores, confidence, galleries, export."""

from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from pages import widgets
from pipeline import metrics, runs
from pipeline.errors import UserError

COLUMNS = ["path", "ground_truth", "label", "score", "topk_labels", "topk_scores"]
GALLERY = 12

settings = widgets.current_settings()
st.title("Analytics")

all_runs = widgets.runs_in(settings)
if not all_runs:
    st.info(f"No runs in {widgets.runs_root(settings)} yet. Start one from the Run page.")
    st.stop()

ids = [manifest.run_id for _, manifest in all_runs]
wanted = st.query_params.get("run")
run_id = st.selectbox(
    "Run",
    ids,
    index=ids.index(wanted) if wanted in ids else 0,
    format_func=lambda i: f"{i} ({next(m.status for _, m in all_runs if m.run_id == i)})",
)
st.query_params["run"] = run_id
path = next(p for p, m in all_runs if m.run_id == run_id)


@st.cache_data(show_spinner="Reading predictions…", max_entries=4)
def load(path: str, version: tuple) -> pd.DataFrame:
    """Only the columns the charts need; ``version`` (parts, size) invalidates it as rows arrive."""
    return runs.read_predictions(path, columns=COLUMNS).to_pandas()


def version_of(path: Path) -> tuple:
    parts = runs.prediction_parts(path)
    return len(parts), sum(p.stat().st_size for p in parts)


try:
    manifest = runs.read_manifest(path)
    frame = load(str(path), version_of(path))
    errors = runs.read_errors(path).to_pandas()
except (UserError, OSError, ValueError) as error:
    st.error(f"Cannot read run {run_id}: {error}. The run folder may be damaged; pick another run.")
    st.stop()

if manifest.status == "running":
    st.info("This run is still in progress: refresh to see new rows.")
    if st.button("Refresh"):
        st.rerun()

summary = metrics.summary(frame)
k = st.columns(5)
k[0].metric("Predicted", f"{summary.predicted:,}")
k[1].metric("Failed", f"{len(errors):,}")
k[2].metric("Top-1", widgets.percent(summary.top1))
k[3].metric("Top-5", widgets.percent(summary.top5))
k[4].metric("Mean confidence", widgets.percent(summary.mean_score))
st.caption(
    f"**{manifest.model.get('display_name', '?')}** on {manifest.dataset} · {widgets.status_badge(manifest.status)} · "
    f"{manifest.counts.inputs:,} inputs"
)

if frame.empty:
    st.warning("No predictions in this run yet.")
    st.stop()

with st.expander("Filters", expanded=False):
    f1, f2 = st.columns([2, 1])
    classes = sorted(set(frame["label"]) | set(frame["ground_truth"].dropna()))
    chosen = f1.multiselect("Class (ground truth or prediction)", classes)
    low, high = f2.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.01)
view = frame[(frame["score"] >= low) & (frame["score"] <= high)]
if chosen:
    view = view[view["label"].isin(chosen) | view["ground_truth"].isin(chosen)]
if len(view) != len(frame):
    st.caption(f"Showing {len(view):,} of {len(frame):,} predictions")

has_truth = view["ground_truth"].notna().any()
top_n = 20

left, right = st.columns(2)
distribution = metrics.label_distribution(view["label"], top_n)
left.plotly_chart(widgets.label_bar(distribution, f"Predicted labels (top {top_n})", height=520), use_container_width=True)

histogram = metrics.confidence_histogram(view)
conf = px.bar(
    histogram,
    x="confidence",
    y="count",
    color="outcome",
    title="Confidence",
    height=520,
    color_discrete_map={"correct": "#2e7d32", "incorrect": "#c62828", "no ground truth": "#78909c"},
)
conf.update_layout(bargap=0.05, margin=widgets.CHART_MARGIN, xaxis_title="top-1 confidence")
right.plotly_chart(conf, use_container_width=True)

if has_truth:
    matrix = metrics.confusion(view)
    heat = go.Figure(
        go.Heatmap(
            z=matrix.values,
            x=matrix.columns,
            y=matrix.index,
            colorscale="Blues",
            hovertemplate="truth %{y}<br>predicted %{x}<br>%{z}<extra></extra>",
            texttemplate="%{z}" if matrix.size <= 400 else None,  # counts in the cells while they stay legible
            showscale=False,
        )
    )
    heat.update_layout(
        title="Ground truth vs prediction",
        height=560,
        xaxis_title="predicted",
        yaxis_title="ground truth",
        yaxis={"autorange": "reversed"},
        margin=widgets.CHART_MARGIN,
    )
    left, right = st.columns(2)
    left.plotly_chart(heat, use_container_width=True)
    curve = metrics.accuracy_vs_threshold(view)
    line = go.Figure()
    line.add_scatter(x=curve["threshold"], y=curve["accuracy"], name="accuracy of kept", mode="lines")
    line.add_scatter(x=curve["threshold"], y=curve["coverage"], name="coverage (share kept)", mode="lines", line={"dash": "dot"})
    line.update_layout(
        title="Accuracy vs confidence threshold",
        height=560,
        xaxis_title="keep predictions with confidence ≥",
        yaxis={"tickformat": ".0%", "range": [0, 1.02]},
        margin=widgets.CHART_MARGIN,
    )
    right.plotly_chart(line, use_container_width=True)

    st.subheader("Per class")
    st.dataframe(
        metrics.per_class(view),
        hide_index=True,
        use_container_width=True,
        column_config={
            name: st.column_config.ProgressColumn(name, min_value=0.0, max_value=1.0, format="percent")
            for name in ("precision", "recall", "f1")
        },
    )


def gallery(title: str, rows: pd.DataFrame) -> None:
    st.subheader(title)
    if rows.empty:
        st.caption("Nothing to show.")
        return
    columns = st.columns(6)
    for i, row in enumerate(rows.head(GALLERY).itertuples()):
        with columns[i % 6].container(border=True):
            data = widgets.thumbnail(row.path, manifest.dataset, manifest.params.s3_endpoint)
            if data:
                st.image(data, use_container_width=True)
            else:
                st.caption("(image unavailable)")
            st.markdown(f"**{row.label}** · {row.score:.0%}")
            if isinstance(row.ground_truth, str):
                st.caption(f"truth: {row.ground_truth}")


if has_truth:
    gallery(
        "Misclassified (most confident first)",
        view[view["label"] != view["ground_truth"]].dropna(subset=["ground_truth"]).sort_values("score", ascending=False),
    )
gallery("Lowest confidence", view.sort_values("score"))

if not errors.empty:
    st.subheader(f"Failed images ({len(errors):,})")
    st.dataframe(errors, hide_index=True, use_container_width=True)

export = view.assign(
    topk_labels=view["topk_labels"].map(lambda v: "|".join(v)),
    topk_scores=view["topk_scores"].map(lambda v: "|".join(f"{s:.4f}" for s in v)),
)
st.download_button(
    "Download filtered predictions (CSV)", export.to_csv(index=False).encode(), file_name=f"{run_id}-predictions.csv", mime="text/csv"
)
