"""Metrics against hand-computed small cases and against scikit-learn on random data."""

import numpy as np
import pyarrow as pa
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from pipeline import metrics, runs


def write_run(path, rows: list[dict], label_set=None):
    """A run folder holding exactly ``rows`` (dicts in PREDICTION_SCHEMA) as two parts."""
    defaults = {"label_index": 0, "topk_scores": None, "label_set_scores": None}
    table = pa.Table.from_pylist([{**defaults, **row} for row in rows], schema=runs.PREDICTION_SCHEMA)
    (path / runs.PREDICTIONS).mkdir(parents=True)
    half = len(rows) // 2
    runs.atomic_write_table(path / runs.PREDICTIONS / "part-000000.parquet", table.slice(0, half))
    runs.atomic_write_table(path / runs.PREDICTIONS / "part-000001.parquet", table.slice(half))
    return metrics.load(path, label_set)


def row(path, truth, label, score, topk=None, label_set_scores=None):
    return {
        "path": path,
        "ground_truth": truth,
        "label": label,
        "score": score,
        "topk_labels": topk or [label],
        "label_set_scores": label_set_scores,
    }


@pytest.fixture
def small(tmp_path):
    """Six images by hand: cat ×3, dog ×2, one without ground truth."""
    return write_run(
        tmp_path / "small",
        [
            row("a", "cat", "cat", 0.9, ["cat", "dog"], [0.9, 0.05]),
            row("b", "cat", "dog", 0.6, ["dog", "cat"], [0.3, 0.6]),
            row("c", "cat", "fox", 0.5, ["fox", "owl"], [0.2, 0.1]),
            row("d", "dog", "dog", 0.8, ["dog", "cat"], [0.1, 0.8]),
            row("e", "dog", "cat", 0.7, ["cat", "fox"], [0.7, 0.2]),
            row("f", None, "owl", 0.4, ["owl", "cat"], [0.1, 0.1]),
        ],
        label_set=["cat", "dog"],
    )


def test_summary_by_hand(small):
    s = metrics.summary(small)
    assert (s.predicted, s.labelled) == (6, 5)
    assert s.top1 == pytest.approx(2 / 5)
    assert s.top5 == pytest.approx(3 / 5)  # c (fox, owl) and e (cat, fox) miss
    # among {cat, dog}: a→cat ✓, b→dog ✗, c→cat ✓, d→dog ✓, e→cat ✗
    assert s.label_set_top1 == pytest.approx(3 / 5)
    assert s.mean_score == pytest.approx(np.mean([0.9, 0.6, 0.5, 0.8, 0.7, 0.4]))


def test_per_class_by_hand(small):
    table = metrics.per_class(small).set_index("class")
    assert list(table.index) == ["cat", "dog"]  # only ground-truth classes get a row
    # cat: predicted cat on labelled rows a, e → precision 1/2; recall 1/3
    assert table.loc["cat", "precision"] == pytest.approx(0.5)
    assert table.loc["cat", "recall"] == pytest.approx(1 / 3)
    assert table.loc["cat", "f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert table.loc["dog", "precision"] == pytest.approx(0.5)
    assert table.loc["dog", "recall"] == pytest.approx(0.5)
    assert table.loc["dog", "support"] == 2


def test_confusion_and_pairs_by_hand(small):
    matrix = metrics.confusion(small)
    assert set(matrix.index) == {"cat", "dog"}
    assert matrix.loc["cat", "cat"] == 1 and matrix.loc["cat", "dog"] == 1 and matrix.loc["dog", "cat"] == 1
    assert matrix.loc["cat", metrics.OTHER] == 1  # cat → fox, a class outside the matrix
    pairs = metrics.confused_pairs(small)
    assert len(pairs) == 3 and pairs["count"].tolist() == [1, 1, 1]
    assert set(zip(pairs["truth"], pairs["predicted"], strict=True)) == {("cat", "dog"), ("cat", "fox"), ("dog", "cat")}


def test_calibration_by_hand(small):
    calibration = metrics.calibration(small, bins=2)
    # labelled scores 0.9 ✓, 0.6 ✗, 0.5 ✗, 0.8 ✓, 0.7 ✗ : all in the upper bin [0.5, 1]
    assert calibration.bins["count"].tolist() == [5]
    assert calibration.bins["accuracy"].iloc[0] == pytest.approx(0.4)
    assert calibration.ece == pytest.approx(abs(0.4 - 0.7))


def test_coverage_curve_by_hand(small):
    curve = metrics.coverage_curve(small, points=6)
    # most confident first: 0.9 ✓, 0.8 ✓, 0.7 ✗, 0.6 ✗, 0.5 ✗
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 1.0, 2 / 3, 0.5, 0.4])
    assert curve["threshold"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])


