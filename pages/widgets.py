"""What every page shares: the sidebar settings, cached model and listings, thumbnails, formatting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from pipeline import local, metrics, runs
from pipeline.cluster import LOCAL
from pipeline.errors import UserError
from pipeline.inference import Classifier
from pipeline.models import DEFAULT_MODEL, ModelInfo, ModelSpec, describe, ensure_weights, parse_model, registry
from pipeline.preprocess import thumbnail_jpeg
from pipeline.sources import SAMPLE_DATA, Listing, Source, list_images, open_source, redact_uri

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_SETTINGS = ("checkpoint", "labels", "arch", "preprocess")  # a user's own network, as the CLI's flags
CHECKPOINT_FIELDS = {"--labels FILE": "Labels file", "--preprocess": "Input", "--arch": "Architecture"}  # flag → field
SETTINGS = ("data", "model", "address", "out", *CHECKPOINT_SETTINGS)
CUSTOM_MODEL = "custom"  # the picker's entry for a user's own checkpoint


def defaults() -> dict[str, str]:
    """Starting values, overridable by the environment of whoever starts the server."""
    return {
        "data": os.environ.get("DASHBOARD_DATA", str(SAMPLE_DATA)),
        "model": DEFAULT_MODEL,
        "address": os.environ.get("RAY_ADDRESS", LOCAL),
        "out": os.environ.get("DASHBOARD_RUNS_DIR", str(ROOT / "runs")),
        "checkpoint": "",
        "labels": "",
        "arch": "",
        "preprocess": "",
    }


ALLOWED_ROOTS_ENV = "DASHBOARD_DATA_ROOTS"
STATUS_BADGES = {
    "running": ":blue[:material/autorenew: running]",
    "complete": ":green[:material/check_circle: complete]",
    "failed": ":red[:material/error: failed]",
    "cancelled": ":gray[:material/block: cancelled]",
    "interrupted": ":orange[:material/warning: interrupted]",
}


@dataclass(frozen=True)
class Settings:
    data: str
    model: str  # a registry name, or CUSTOM_MODEL: the CHECKPOINT_SETTINGS below say which network
    address: str
    out: str
    checkpoint: str = ""
    labels: str = ""
    arch: str = ""
    preprocess: str = ""

    @property
    def model_choice(self) -> tuple[str, ...]:
        """Everything that says which model: the name, and a user's own checkpoint's settings."""
        return (self.model, self.checkpoint, self.labels, self.arch, self.preprocess)

    @property
    def model_display(self) -> str:
        return f"custom:{Path(self.checkpoint).name or '?'}" if self.model == CUSTOM_MODEL else self.model

    @property
    def data_display(self) -> str:
        """The dataset URI safe to show: credentials written into it are dropped."""
        return redact_uri(self.data)

    @property
    def address_or_none(self) -> str | None:
        return None if self.address in ("", LOCAL) else self.address


def _init_state() -> None:
    for key, value in defaults().items():
        st.session_state.setdefault(f"setting_{key}", value)


@st.cache_data(show_spinner=False)
def model_choices() -> dict[str, str]:
    """Model name → label for the picker, with offline availability marked; a user's own checkpoint last."""
    choices = {e.name: f"{e.name}{'' if e.available_offline else '  (needs download)'}" for e in registry()}
    return choices | {CUSTOM_MODEL: "your own checkpoint…"}


