"""Evaluation over a run's prediction rows (pandas): distributions, confusion, per-class scores,
confidence and calibration. Aggregates are small, so charts never carry one point per image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

OTHER = "(other)"


@dataclass(frozen=True)
class Summary:
    predicted: int
    labelled: int
    top1: float | None
    top5: float | None
    mean_score: float | None


def correct(df: pd.DataFrame) -> pd.Series:
    """Top-1 right or wrong for rows with ground truth; NA where there is none."""
    return (df["label"] == df["ground_truth"]).where(df["ground_truth"].notna())


def summary(df: pd.DataFrame) -> Summary:
    labelled = df[df["ground_truth"].notna()]
    top1 = top5 = None
    if len(labelled):
        top1 = float((labelled["label"] == labelled["ground_truth"]).mean())
        if "topk_labels" in labelled:
            top5 = float(np.mean([gt in list(top) for gt, top in zip(labelled["ground_truth"], labelled["topk_labels"], strict=True)]))
    return Summary(len(df), len(labelled), top1, top5, float(df["score"].mean()) if len(df) else None)


def label_distribution(labels: pd.Series, top_n: int = 20) -> pd.DataFrame:
    """Counts of the ``top_n`` most frequent labels, the rest folded into one ``(other)`` bar."""
    counts = labels.value_counts()
    head = counts.head(top_n)
    rest = counts.iloc[top_n:].sum()
    if rest:
        head = pd.concat([head, pd.Series({OTHER: rest})])
    return head.rename_axis("label").reset_index(name="count")


def confusion(df: pd.DataFrame, max_classes: int = 30) -> pd.DataFrame:
    """Ground truth (rows) × prediction (columns) counts over the most frequent true classes;
    predictions outside them fold into ``(other)``."""
    labelled = df[df["ground_truth"].notna()]
    classes = labelled["ground_truth"].value_counts().head(max_classes).index.tolist()
    labelled = labelled[labelled["ground_truth"].isin(classes)]
    predicted = labelled["label"].where(labelled["label"].isin(classes), OTHER)
    table = pd.crosstab(labelled["ground_truth"], predicted)
    columns = sorted(classes) + ([OTHER] if OTHER in table.columns else [])
    return table.reindex(index=sorted(classes), columns=columns, fill_value=0)


def per_class(df: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall, F1 and support for every ground-truth class (precision over all rows)."""
    labelled = df[df["ground_truth"].notna()]
    classes = sorted(labelled["ground_truth"].unique())
    support = labelled["ground_truth"].value_counts()
    hits = labelled[labelled["label"] == labelled["ground_truth"]]["label"].value_counts()
    predicted = df[df["ground_truth"].notna()]["label"].value_counts()
    rows = []
    for cls in classes:
        tp = int(hits.get(cls, 0))
        precision = tp / predicted[cls] if predicted.get(cls, 0) else 0.0
        recall = tp / support[cls] if support.get(cls, 0) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": cls, "precision": precision, "recall": recall, "f1": f1, "support": int(support.get(cls, 0))})
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def accuracy_vs_threshold(df: pd.DataFrame, steps: int = 51) -> pd.DataFrame:
    """For each confidence threshold: accuracy of the predictions kept, and the share kept (coverage)."""
    labelled = df[df["ground_truth"].notna()]
    scores = labelled["score"].to_numpy()
    right = (labelled["label"] == labelled["ground_truth"]).to_numpy()
    thresholds = np.linspace(0, 1, steps)
    rows = []
    for threshold in thresholds[:-1]:
        kept = scores >= threshold
        rows.append(
            {
                "threshold": threshold,
                "accuracy": float(right[kept].mean()) if kept.any() else np.nan,
                "coverage": float(kept.mean()) if len(kept) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def confidence_histogram(df: pd.DataFrame, bins: int = 20) -> pd.DataFrame:
    """Counts per confidence bin, split into correct / incorrect / no ground truth."""
    edges = np.linspace(0, 1, bins + 1)
    outcome = correct(df).map({True: "correct", False: "incorrect"}).fillna("no ground truth")
    binned = pd.cut(df["score"].clip(0, 1), edges, include_lowest=True, labels=(edges[:-1] + edges[1:]) / 2)
    table = pd.crosstab(binned, outcome).reindex((edges[:-1] + edges[1:]) / 2, fill_value=0)
    return table.rename_axis("confidence").reset_index().melt(id_vars="confidence", var_name="outcome", value_name="count")
