"""Compare two runs over the same images: agreement, where they disagree, per-class change, label drift."""

import streamlit as st

from pages import widgets
from pipeline import charts, metrics

GALLERY = 12
settings = widgets.current_settings()
st.title("Compare runs")
st.caption("Two runs over the same images (two models, or two settings): rows are matched by image path.")

all_runs = widgets.runs_in(settings)
if len(all_runs) < 2:
    st.info(f"Comparing needs two runs in {widgets.runs_root(settings)}; there are {len(all_runs)}. Start another from the Run page.")
    st.stop()
left, right = st.columns(2)
with left:
    path_a, manifest_a = widgets.pick_run("Run A", all_runs, key="a", default=all_runs[1][1].run_id)
with right:
    path_b, manifest_b = widgets.pick_run("Run B", all_runs, key="b", default=all_runs[0][1].run_id)
if path_a == path_b:
    st.warning("Pick two different runs.")
    st.stop()


@st.cache_resource(show_spinner="Matching the runs' images…", max_entries=2)
def cached_comparison(_a: metrics.Predictions, _b: metrics.Predictions, key: tuple) -> metrics.Comparison:
    """``key`` (both runs and their versions) stands for the unhashable predictions."""
    return metrics.compare(_a, _b)


def _caption(row) -> str:
    truth = f"  \ntruth: {row.truth}" if isinstance(row.truth, str) else ""
    return f"A **{row.label_a}** · {row.score_a:.0%}  \nB **{row.label_b}** · {row.score_b:.0%}{truth}"


a = widgets.load_predictions(path_a, manifest_a)
b = widgets.load_predictions(path_b, manifest_b)
comparison = cached_comparison(a, b, (str(path_a), widgets.run_version(path_a), str(path_b), widgets.run_version(path_b)))
if not comparison.common:
    st.error("These runs have no image in common: compare runs over the same dataset.")
    st.stop()

table, distance = comparison.drift()
summary_a, summary_b = metrics.summary(comparison.a), metrics.summary(comparison.b)
k = st.columns(5)
k[0].metric("Images in common", f"{comparison.common:,}")
k[1].metric("Agreement", widgets.percent(comparison.agreement()), help="Share of common images given the same top-1 label.")
k[2].metric("Top-1 A", widgets.percent(summary_a.top1))
k[3].metric(
    "Top-1 B",
    widgets.percent(summary_b.top1),
    delta=None if summary_a.top1 is None else f"{(summary_b.top1 - summary_a.top1) * 100:+.1f} pts",
)
k[4].metric("Label shift", widgets.percent(distance), help="Total variation distance between the two predicted-label distributions.")
if comparison.only_a or comparison.only_b:
    st.caption(f"Not compared: {comparison.only_a:,} images only in A, {comparison.only_b:,} only in B.")

labelled = summary_a.labelled > 0
left, right = st.columns(2)
if labelled:
    left.plotly_chart(charts.outcomes(comparison.outcomes()), width="stretch")
right.plotly_chart(
    charts.heatmap(comparison.disagreement(), "Where they disagree: A's label vs B's", "B predicts", "A predicts"), width="stretch"
)
left, right = st.columns(2)
right.plotly_chart(charts.shares(table, "Predicted-label shares, largest changes (drift)"), width="stretch")
if labelled:
    with left:
        st.subheader("Per-class accuracy")
        st.dataframe(
            comparison.per_class_delta(),
            hide_index=True,
            width="stretch",
            column_config={
                "A": st.column_config.NumberColumn("recall A", format="percent"),
                "B": st.column_config.NumberColumn("recall B", format="percent"),
                "delta": st.column_config.NumberColumn("B − A", format="percent"),
            },
        )

st.subheader("Images where they disagree (both most sure first)")
widgets.gallery(comparison.disagreements(GALLERY), manifest_a, _caption)
