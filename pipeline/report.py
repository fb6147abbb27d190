"""One self-contained HTML file with a run's analytics, for people without the dashboard: plotly.js,
charts, tables and a few thumbnails are all inside it, so it opens offline from a mail or a share."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from . import charts, metrics, runs
from .preprocess import thumbnail_jpeg
from .sources import Source, open_source

EXAMPLES = 12
# The report's charts are drawn with this template whatever process builds them: Streamlit sets plotly's
# default to its own, which leaves axes without automatic margins, and a report exported from the dashboard
# had its class names cut to their last letters.
TEMPLATE = "plotly_white"
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; color: #1f2933; }
body { padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #e4e7eb; padding-bottom: .3rem; }
.meta { color: #52606d; }
.kpis { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1.5rem 0; }
.kpi { border: 1px solid #e4e7eb; border-radius: .5rem; padding: .8rem 1.2rem; min-width: 9rem; }
.kpi b { display: block; font-size: 1.6rem; } .kpi span { color: #52606d; font-size: .85rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: .8rem; }
figure { margin: 0; border: 1px solid #e4e7eb; border-radius: .5rem; padding: .4rem; font-size: .8rem; }
figure img { width: 100%; border-radius: .3rem; } .wrong { color: #c62828; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #e4e7eb; text-align: left; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1rem; }
.charts > div, .grid > figure { min-width: 0; }
.name { display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: #52606d; }
"""
# auto-fill, not auto-fit: each chart is drawn as the page is read, when the grid holds only the charts
# before it, and auto-fit would give the first one the whole width (its bars then cut off at the column's edge)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _table(frame: pd.DataFrame, percent_columns: tuple[str, ...] = ()) -> str:
    formatters = {column: _percent for column in percent_columns if column in frame}
    return frame.to_html(index=False, border=0, formatters=formatters, float_format=lambda v: f"{v:.3f}", escape=True)