def sidebar_settings() -> Settings:
    """The shared settings, kept in session state across pages, each validated where it is wrong."""
    _init_state()
    for key in CHECKPOINT_SETTINGS:  # Streamlit forgets a widget's value while it is not drawn: kept while another model is picked
        st.session_state[f"setting_{key}"] = st.session_state[f"setting_{key}"]
    with st.sidebar:
        st.subheader("Settings")
        st.text_input("Dataset", key="setting_data", help="Folder, s3://bucket/prefix or gs://bucket/prefix")
        choices = model_choices()
        st.selectbox("Model", list(choices), key="setting_model", format_func=choices.get)
        if st.session_state["setting_model"] == CUSTOM_MODEL:
            _checkpoint_inputs()
        st.text_input("Ray cluster", key="setting_address", help="`local`, or an address such as 10.0.0.5:6379")
        st.text_input("Output folder", key="setting_out")
        settings = current_settings()
        problem = dataset_problem(settings.data)
        if problem:
            st.error(problem)
        else:
            listing = cached_listing(settings.data)
            st.caption(f"{len(listing.files):,} images" + (f", {listing.skipped:,} other files skipped" if listing.skipped else ""))
        for problem in (model_problem(settings), cluster_problem(settings.address), output_problem(settings.out)):
            if problem:
                st.error(problem)
    return settings


def _checkpoint_inputs() -> None:
    """Where a user's own network is and what it expects, as ``python -m pipeline run --checkpoint …`` takes them."""
    st.text_input(
        "Checkpoint file",
        key="setting_checkpoint",
        placeholder="/models/net.pt2",
        help="A torch.export program (.pt2, exported in eval mode with a dynamic batch dimension), a TorchScript file, "
        "or a state dict of a torchvision architecture (then choose it below)",
    )
    st.text_input("Labels file", key="setting_labels", placeholder="/models/labels.txt", help="The class names, one per line")
    st.text_input("Architecture (state dicts only)", key="setting_arch", placeholder="resnet50", help="A torchvision model name")
    st.text_input(
        "Input",
        key="setting_preprocess",
        placeholder="crop=224 (ImageNet's)",
        help="Only where it differs from ImageNet's resize 256, crop 224, mean and std, bilinear (or the architecture's "
        "weights'): crop=299, or crop=384,resize=384,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,interpolation=bicubic",
    )


def model_spec(settings: Settings) -> ModelSpec:
    """The model the settings name; a checkpoint and its labels only from folders this dashboard may read."""
    if settings.model != CUSTOM_MODEL:
        return parse_model(settings.model)
    if not settings.checkpoint:
        raise UserError("Enter the path of your checkpoint file, or pick a model from the list")
    for path in (settings.checkpoint, settings.labels):
        if path:
            check_allowed(path)
    return parse_model(
        checkpoint=settings.checkpoint,
        labels_file=settings.labels or None,
        arch=settings.arch or None,
        preprocess=settings.preprocess or None,
    )


def _files_version(info: ModelInfo) -> tuple:
    """What changes when a model's files do: a user who rewrites a checkpoint gets it checked and loaded anew."""
    paths = [info.weights_path, info.spec.labels_file or ""]
    return tuple(os.stat(path).st_mtime_ns if os.path.isfile(path) else None for path in paths)


def model_problem(settings: Settings) -> str | None:
    """Why the chosen model cannot classify, in one line; its weights or program are checked once per version."""
    try:
        info = describe(model_spec(settings))
    except UserError as error:
        return _in_sidebar_words(str(error))
    problem = _loading_problem(info.spec, _files_version(info))
    return problem and _in_sidebar_words(problem)


def _in_sidebar_words(message: str) -> str:
    """The pipeline's messages name the CLI's flags; here the fields that take the same values."""
    for flag, field in CHECKPOINT_FIELDS.items():
        message = message.replace(flag, f"the {field} field")
    return message


@st.cache_data(show_spinner="Checking the model…", max_entries=16)
def _loading_problem(spec: ModelSpec, version: tuple) -> str | None:
    return _problem(lambda: ensure_weights(describe(spec)))


def _problem(check: Callable[[], object], advice: str = "") -> str | None:
    """One line saying what is wrong (the UserError's text and what to do about it), or None."""
    try:
        check()
    except UserError as error:
        return f"{error}{advice}"
    return None


def cluster_problem(address: str) -> str | None:
    return _problem(lambda: cluster_resources(address), ". Use `local`, or the address of a running Ray head.")