def test_filters_and_label_set_view(small):
    confident = small.subset(small.score >= 0.7)
    assert metrics.summary(confident).predicted == 3
    assert sorted(confident.path_of(np.arange(len(confident)))) == ["a", "d", "e"]
    restricted = small.restricted()
    assert metrics.summary(restricted).top1 == pytest.approx(3 / 5)
    assert restricted.classes[restricted.label[1]] == "dog"
    assert restricted.score[1] == pytest.approx(0.6 / 0.9)  # renormalised over {cat, dog}


def test_old_parts_without_label_set_column_still_load(tmp_path):
    path = tmp_path / "old"
    (path / runs.PREDICTIONS).mkdir(parents=True)
    old_schema = pa.schema([f for f in runs.PREDICTION_SCHEMA if f.name != "label_set_scores"])
    table = pa.Table.from_pylist([row("a", "cat", "cat", 0.9) | {"label_index": 1, "topk_scores": [0.9]}], schema=old_schema)
    runs.atomic_write_table(path / runs.PREDICTIONS / "part-000000.parquet", table)
    loaded = metrics.load(path)
    assert metrics.summary(loaded).top1 == 1.0 and loaded.label_set_label is None


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """5,000 random rows over 30 classes, with the full score matrix kept for scikit-learn."""
    rng = np.random.default_rng(7)
    n, k = 5000, 30
    names = [f"class {i:02d}" for i in range(k)]
    logits = rng.normal(size=(n, k))
    truth = rng.integers(k, size=n)
    logits[np.arange(n), truth] += rng.normal(1.5, 1.0, size=n)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1)
    has_truth = rng.random(n) > 0.05
    rows = [
        row(
            f"img-{i}",
            names[truth[i]] if has_truth[i] else None,
            names[order[i, 0]],
            float(probabilities[i, order[i, 0]]),
            [names[j] for j in order[i, :5]],
        )
        for i in range(n)
    ]
    loaded = write_run(tmp_path_factory.mktemp("random"), rows)
    return loaded, names, truth[has_truth], order[has_truth, 0], probabilities[has_truth]


def test_matches_sklearn_on_random_data(random_run):
    loaded, names, truth, predicted, probabilities = random_run
    s = metrics.summary(loaded)
    assert s.labelled == len(truth)
    assert s.top1 == pytest.approx(np.mean(truth == predicted))
    assert s.top5 == pytest.approx(top_k_accuracy_score(truth, probabilities, k=5, labels=range(len(names))))

    table = metrics.per_class(loaded)
    present = sorted(set(truth))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=present, zero_division=0)
    assert table["class"].tolist() == [names[i] for i in present]
    np.testing.assert_allclose(table["precision"], precision)
    np.testing.assert_allclose(table["recall"], recall)
    np.testing.assert_allclose(table["f1"], f1)
    np.testing.assert_array_equal(table["support"], support)

    expected = confusion_matrix(truth, predicted, labels=range(len(names)))
    full = metrics.confusion(loaded, max_classes=len(names))
    codes = [names.index(c) for c in full.index]
    np.testing.assert_array_equal(full.loc[:, list(full.index)].to_numpy(), expected[np.ix_(codes, codes)])


