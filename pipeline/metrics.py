"""Evaluation of a run's predictions, fast at a million rows.

Rows are loaded once as integer class codes (``Predictions``); every metric is a few numpy
passes over those codes and returns a small table, so charts never carry one point per image.
Ground truth is optional throughout: metrics that need it return empty tables without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import runs

OTHER = "(other)"
NO_CLASS = -1


@dataclass(frozen=True)
class Predictions:
    """A run's prediction rows: classes as codes into ``classes``, ``-1`` for none."""

    classes: np.ndarray  # sorted class names (object array)
    truth: np.ndarray  # int32 code of the ground truth, -1 where there is none
    label: np.ndarray  # int32 code of the top-1 prediction
    score: np.ndarray  # float32 top-1 probability
    topk_hit: np.ndarray  # bool: ground truth among the top-k
    label_set_label: np.ndarray | None  # int32 code of the argmax among the dataset's classes, or None
    label_set_score: np.ndarray | None  # its probability renormalised over the dataset's classes
    paths: pa.Array = field(repr=False)  # every row's path, in load order
    rows: np.ndarray = field(repr=False)  # position of each row in ``paths`` (filters keep this mapping)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def labelled(self) -> np.ndarray:
        return self.truth != NO_CLASS

    @property
    def correct(self) -> np.ndarray:
        return (self.label == self.truth) & self.labelled

    def code(self, name: str) -> int:
        position = int(np.searchsorted(self.classes, name))
        return position if position < len(self.classes) and self.classes[position] == name else NO_CLASS

    def subset(self, mask: np.ndarray) -> Predictions:
        """The rows where ``mask`` holds (or at the given positions, in that order)."""
        rowwise = ("truth", "label", "score", "topk_hit", "rows", "label_set_label", "label_set_score")
        return replace(self, **{name: None if getattr(self, name) is None else getattr(self, name)[mask] for name in rowwise})

    def path_of(self, positions: np.ndarray) -> list[str]:
        return self.paths.take(pa.array(self.rows[positions])).to_pylist()

    def recoded(self, classes: np.ndarray) -> Predictions:
        """The same rows with codes into ``classes`` (a superset), so two runs can be compared code for code."""
        lookup = np.append(np.searchsorted(classes, self.classes), NO_CLASS).astype(np.int32)
        label_set = None if self.label_set_label is None else lookup[self.label_set_label]
        return replace(self, classes=classes, truth=lookup[self.truth], label=lookup[self.label], label_set_label=label_set)

    def restricted(self) -> Predictions:
        """The rows as if the model could only answer with the dataset's classes (label-set-restricted);
        rows stored without label-set scores keep their full answer."""
        if self.label_set_label is None:
            raise ValueError("this run stored no label-set scores")
        has = self.label_set_label != NO_CLASS
        return replace(self, label=np.where(has, self.label_set_label, self.label), score=np.where(has, self.label_set_score, self.score))


COLUMNS = ["path", "ground_truth", "label", "score", "topk_labels", "label_set_scores"]


def load(path: str | Path, label_set: list[str] | None = None, parts: Sequence[Path] | None = None) -> Predictions:
    """Only the columns evaluation needs, labels read as Parquet dictionaries, then turned into codes;
    every part of the run, or only ``parts``."""
    table = runs.read_predictions(path, COLUMNS, categorical=["ground_truth", "label"], parts=parts).unify_dictionaries()
    truth, label = (table.column(name).combine_chunks() for name in ("ground_truth", "label"))
    names = set(truth.dictionary.to_pylist()) | set(label.dictionary.to_pylist()) | set(label_set or ())
    classes = np.array(sorted(name for name in names if name is not None), dtype=object)

    def codes(column: pa.DictionaryArray) -> np.ndarray:
        lookup = np.append(np.searchsorted(classes, np.array(column.dictionary.to_pylist(), dtype=object)), NO_CLASS)
        indices = column.indices.fill_null(-1).to_numpy()
        return lookup[indices].astype(np.int32)

    dense_truth = pc.cast(truth, pa.string())
    label_set_label = label_set_score = None
    if label_set:
        set_codes = np.append(np.searchsorted(classes, np.array(label_set, dtype=object)), NO_CLASS).astype(np.int32)
        choice, label_set_score = runs.label_set_choice(table.column("label_set_scores"), len(label_set))
        label_set_label = set_codes[choice]
    return Predictions(
        classes=classes,
        truth=codes(truth),
        label=codes(label),
        score=table.column("score").to_numpy().astype(np.float32),
        topk_hit=runs.topk_hits(table.column("topk_labels"), dense_truth),
        label_set_label=label_set_label,
        label_set_score=label_set_score,
        paths=table.column("path").combine_chunks(),
        rows=np.arange(table.num_rows),
    )