def output_problem(out: str) -> str | None:
    path = Path(out).expanduser()
    probe = next((p for p in (path, *path.parents) if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK):
        return f"Output folder {out} cannot be created or written; choose another."
    return None


def _leave_legacy_multipage_mode() -> None:
    """Streamlit runs a ``pages/`` folder as an old-style multipage app until some session has run
    ``app.py`` (which calls ``st.navigation``); a first visit straight to ``/run`` would otherwise get
    the page without the app around it. Switch the server to ``st.navigation`` and run again."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def current_settings() -> Settings:
    _leave_legacy_multipage_mode()
    _init_state()
    return Settings(*(str(st.session_state[f"setting_{key}"]).strip() for key in SETTINGS))


def allowed_roots() -> list[Path]:
    """Local folders the dashboard may read, from ``DASHBOARD_DATA_ROOTS`` (os.pathsep-separated); empty = any."""
    raw = os.environ.get(ALLOWED_ROOTS_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def check_allowed(data: str) -> None:
    roots = allowed_roots()
    if not roots or "://" in data:
        return
    path = Path(data).expanduser().resolve()
    if not any(path == root or root in path.parents for root in [*roots, SAMPLE_DATA.resolve()]):
        raise UserError(f"{data} is outside the folders this dashboard may read ({ALLOWED_ROOTS_ENV})")


@st.cache_resource(show_spinner="Listing images…", ttl=60, max_entries=8)
def cached_listing(data: str) -> Listing:
    check_allowed(data)
    return list_images(open_source(data))


def dataset_problem(data: str) -> str | None:
    return _problem(lambda: cached_listing(data), ". Enter a folder with images, or s3://bucket/prefix.")


def cached_classifier(spec: ModelSpec) -> Classifier:
    return _classifier(spec, _files_version(describe(spec)))


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def _classifier(spec: ModelSpec, version: tuple) -> Classifier:
    return Classifier(spec)


@st.cache_data(show_spinner=False, ttl=30)
def cluster_resources(address: str) -> dict:
    """CPUs and GPUs of the cluster; a remote one is asked from a subprocess so this server never joins it."""
    if address in ("", LOCAL):
        import torch

        return {"address": LOCAL, "cpus": local.machine().cpus, "gpus": float(torch.cuda.device_count())}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "cluster", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"cannot reach the Ray cluster at {address}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@st.cache_resource(show_spinner=False, ttl=300, max_entries=8)
def cached_source(dataset: str, s3_endpoint: str | None) -> Source:
    return open_source(dataset, s3_endpoint)


@st.cache_data(show_spinner=False, max_entries=512)
def thumbnail(uri: str, dataset: str, s3_endpoint: str | None, size: int = 224) -> bytes | None:
    """A small JPEG of a run's image, read through its dataset's filesystem (S3 keys from the environment)."""
    try:
        source = cached_source(dataset, s3_endpoint)
        return thumbnail_jpeg(source.read(uri), size)
    except Exception:
        return None


def runs_root(settings: Settings) -> Path:
    return Path(settings.out).expanduser().resolve()


def status_badge(status: str) -> str:
    """A coloured status for markdown (headings, captions); tables show the plain word."""
    return STATUS_BADGES.get(status, status)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


PERCENT_FORMAT = "%.1f%%"  # a table column of in_percent's values: one decimal on every row


def in_percent(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Shares as percentages for a table: Streamlit's "percent" format drops trailing zeros (100%, 93.8%,
    37.41% in one column), a printf format cannot scale."""
    return frame.assign(**{column: pd.to_numeric(frame[column]) * 100 for column in columns})  # None (no truth) → NaN


def runs_in(settings: Settings) -> list[tuple[Path, runs.Manifest]]:
    return runs.list_runs(runs_root(settings))


def _part_stats(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of each prediction part written so far."""
    stats = []
    for part in runs.prediction_parts(path):
        try:
            stat = part.stat()
        except FileNotFoundError:  # replaced under us; the next look sees the new one
            continue
        stats.append((part.name, stat.st_size, stat.st_mtime_ns))
    return stats


def run_version(path: Path) -> tuple[int, int]:
    """Changes whenever prediction rows are added, so cached results over a live run refresh."""
    stats = _part_stats(path)
    return len(stats), sum(size for _, size, _ in stats)


class LivePredictions:
    """A run's predictions as read so far. A part never changes once written, so a live run's refresh
    reads only the parts that are new and appends them (a million-row run is not read again every
    second); a part that did change (the folder was replaced) starts the reading over."""

    def __init__(self, path: Path, label_set: list[str]):
        self.path, self.label_set = path, label_set
        self.lock = threading.Lock()  # sessions share this object
        self.read: list[tuple[str, int, int]] = []
        self.predictions = metrics.load(path, label_set, parts=[])

    def current(self) -> metrics.Predictions:
        """The latest rows; the returned object is shared by every session and never changes (treat as read-only)."""
        with self.lock:
            stats = _part_stats(self.path)
            if stats[: len(self.read)] != self.read:
                self.read, self.predictions = [], metrics.load(self.path, self.label_set, parts=[])
            new = [self.path / runs.PREDICTIONS / name for name, _, _ in stats[len(self.read) :]]
            if new:
                self.predictions = metrics.concat(self.predictions, metrics.load(self.path, self.label_set, parts=new))
                self.read = stats
            return self.predictions


@st.cache_resource(show_spinner=False, max_entries=6)
def _live_predictions(path: str, label_set: tuple[str, ...]) -> LivePredictions:
    return LivePredictions(Path(path), list(label_set))


def load_predictions(path: Path, manifest: runs.Manifest) -> metrics.Predictions:
    with st.spinner("Reading predictions…"):
        return _live_predictions(str(path), tuple(manifest.label_set or ())).current()


def describe_run(manifest: runs.Manifest) -> str:
    return f"{manifest.run_id} · {manifest.model.get('display_name', '?')} · {manifest.counts.inputs:,} images · {manifest.status}"


def pick_run(label: str, all_runs: list[tuple[Path, runs.Manifest]], key: str, default: str | None = None) -> tuple[Path, runs.Manifest]:
    """A run chooser whose choice is kept in the URL (``?<key>=<run id>``), so views can be linked."""
    ids = [manifest.run_id for _, manifest in all_runs]
    by_id = {manifest.run_id: (path, manifest) for path, manifest in all_runs}
    choice, written = f"run_choice_{key}", f"run_choice_{key}_url"
    linked = st.query_params.get(key)
    if st.session_state.get(choice) not in ids or (linked in ids and linked != st.session_state.get(written)):
        # first visit, a run that went away, or a link to another run: the URL decides
        st.session_state[choice] = linked if linked in ids else (default if default in ids else ids[0])
    run_id = st.selectbox(label, ids, key=choice, format_func=lambda i: describe_run(by_id[i][1]))
    st.query_params[key] = st.session_state[written] = run_id
    return by_id[run_id]


def gallery(rows: pd.DataFrame, manifest: runs.Manifest, caption: Callable[[object], str], columns: int = 6) -> None:
    """Thumbnails with a caption each; rows need a ``path`` column."""
    if rows.empty:
        st.caption("Nothing to show.")
        return
    for i, row in enumerate(rows.itertuples()):
        if i % columns == 0:  # a row of columns at a time, so cards of a row start level whatever their captions' lengths
            cells = st.columns(columns)
        with cells[i % columns].container(border=True):
            data = thumbnail(row.path, manifest.dataset, manifest.params.s3_endpoint)
            if data:
                st.image(data, width="stretch")
            else:
                st.caption("(image unavailable)")
            st.markdown(caption(row))
