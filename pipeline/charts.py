"""Plotly figures over the small tables ``metrics`` returns: one builder per chart, shared by the
dashboard and the self-contained HTML report so both show the same thing."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .metrics import OTHER, Calibration

MARGIN = {"l": 10, "r": 10, "t": 48, "b": 10}
OUTCOME_COLOURS = {"correct": "#2e7d32", "incorrect": "#c62828", "no ground truth": "#78909c"}
TRUTH_COLOUR, PREDICTED_COLOUR = "#90a4ae", "#1e88e5"


def _layout(figure: go.Figure, title: str, height: int, **layout) -> go.Figure:
    figure.update_layout(title=title, height=height, margin=MARGIN, legend={"orientation": "h", "y": -0.12}, **layout)
    return figure


def label_counts(distribution: pd.DataFrame, height: int = 480, scope: str = "") -> go.Figure:
    """Predicted (and, where known, true) counts per label as horizontal bars, largest on top, ``(other)`` last;
    ``scope`` qualifies the title (" so far")."""
    order = list(distribution["label"])[::-1]
    figure = go.Figure()
    has_truth = "truth" in distribution and distribution["truth"].sum() > 0
    shown = len(distribution) - int(OTHER in set(distribution["label"]))
    title = f"Labels{scope}: predicted vs ground truth" if has_truth else f"Predicted labels{scope}"
    title += f" (top {shown})" if shown < len(distribution) else ""
    if has_truth:
        figure.add_bar(y=distribution["label"], x=distribution["truth"], name="ground truth", orientation="h", marker_color=TRUTH_COLOUR)
    figure.add_bar(y=distribution["label"], x=distribution["predicted"], name="predicted", orientation="h", marker_color=PREDICTED_COLOUR)
    return _layout(figure, title, height, barmode="group", yaxis={"categoryorder": "array", "categoryarray": order}, xaxis_title="images")


def confidence_histogram(histogram: pd.DataFrame, height: int = 480) -> go.Figure:
    figure = go.Figure()
    for outcome, rows in histogram.groupby("outcome", sort=False):
        if rows["count"].sum():
            figure.add_bar(x=rows["confidence"], y=rows["count"], name=outcome, marker_color=OUTCOME_COLOURS.get(outcome))
    return _layout(figure, "Confidence of the top-1 prediction", height, barmode="stack", bargap=0.05, xaxis_title="confidence")


def heatmap(matrix: pd.DataFrame, title: str, x_title: str, y_title: str, height: int = 560) -> go.Figure:
    """Counts as a heatmap, numbers in the cells while they stay legible; empty cells stay blank so the
    counts that matter stand out."""
    figure = go.Figure(
        go.Heatmap(
            z=matrix.values,
            x=list(matrix.columns),
            y=list(matrix.index),
            colorscale="Blues",
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:,}}<extra></extra>",
            text=matrix.map(lambda count: f"{count:,}" if count else "").values if matrix.size <= 400 else None,
            texttemplate="%{text}" if matrix.size <= 400 else None,
            showscale=False,
        )
    )
    return _layout(figure, title, height, xaxis_title=x_title, yaxis_title=y_title, yaxis={"autorange": "reversed"})


def reliability(calibration: Calibration, height: int = 480) -> go.Figure:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    bins = calibration.bins
    figure = go.Figure()
    figure.add_bar(
        x=(bins["low"] + bins["high"]) / 2,
        y=bins["accuracy"],
        width=bins["high"] - bins["low"],
        name="accuracy in bin",
        marker_color=PREDICTED_COLOUR,
        customdata=bins[["confidence", "count"]].to_numpy(),
        hovertemplate="mean confidence %{customdata[0]:.1%}<br>accuracy %{y:.1%}<br>%{customdata[1]:,} images<extra></extra>",
    )
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated", line={"dash": "dot", "color": "#37474f"})
    ece = "–" if calibration.ece is None else f"{calibration.ece:.2%}"
    return _layout(
        figure,
        f"Reliability (expected calibration error {ece})",
        height,
        xaxis={"title": "confidence", "range": [0, 1], "tickformat": ".0%"},
        yaxis={"title": "accuracy", "range": [0, 1.02], "tickformat": ".0%"},
        bargap=0.02,
    )


def coverage(curve: pd.DataFrame, height: int = 480) -> go.Figure:
    """What accuracy if only the most confident predictions are kept."""
    figure = go.Figure()
    figure.add_scatter(
        x=curve["coverage"],
        y=curve["accuracy"],
        mode="lines",
        name="accuracy of kept",
        customdata=curve["threshold"],
        hovertemplate="keep %{x:.0%} (confidence ≥ %{customdata:.2f})<br>accuracy %{y:.1%}<extra></extra>",
    )
    return _layout(
        figure,
        "Accuracy vs coverage",
        height,
        xaxis={"title": "share of predictions kept (most confident first)", "tickformat": ".0%", "range": [0, 1]},
        yaxis={"title": "accuracy", "tickformat": ".0%"},
    )


def share_changes(table: pd.DataFrame, title: str, height: int = 480) -> go.Figure:
    """How much each label's share of predictions moved from run A to run B, in points, largest on top."""
    order = list(table["label"])[::-1]
    points = table["change"] * 100
    reach = 1.3 * max(points.abs().max(), 1e-9)
    figure = go.Figure(
        go.Bar(
            y=table["label"],
            x=points,
            orientation="h",
            marker_color=[PREDICTED_COLOUR if change > 0 else TRUTH_COLOUR for change in points],
            text=[f"{change:+.2f}" for change in points],
            textposition="outside",
            cliponaxis=False,
            customdata=table[["A", "B"]].to_numpy(),
            hovertemplate="%{y}<br>A %{customdata[0]:.2%} → B %{customdata[1]:.2%}<br>%{x:+.2f} pts<extra></extra>",
        )
    )
    return _layout(
        figure,
        title,
        height,
        xaxis={
            "title": "change in share of predictions, B − A (points)",
            "range": [-reach, reach],  # symmetric, with room for the numbers beyond the longest bar
            "zeroline": True,
            "zerolinecolor": "#37474f",
        },
        yaxis={"categoryorder": "array", "categoryarray": order},
    )


def outcomes(table: pd.DataFrame, height: int = 420) -> go.Figure:
    """How two runs fare on the same labelled images: both right, only one right, both wrong."""
    colours = ["#2e7d32", "#90a4ae", "#1e88e5", "#c62828"]
    figure = go.Figure(go.Bar(x=table["outcome"], y=table["count"], marker_color=colours, text=table["count"], texttemplate="%{text:,}"))
    return _layout(figure, "Outcome on images with ground truth", height, yaxis_title="images")