def concat(first: Predictions, second: Predictions) -> Predictions:
    """The rows of two whole loads, in order, their codes moved onto the union of their classes: how a
    live run's new parts join the rows already read, without reading those again."""
    classes = np.array(sorted(set(first.classes) | set(second.classes)), dtype=object)
    # Old code → new code for each side; NO_CLASS (-1) picks the NO_CLASS appended last.
    first_lookup, second_lookup = (np.append(np.searchsorted(classes, p.classes), NO_CLASS).astype(np.int32) for p in (first, second))

    def both(name: str, codes: bool = False) -> np.ndarray | None:
        a, b = getattr(first, name), getattr(second, name)
        if a is None:
            return None
        return np.concatenate([first_lookup[a], second_lookup[b]] if codes else [a, b])

    return Predictions(
        classes=classes,
        truth=both("truth", codes=True),
        label=both("label", codes=True),
        score=both("score"),
        topk_hit=both("topk_hit"),
        label_set_label=both("label_set_label", codes=True),
        label_set_score=both("label_set_score"),
        paths=pa.concat_arrays([first.paths, second.paths]),
        rows=np.arange(len(first) + len(second)),
    )


@dataclass(frozen=True)
class Summary:
    predicted: int
    labelled: int
    top1: float | None
    top5: float | None
    label_set_top1: float | None
    mean_score: float | None


def summary(p: Predictions) -> Summary:
    labelled = p.labelled
    n = int(labelled.sum())

    def share(hits: np.ndarray) -> float | None:
        return float(hits[labelled].mean()) if n else None

    label_set_top1 = share(p.label_set_label == p.truth) if p.label_set_label is not None else None
    return Summary(len(p), n, share(p.correct), share(p.topk_hit), label_set_top1, float(p.score.mean()) if len(p) else None)