def test_calibration_matches_sklearn_and_ece_definition(random_run):
    loaded, _, truth, predicted, probabilities = random_run
    confidence = probabilities.max(axis=1)
    right = truth == predicted
    calibration = metrics.calibration(loaded, bins=10)
    accuracy, mean_confidence = calibration_curve(right, confidence, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(calibration.bins["accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(calibration.bins["confidence"], mean_confidence, rtol=1e-5)
    which = np.clip((confidence * 10).astype(int), 0, 9)
    ece = sum(np.mean(which == b) * abs(right[which == b].mean() - confidence[which == b].mean()) for b in set(which))
    assert calibration.ece == pytest.approx(ece, rel=1e-5)


def test_coverage_curve_is_accuracy_of_the_most_confident(random_run):
    loaded, _, truth, predicted, probabilities = random_run
    curve = metrics.coverage_curve(loaded, points=11)
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    right = (truth == predicted)[order]
    for coverage, accuracy in zip(curve["coverage"], curve["accuracy"], strict=True):
        kept = round(coverage * len(truth))
        assert accuracy == pytest.approx(right[:kept].mean())


def test_compare_matches_rows_by_path(tmp_path):
    a = write_run(
        tmp_path / "a",
        [row("x", "cat", "cat", 0.9), row("y", "dog", "cat", 0.6), row("z", "dog", "dog", 0.7), row("only-a", "cat", "cat", 0.5)],
    )
    b = write_run(tmp_path / "b", [row("z", "dog", "fox", 0.8), row("y", "dog", "dog", 0.9), row("x", "cat", "cat", 0.95)])
    comparison = metrics.compare(a, b)
    assert (comparison.common, comparison.only_a, comparison.only_b) == (3, 1, 0)
    assert comparison.agreement() == pytest.approx(1 / 3) and comparison.disagreeing() == 2
    outcomes = dict(zip(*comparison.outcomes().to_dict("list").values(), strict=True))
    assert outcomes == {"both right": 1, "only A right": 1, "only B right": 1, "both wrong": 0}
    delta = comparison.per_class_delta().set_index("class")
    assert delta.loc["dog", "A"] == 0.5 and delta.loc["dog", "B"] == 0.5 and delta.loc["cat", "delta"] == 0
    shown = comparison.disagreements(10)
    assert set(shown["path"]) == {"y", "z"}
    assert dict(zip(shown["path"], shown["label_b"], strict=True)) == {"y": "dog", "z": "fox"}
    assert comparison.disagreement_pairs().values.tolist() == [["cat", "dog", 1], ["dog", "fox", 1]]
    table, distance = comparison.drift()
    assert distance == pytest.approx(1 / 3)  # cat 2/3 → 1/3, dog 1/3 → 1/3, fox 0 → 1/3
    assert table.set_index("label").loc["fox", "B"] == pytest.approx(1 / 3)


def test_disagreement_pairs_most_frequent_first(tmp_path):
    labels_a = ["cat", "cat", "cat", "dog", "dog", "owl", "owl"]
    labels_b = ["dog", "dog", "cat", "owl", "cat", "cat", "owl"]
    a = write_run(tmp_path / "a", [row(str(i), None, label, 0.5) for i, label in enumerate(labels_a)])
    b = write_run(tmp_path / "b", [row(str(i), None, label, 0.5) for i, label in enumerate(labels_b)])
    pairs = metrics.compare(a, b).disagreement_pairs(top_n=3)
    assert pairs.values.tolist() == [["cat", "dog", 2], ["dog", "cat", 1], ["dog", "owl", 1]]


def test_cluster_order_puts_confused_classes_together():
    weights = np.zeros((6, 6))
    for i, j in ((0, 3), (3, 5), (1, 4)):
        weights[i, j] = 10
    order = metrics.cluster_order(weights)
    position = {c: order.index(c) for c in range(6)}
    assert abs(position[0] - position[3]) == 1 and abs(position[3] - position[5]) == 1 and abs(position[1] - position[4]) == 1


def test_parts_loaded_apart_then_joined_equal_loading_them_together(small, tmp_path):
    """How a live run's refresh reads only new parts; 'owl' first appears in the second part."""
    path, label_set = tmp_path / "small", ["cat", "dog"]
    first, second = (metrics.load(path, label_set, parts=[part]) for part in runs.prediction_parts(path))
    assert "owl" not in first.classes and "owl" in second.classes
    joined = metrics.concat(metrics.concat(metrics.load(path, label_set, parts=[]), first), second)
    for name in ("classes", "truth", "label", "score", "topk_hit", "label_set_label", "label_set_score", "rows"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(small, name), err_msg=name)
    assert joined.paths.equals(small.paths) and metrics.summary(joined) == metrics.summary(small)
