"""Compare two runs over the same images: agreement, where they disagree, per-class change, label drift."""

import streamlit as st

from pages import widgets
from pipeline import charts, metrics

GALLERY = 12
PAIRS = 15  # label pairs listed where disagreements are too spread for a matrix
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


def _top1_delta(top1_a: float | None, top1_b: float | None) -> dict:
    """B's change in points; no arrow or colour where it rounds to nothing."""
    if top1_a is None or top1_b is None:
        return {}
    change = round((top1_b - top1_a) * 100, 1)
    if not change:
        return {"delta": "±0.0 pts", "delta_color": "off", "delta_arrow": "off"}
    return {"delta": f"{change:+.1f} pts"}


def _where_they_disagree(comparison: metrics.Comparison, differ: int) -> None:
    """A's label × B's as a matrix where its classes hold most disagreements; a ranked list of pairs where they
    are spread thin (a matrix of a few 1s among hundreds of classes says little)."""
    matrix = comparison.disagreement()
    title = f"Where they disagree ({differ:,} images): A's label vs B's"
    if matrix.to_numpy().sum() >= differ / 2:
        st.plotly_chart(charts.heatmap(matrix, title, "B predicts", "A predicts"), width="stretch")
        return
    st.markdown(f"**{title}**")
    pairs = comparison.disagreement_pairs(PAIRS)
    st.dataframe(
        pairs,
        hide_index=True,
        width="stretch",
        column_config={
            "label_a": "A predicts",
            "label_b": "B predicts",
            "count": st.column_config.ProgressColumn("images", format="%d", min_value=0, max_value=int(pairs["count"].max())),
        },
    )
    st.caption(f"The {len(pairs)} most frequent of {differ:,} disagreements, spread over many classes.")


def _per_class_table(comparison: metrics.Comparison) -> None:
    st.subheader("Per-class accuracy")
    st.dataframe(
        widgets.in_percent(comparison.per_class_delta(), ["A", "B", "delta"]),
        hide_index=True,
        width="stretch",
        column_config={
            "A": st.column_config.NumberColumn("recall A", format=widgets.PERCENT_FORMAT),
            "B": st.column_config.NumberColumn("recall B", format=widgets.PERCENT_FORMAT),
            "delta": st.column_config.NumberColumn("B − A", format="%+.1f pts"),
        },
    )


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
k[3].metric("Top-1 B", widgets.percent(summary_b.top1), **_top1_delta(summary_a.top1, summary_b.top1))
k[4].metric("Label shift", widgets.percent(distance), help="Total variation distance between the two predicted-label distributions.")
if comparison.only_a or comparison.only_b:
    st.caption(f"Not compared: {comparison.only_a:,} images only in A, {comparison.only_b:,} only in B.")

differ = comparison.disagreeing()
if not differ:
    st.success(f"Both runs give each of the {comparison.common:,} images in common the same top-1 label.")
panels = []
if summary_a.labelled:
    panels.append(lambda: st.plotly_chart(charts.outcomes(comparison.outcomes()), width="stretch"))
if differ:
    panels.append(lambda: _where_they_disagree(comparison, differ))
if summary_a.labelled:
    panels.append(lambda: _per_class_table(comparison))
if differ:
    panels.append(lambda: st.plotly_chart(charts.share_changes(table, "Largest changes in predicted-label share (drift)"), width="stretch"))
for row in range(0, len(panels), 2):
    for column, draw in zip(st.columns(2), panels[row : row + 2], strict=False):
        with column:
            draw()
if not differ:
    st.stop()

st.subheader("Images where they disagree (both most sure first)")
widgets.gallery(comparison.disagreements(GALLERY), manifest_a, _caption)
