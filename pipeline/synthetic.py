"""Synthetic runs in the documented layout, for scale tests, benchmarks and demos at sizes no
image folder here reaches. Rows are generated vectorised: a million take a few seconds.

The numbers behave like a real ImageNet model on an Imagenette-like dataset: roughly calibrated
confidence, confusions concentrated on a partner class, top-5 better than top-1, and the
label-set-restricted argmax much better than the full one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from . import runs
from .errors import UserError
from .labels import LabelMapper
from .models import DEFAULT_MODEL, describe, parse_model
from .sources import SAMPLE_DATA

TOPK = 5


def truth_classes(categories: list[str], count: int) -> list[int]:
    """Imagenette's ten classes, or ``count`` ImageNet classes spread over the 1,000."""
    if count == 10:
        mapper = LabelMapper(categories)
        return sorted(categories.index(mapper(folder.name)) for folder in SAMPLE_DATA.iterdir() if folder.is_dir())
    return sorted(set(np.linspace(0, len(categories) - 1, count).astype(int).tolist()))


def _strings(values: np.ndarray, dictionary: pa.Array) -> pa.Array:
    return dictionary.take(pa.array(values))


def synthetic_table(rows: int, categories: list[str], truth: list[int], seed: int = 0, start: int = 0) -> pa.Table:
    """``rows`` prediction rows in PREDICTION_SCHEMA; row ``i`` has path ``/synthetic/<class>/<start+i>.JPEG``."""
    names = pa.array(categories, pa.string())
    classes = len(categories)
    truth = np.asarray(truth)
    partner = np.roll(truth, 1)  # each class is mostly confused with one other
    # the images (paths, ground truth) depend on their position only; the seed varies the "model"
    which = np.random.default_rng([start, rows]).integers(len(truth), size=rows)
    rng = np.random.default_rng([seed, start])
    gt = truth[which]
    score = np.clip(rng.beta(4.0, 1.6, rows), 0.02, 1.0).astype(np.float32)
    right = rng.random(rows) < np.clip(score * 0.92, 0, 1)  # a little overconfident
    confused = np.where(rng.random(rows) < 0.6, partner[which], rng.integers(classes, size=rows))
    confused = np.where(confused == gt, (gt + 1) % classes, confused)
    label = np.where(right, gt, confused)

    # top-k: the label first, the truth among the next four for most mistakes, then random fillers
    topk = rng.integers(classes, size=(rows, TOPK))
    topk[:, 0] = label
    slot = rng.integers(1, TOPK, size=rows)
    truth_in_topk = ~right & (rng.random(rows) < 0.75)
    topk[truth_in_topk, slot[truth_in_topk]] = gt[truth_in_topk]
    rest = (1 - score)[:, None] * np.array([0.5, 0.2, 0.1, 0.05], dtype=np.float32)
    topk_scores = np.concatenate([score[:, None], rest], axis=1).astype(np.float32)

    # scores of the dataset's classes: the truth usually wins when the other 990 classes are ignored
    set_scores = rng.random((rows, len(truth))).astype(np.float32) * 0.05
    restricted_right = right | (rng.random(rows) < 0.95)
    winner = np.where(restricted_right, which, np.roll(np.arange(len(truth)), 1)[which])
    set_scores[np.arange(rows), winner] = np.maximum(score, 0.3)

    offsets = pa.array(np.arange(0, rows * TOPK + 1, TOPK, dtype=np.int32))
    set_offsets = pa.array(np.arange(0, rows * len(truth) + 1, len(truth), dtype=np.int32))
    paths = [f"/synthetic/{categories[g]}/{start + i:08d}.JPEG" for i, g in enumerate(gt.tolist())]
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "ground_truth": _strings(gt, names),
            "label": _strings(label, names),
            "label_index": pa.array(label.astype(np.int32)),
            "score": pa.array(score),
            "topk_labels": pa.ListArray.from_arrays(offsets, _strings(topk.ravel(), names)),
            "topk_scores": pa.ListArray.from_arrays(offsets, pa.array(topk_scores.ravel())),
            "label_set_scores": pa.ListArray.from_arrays(set_offsets, pa.array(set_scores.ravel())),
        },
        schema=runs.PREDICTION_SCHEMA,
    )


def write_synthetic_run(
    runs_dir: str | Path,
    rows: int,
    run_id: str | None = None,
    classes: int = 10,
    rows_per_part: int = runs.RunWriter.default_part_rows,
    seed: int = 0,
) -> Path:
    """A complete run folder of ``rows`` synthetic predictions, manifest and accuracy included."""
    categories = list(describe(parse_model(DEFAULT_MODEL)).categories)
    truth = truth_classes(categories, classes)
    run_id = run_id or f"synthetic-{rows}"
    path = runs.run_dir(runs_dir, run_id)
    if path.exists():
        raise UserError(f"run {run_id} already exists in {runs_dir}")
    (path / runs.PREDICTIONS).mkdir(parents=True)
    accuracy = runs.Accuracy()
    label_set = [categories[i] for i in truth]
    for number, start in enumerate(range(0, rows, rows_per_part)):
        table = synthetic_table(min(rows_per_part, rows - start), categories, truth, seed, start)
        runs.atomic_write_table(path / runs.PREDICTIONS / f"part-{number:06d}.parquet", table)
        runs.score_rows(table, accuracy, label_set)
    runs.atomic_write_table(path / runs.ERRORS, runs.ERROR_SCHEMA.empty_table())
    manifest = runs.Manifest(
        run_id=run_id,
        dataset="/synthetic",
        model={"name": "synthetic", "display_name": f"synthetic ({DEFAULT_MODEL} classes)"},
        params=runs.RunParams(batch_size=0, concurrency=None, num_gpus=None, limit=None, address=None, s3_endpoint=None),
        status="complete",
        finished_at=runs.now_iso(),
        counts=runs.Counts(inputs=rows, predicted=rows),
        accuracy=accuracy,
        label_set=label_set,
    )
    runs.write_manifest(path, manifest)
    return path