def _counts(codes: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(codes[codes != NO_CLASS], minlength=size)


def label_distribution(p: Predictions, top_n: int = 20) -> pd.DataFrame:
    """Predicted and true counts per class, side by side: the ``top_n`` largest, the rest as ``(other)``."""
    predicted, truth = _counts(p.label, len(p.classes)), _counts(p.truth, len(p.classes))
    order = np.lexsort((p.classes.astype(str), -(predicted + truth)))
    order = order[(predicted + truth)[order] > 0]
    head, rest = order[:top_n], order[top_n:]
    table = pd.DataFrame({"label": p.classes[head], "predicted": predicted[head], "truth": truth[head]})
    if len(rest):
        table.loc[len(table)] = [OTHER, predicted[rest].sum(), truth[rest].sum()]
    return table


def per_class(p: Predictions) -> pd.DataFrame:
    """Precision, recall, F1 and support for every ground-truth class, over the labelled rows
    (a prediction of a class the dataset lacks still counts against that row's recall)."""
    labelled = p.labelled
    size = len(p.classes)
    support = _counts(p.truth[labelled], size)
    predicted = _counts(p.label[labelled], size)
    hits = _counts(p.label[p.correct], size)
    present = np.flatnonzero(support)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, hits / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return pd.DataFrame(
        {
            "class": p.classes[present],
            "precision": precision[present],
            "recall": recall[present],
            "f1": f1[present],
            "support": support[present],
            "predicted": predicted[present],
        }
    )


def confusion_counts(p: Predictions) -> np.ndarray:
    """The full (classes × classes) count matrix, truth in rows."""
    size = len(p.classes)
    labelled = p.labelled
    flat = p.truth[labelled].astype(np.int64) * size + p.label[labelled]
    return np.bincount(flat, minlength=size * size).reshape(size, size)


def cluster_order(weights: np.ndarray) -> list[int]:
    """An order of classes that puts mutually confused classes next to each other.

    Chains grow from the most confused pair that is left, taking on at either end the class most
    confused with that end, so strong confusions always end up adjacent; classes without any
    confusion come last, busiest first.
    """
    symmetric = (weights + weights.T).astype(np.float64)
    np.fill_diagonal(symmetric, 0)
    unplaced = set(range(len(symmetric)))
    order: list[int] = []
    while unplaced:
        rest = sorted(unplaced)
        sub = symmetric[np.ix_(rest, rest)]
        if sub.max(initial=0) <= 0:
            return order + sorted(rest, key=lambda c: -weights[c, c])
        first, second = np.unravel_index(np.argmax(sub), sub.shape)
        chain = [rest[first], rest[second]]
        unplaced -= set(chain)
        while unplaced:
            candidates = sorted(unplaced)
            head, tail = symmetric[chain[0], candidates], symmetric[chain[-1], candidates]
            if max(head.max(), tail.max()) <= 0:
                break
            if tail.max() >= head.max():
                pick = candidates[int(np.argmax(tail))]
                chain.append(pick)
            else:
                pick = candidates[int(np.argmax(head))]
                chain.insert(0, pick)
            unplaced.discard(pick)
        order += chain
    return order


def confusion(p: Predictions, max_classes: int = 20) -> pd.DataFrame:
    """Truth × prediction counts over at most ``max_classes`` true classes: all of them when few,
    otherwise the ones most involved in confusions. Predictions outside them fold into ``(other)``;
    rows and columns share one order in which confused classes cluster."""
    counts = confusion_counts(p)
    true_classes = np.flatnonzero(counts.sum(axis=1))
    if len(true_classes) > max_classes:
        off = counts - np.diag(np.diag(counts))
        involvement = off.sum(axis=1) + off.sum(axis=0)
        true_classes = true_classes[np.argsort(-involvement[true_classes], kind="stable")[:max_classes]]
    shown = true_classes[cluster_order(counts[np.ix_(true_classes, true_classes)])]
    matrix = counts[np.ix_(shown, shown)]
    names = list(p.classes[shown])
    table = pd.DataFrame(matrix, index=names, columns=names)
    outside = counts[shown].sum(axis=1) - matrix.sum(axis=1)
    if outside.any():
        table[OTHER] = outside
    return table


def confused_pairs(p: Predictions, top_n: int = 15) -> pd.DataFrame:
    """The most frequent (truth, prediction) mistakes, with their share of the true class."""
    counts = confusion_counts(p)
    np.fill_diagonal(counts, 0)
    flat = np.argsort(-counts, axis=None, kind="stable")[:top_n]
    truth, label = np.unravel_index(flat, counts.shape)
    keep = counts[truth, label] > 0
    truth, label = truth[keep], label[keep]
    support = _counts(p.truth, len(p.classes))
    return pd.DataFrame(
        {
            "truth": p.classes[truth],
            "predicted": p.classes[label],
            "count": counts[truth, label],
            "share of class": counts[truth, label] / support[truth],
        }
    )


def _bin(score: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1], the last one closed (a confidence of exactly 1 is in it)."""
    return np.clip((score * bins).astype(np.int64), 0, bins - 1)


@dataclass(frozen=True)
class Calibration:
    bins: pd.DataFrame  # low, high, confidence (mean), accuracy, count — empty bins left out
    ece: float | None  # expected calibration error: Σ (count/N) · |accuracy − confidence|


def calibration(p: Predictions, bins: int = 15) -> Calibration:
    """Reliability of the top-1 confidence over the labelled rows."""
    labelled = p.labelled
    score, right = p.score[labelled].astype(np.float64), p.correct[labelled]
    which = _bin(score, bins)
    count = np.bincount(which, minlength=bins)
    confidence = np.bincount(which, weights=score, minlength=bins)
    accurate = np.bincount(which, weights=right, minlength=bins)
    used = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence, accuracy = confidence / count, accurate / count
    table = pd.DataFrame(
        {
            "low": np.arange(bins)[used] / bins,
            "high": (np.arange(bins)[used] + 1) / bins,
            "confidence": confidence[used],
            "accuracy": accuracy[used],
            "count": count[used],
        }
    )
    ece = float(np.sum(count[used] / count.sum() * np.abs(accuracy[used] - confidence[used]))) if count.sum() else None
    return Calibration(table, ece)


def coverage_curve(p: Predictions, points: int = 101) -> pd.DataFrame:
    """Accuracy of the most confident predictions as the share kept (coverage) grows, with the
    confidence threshold that keeps that share."""
    labelled = p.labelled
    if not labelled.any():
        return pd.DataFrame(columns=["coverage", "accuracy", "threshold"])
    order = np.argsort(-p.score[labelled], kind="stable")
    right = p.correct[labelled][order]
    scores = p.score[labelled][order]
    kept = np.unique(np.clip(np.ceil(np.round(np.linspace(0, 1, points) * len(order), 6)).astype(int), 1, len(order)))
    cumulative = np.cumsum(right)
    return pd.DataFrame({"coverage": kept / len(order), "accuracy": cumulative[kept - 1] / kept, "threshold": scores[kept - 1]})


def confidence_histogram(p: Predictions, bins: int = 20) -> pd.DataFrame:
    """Counts per confidence bin, split into correct / incorrect / no ground truth."""
    outcome = np.where(~p.labelled, 2, np.where(p.correct, 0, 1))
    counts = np.bincount(_bin(p.score, bins) * 3 + outcome, minlength=bins * 3).reshape(bins, 3)
    centres = (np.arange(bins) + 0.5) / bins
    frame = pd.DataFrame(counts, columns=["correct", "incorrect", "no ground truth"]).assign(confidence=centres)
    return frame.melt(id_vars="confidence", var_name="outcome", value_name="count")


def examples(p: Predictions, mask: np.ndarray, count: int, most_confident: bool = True) -> pd.DataFrame:
    """Up to ``count`` rows where ``mask`` holds, most (or least) confident first, with their paths."""
    where = np.flatnonzero(mask)
    scores = p.score[where]
    if most_confident:
        scores = -scores
    pick = where[np.argsort(scores, kind="stable")[:count]]
    truth = [p.classes[t] if t != NO_CLASS else None for t in p.truth[pick]]
    return pd.DataFrame({"path": p.path_of(pick), "label": p.classes[p.label[pick]], "score": p.score[pick], "truth": truth})


@dataclass(frozen=True)
class Comparison:
    """Two runs over the same images, matched by path (codes share ``classes``)."""

    a: Predictions
    b: Predictions
    common: int
    only_a: int
    only_b: int

    @property
    def agree(self) -> np.ndarray:
        return self.a.label == self.b.label

    def agreement(self) -> float | None:
        return float(self.agree.mean()) if self.common else None

    def disagreeing(self) -> int:
        """Common images the runs label differently."""
        return self.common - int(self.agree.sum())

    def outcomes(self) -> pd.DataFrame:
        """Over the labelled common rows: both right, only A, only B, both wrong."""
        labelled = self.a.labelled
        a, b = self.a.correct[labelled], self.b.correct[labelled]
        return pd.DataFrame(
            {
                "outcome": ["both right", "only A right", "only B right", "both wrong"],
                "count": [int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b)), int(np.sum(~a & ~b))],
            }
        )

    def disagreement(self, max_classes: int = 15) -> pd.DataFrame:
        """A's prediction (rows) × B's (columns) where they differ, over the classes most involved."""
        size = len(self.a.classes)
        differ = ~self.agree
        flat = self.a.label[differ].astype(np.int64) * size + self.b.label[differ]
        counts = np.bincount(flat, minlength=size * size).reshape(size, size)
        involvement = counts.sum(axis=0) + counts.sum(axis=1)
        shown = np.flatnonzero(involvement)
        shown = shown[np.argsort(-involvement[shown], kind="stable")[:max_classes]]
        shown = shown[cluster_order(counts[np.ix_(shown, shown)])]
        names = list(self.a.classes[shown])
        return pd.DataFrame(counts[np.ix_(shown, shown)], index=names, columns=names)

    def disagreement_pairs(self, top_n: int = 10) -> pd.DataFrame:
        """The most frequent (A's label, B's label) pairs where the runs differ: readable where the matrix is sparse."""
        differ = ~self.agree
        pairs = pd.DataFrame({"label_a": self.a.label[differ], "label_b": self.b.label[differ]})
        counts = pairs.value_counts(sort=False).reset_index(name="count")
        for column in ("label_a", "label_b"):
            counts[column] = self.a.classes[counts[column].to_numpy()]
        counts = counts.sort_values(
            ["count", "label_a", "label_b"], ascending=[False, True, True], key=lambda c: c if c.name == "count" else c.str.casefold()
        )
        return counts.head(top_n).reset_index(drop=True)

    def per_class_delta(self) -> pd.DataFrame:
        """Recall of each true class in A and in B, and B − A, largest changes first."""
        a, b = per_class(self.a).set_index("class"), per_class(self.b).set_index("class")
        table = pd.DataFrame({"support": a["support"], "A": a["recall"], "B": b["recall"]})
        table["delta"] = table["B"] - table["A"]
        return table.reset_index().sort_values("delta", key=np.abs, ascending=False, kind="stable")

    def drift(self, top_n: int = 20) -> tuple[pd.DataFrame, float]:
        """Share of each predicted label in A and B (the ``top_n`` that changed most) and the total variation distance."""
        size = len(self.a.classes)
        share_a = _counts(self.a.label, size) / max(1, self.common)
        share_b = _counts(self.b.label, size) / max(1, self.common)
        change = share_b - share_a
        order = np.argsort(-np.abs(change), kind="stable")
        order = order[change[order] != 0][:top_n]
        table = pd.DataFrame({"label": self.a.classes[order], "A": share_a[order], "B": share_b[order], "change": change[order]})
        return table, float(np.abs(change).sum() / 2)

    def disagreements(self, count: int) -> pd.DataFrame:
        """Images the runs label differently, where they are most sure of themselves first."""
        where = np.flatnonzero(~self.agree)
        pick = where[np.argsort(-(self.a.score[where] + self.b.score[where]), kind="stable")[:count]]
        truth = [self.a.classes[t] if t != NO_CLASS else None for t in self.a.truth[pick]]
        return pd.DataFrame(
            {
                "path": self.a.path_of(pick),
                "truth": truth,
                "label_a": self.a.classes[self.a.label[pick]],
                "score_a": self.a.score[pick],
                "label_b": self.a.classes[self.b.label[pick]],
                "score_b": self.b.score[pick],
            }
        )


def compare(a: Predictions, b: Predictions) -> Comparison:
    """Match two runs' rows by image path; rows only one run has are counted, not compared."""
    classes = np.array(sorted(set(a.classes) | set(b.classes)), dtype=object)
    a, b = a.recoded(classes), b.recoded(classes)
    paths_a = a.paths.take(pa.array(a.rows))
    paths_b = b.paths.take(pa.array(b.rows))
    in_a = pc.index_in(paths_b, value_set=paths_a)
    matched = in_a.is_valid().to_numpy(zero_copy_only=False)
    rows_b = np.flatnonzero(matched)
    rows_a = in_a.filter(in_a.is_valid()).to_numpy().astype(np.int64)
    pick_a, pick_b = np.zeros(len(a), dtype=bool), np.zeros(len(b), dtype=bool)
    pick_a[rows_a], pick_b[rows_b] = True, True
    order_a = np.argsort(rows_a)  # subset() keeps row order, so align B to A's order
    aligned_b = b.subset(rows_b[order_a])
    return Comparison(a.subset(pick_a), aligned_b, len(rows_a), int(len(a) - len(rows_a)), int(len(b) - len(rows_b)))