def _thumbnail(uri: str, source: Source | None) -> str | None:
    """A data: URI of the image, or None when it cannot be read any more (moved, deleted, offline)."""
    if source is None:
        return None
    try:
        data = thumbnail_jpeg(source.read(uri), size=160, quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _open_dataset(manifest: runs.Manifest) -> Source | None:
    """The run's dataset, opened once for all thumbnails; None when it cannot be opened any more."""
    try:
        return open_source(manifest.dataset, manifest.params.s3_endpoint)
    except Exception:
        return None


def _gallery(rows: pd.DataFrame, source: Source | None) -> str:
    if rows.empty:
        return "<p>Nothing to show.</p>"
    cells = []
    for row in rows.itertuples():
        image = _thumbnail(row.path, source)
        picture = f'<img src="{image}" alt="">' if image else "<p>(image unavailable)</p>"
        truth = f'<br><span class="wrong">truth: {html.escape(row.truth)}</span>' if isinstance(row.truth, str) else ""
        name = html.escape(Path(row.path).name)
        caption = f'<b>{html.escape(str(row.label))}</b> {row.score:.0%}{truth}<span class="name" title="{name}">{name}</span>'
        cells.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return f'<div class="grid">{"".join(cells)}</div>'


def build_report(path: str | Path, predictions: metrics.Predictions | None = None, scope: str | None = None) -> str:
    """The report of a run; ``predictions`` (a filtered subset) and ``scope`` (its description) narrow it."""
    path = Path(path)
    manifest = runs.read_manifest(path)
    p = predictions if predictions is not None else metrics.load(path, manifest.label_set)
    errors = runs.read_errors(path)
    source = _open_dataset(manifest)
    s = metrics.summary(p)
    kpis = [
        ("Predicted", f"{s.predicted:,}"),
        ("Failed", f"{errors.num_rows:,}"),
        ("Top-1", _percent(s.top1)),
        (f"Top-{manifest.params.topk}", _percent(s.top5)),
    ]
    if s.label_set_top1 is not None:
        kpis.append((f"Top-1 among the dataset's {len(manifest.label_set or ())} classes", _percent(s.label_set_top1)))
    kpis.append(("Mean confidence", _percent(s.mean_score)))
    figures = [charts.label_counts(metrics.label_distribution(p), height=520)]
    figures.append(charts.confidence_histogram(metrics.confidence_histogram(p)))
    sections = []
    if s.labelled:
        figures.append(charts.heatmap(metrics.confusion(p), "Confusion (confused classes side by side)", "predicted", "truth"))
        calibration = metrics.calibration(p)
        figures += [charts.reliability(calibration), charts.coverage(metrics.coverage_curve(p))]
        mistakes = metrics.examples(p, p.labelled & ~p.correct, EXAMPLES)
        sections += [
            "<h2>Per class</h2>" + _table(metrics.per_class(p).sort_values("f1"), ("precision", "recall", "f1")),
            "<h2>Most confused pairs</h2>" + _table(metrics.confused_pairs(p), ("share of class",)),
            "<h2>Misclassified, most confident first</h2>" + _gallery(mistakes, source),
        ]
    sections.append("<h2>Lowest confidence</h2>" + _gallery(metrics.examples(p, p.score >= 0, EXAMPLES, most_confident=False), source))
    if errors.num_rows:
        sections.append(f"<h2>Failed images ({errors.num_rows:,})</h2>" + _table(errors.slice(0, 100).to_pandas()))
    plots = [
        figure.update_layout(template=TEMPLATE).to_html(
            full_html=False, include_plotlyjs="inline" if i == 0 else False, config={"displaylogo": False, "responsive": True}
        )
        for i, figure in enumerate(figures)
    ]
    meta = (
        f"{html.escape(str(manifest.model.get('display_name', '?')))} on {html.escape(manifest.dataset)} · status {manifest.status} · "
        f"{manifest.counts.inputs:,} inputs · created {manifest.created_at}"
    )
    scope_line = f"<p class='meta'>Scope: {html.escape(scope)}</p>" if scope else ""
    if manifest.unmatched_truth:
        scope_line += f"<p class='meta'>Note: {html.escape(manifest.unmatched_truth.sentence())}.</p>"
    kpi_html = "".join(f"<div class='kpi'><b>{value}</b><span>{html.escape(name)}</span></div>" for name, value in kpis)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Run {html.escape(manifest.run_id)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Run {html.escape(manifest.run_id)}</h1><p class='meta'>{meta}</p>{scope_line}"
        f"<div class='kpis'>{kpi_html}</div><div class='charts'>{''.join(plots)}</div>{''.join(sections)}"
        f"<p class='meta'>Generated {runs.now_iso()} by <code>python -m pipeline report</code>.</p></body></html>"
    )


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report next to the run (``report.html``) or to ``out``; returns where it went."""
    target = Path(out) if out else Path(path) / "report.html"
    runs.atomic_write_bytes(target, build_report(path).encode())
    return target


def export_predictions(path: str | Path, rows: np.ndarray, file_format: str) -> bytes:
    """The chosen prediction rows (positions as ``metrics.load`` numbered them) as CSV or Parquet bytes.
    CSV joins the top-k lists with ``|`` so every row stays one line."""
    table = runs.read_predictions(path).take(pa.array(rows, pa.int64()))
    buffer = io.BytesIO()
    if file_format == "parquet":
        pq.write_table(table, buffer)
        return buffer.getvalue()
    if file_format != "csv":
        raise ValueError(f"unknown export format {file_format!r}")
    for name in ("topk_labels", "topk_scores", "label_set_scores"):
        values = pc.cast(table.column(name), pa.list_(pa.string()))
        table = table.set_column(table.schema.get_field_index(name), name, pc.binary_join(values, "|"))
    pa_csv.write_csv(table, buffer)
    return buffer.getvalue()
