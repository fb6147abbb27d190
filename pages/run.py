"""Run: launch a full-dataset run as its own process, watch it live, cancel or resume it, list all runs."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import widgets
from pipeline import charts, launcher, metrics, runs
from pipeline.cluster import LOCAL
from pipeline.errors import UserError
from pipeline.inference import PRECISIONS
from pipeline.runner import LOCAL_MAX_IMAGES, MAX_TOPK, RunRequest
from pipeline.runs import ENGINES, format_duration

ENGINE_LABELS = {
    "auto": "auto: local processes, or Ray Data for big CPU-only runs",
    "ray": "Ray Data",
    "local": "local processes on this machine, its CPUs or GPUs (no Ray)",
}
CLUSTER_ENGINE_LABELS = {**ENGINE_LABELS, "auto": "auto: Ray Data, on the cluster"}
settings = widgets.current_settings()
root = widgets.runs_root(settings)
st.title("Run")

try:
    resources = widgets.cluster_resources(settings.address)
except UserError as error:
    resources = None
    st.error(f"{error}. Check the Ray cluster address in the sidebar (or use `local`).")


@st.fragment(run_every=2.0)
def running_note() -> None:
    """Runs in progress, before another is started beside them: on one machine they share its CPUs or GPUs."""
    running = [m for _, m in widgets.runs_in(settings) if m.status == "running"]
    if running:
        names = ", ".join(f"{m.run_id} ({m.counts.done:,} of {m.counts.inputs:,})" for m in running)
        st.caption(f":material/info: Running now: {names}. A run started beside it shares the same CPUs or GPUs.")


running_note()
if note := st.session_state.pop("deleted_note", None):  # set by delete_runs before the page is drawn again
    st.success(note)
with st.form("launch"):
    st.markdown(f"**{settings.model_display}** on `{settings.data_display}`")
    c1, c2, c3, c4 = st.columns(4)
    batch_size = c1.number_input(
        "Batch size", min_value=1, max_value=4096, value=None, step=8, placeholder="auto", help="Empty: 64 on CPU, 512 on GPU"
    )
    concurrency = c2.number_input(
        "Concurrency (0 = auto)",
        min_value=0,
        max_value=256,
        value=0,
        step=1,
        help=(
            "Model workers (Ray actors or local processes), at most one per batch. "
            "Auto: two per GPU, or one single-threaded worker per CPU, up to 8"
        ),
    )
    has_gpu = bool(resources and resources["gpus"] >= 1)
    num_gpus = c3.number_input(
        "GPUs per actor",
        min_value=0.0,
        max_value=8.0,
        value=None,
        step=0.25,
        placeholder="auto" if has_gpu else "no GPU",
        disabled=not has_gpu,
        help="Empty: two actors share each GPU, or the GPUs are shared by the concurrency asked for; 0 runs on CPUs",
    )
    limit = c4.number_input("Limit (0 = all images)", min_value=0, value=0, step=100)
    c5, c6, c7 = st.columns([2, 1, 1])
    on_cluster = bool(resources and resources["address"] != LOCAL)  # local processes cannot run there
    engine = c5.selectbox(
        "Engine",
        [name for name in ENGINES if name != "local"] if on_cluster else ENGINES,
        format_func=(CLUSTER_ENGINE_LABELS if on_cluster else ENGINE_LABELS).get,
        help=(
            "On a cluster, Ray Data's actors run the model on its nodes."
            if on_cluster
            else f"Local worker processes skip Ray's start-up (seconds): auto uses them for any run on this machine's GPUs "
            f"and for up to {LOCAL_MAX_IMAGES:,} images on its CPUs, and Ray Data for bigger CPU runs and clusters."
        ),
    )
    precision = c6.selectbox(
        "Precision",
        PRECISIONS,
        help=(
            "auto: bf16 autocast on GPUs, except for models whose bf16 answers differ from fp32's on over 1 % of "
            "images (efficientnet_lite0), and fp32 on CPUs. bf16 on a CPU is emulated unless it has native bf16, "
            "and even then not faster for every model."
        ),
    )
    topk = c7.number_input(
        "Top-k kept",
        min_value=1,
        max_value=MAX_TOPK,
        value=5,
        help="Classes stored per image, best first; top-k accuracy counts a hit among them",
    )
    if resources:
        where = "This machine" if resources["address"] == LOCAL else f"Ray cluster at {resources['address']}"
        note = f"{where}: {resources['cpus']:g} CPUs, {resources['gpus']:g} GPUs."
        st.caption(note + ("" if has_gpu else " No GPU, so the model runs on CPUs."))
    submitted = st.form_submit_button("Start run", type="primary", disabled=resources is None)

if submitted:
    problem = widgets.dataset_problem(settings.data) or widgets.model_problem(settings)
    if problem:
        st.error(problem)
    else:
        request = RunRequest(
            data=settings.data,
            model=widgets.model_spec(settings),
            out=settings.out,
            batch_size=int(batch_size) if batch_size else None,
            concurrency=int(concurrency) or None,
            num_gpus=float(num_gpus) if has_gpu and num_gpus is not None else None,
            limit=int(limit) or None,
            address=settings.address_or_none,
            topk=int(topk),
            engine=engine,
            precision=precision,
        )
        try:
            launched = launcher.launch_run(request)
        except UserError as error:
            st.error(str(error))
        else:
            st.session_state["watch_run"] = launched.run_id
            st.toast(f"Run {launched.run_id} started")


@st.fragment(run_every=1.0)
def live_view(run_id: str) -> None:
    """Progress of one run, re-read from its folder every second: the page holds no state of the run."""
    path = runs.run_dir(root, run_id)
    if not (path / runs.MANIFEST).is_file():
        failure = launcher.launch_failure(root, run_id)
        if failure:
            st.error(f"Run {run_id} could not start: {failure}")
        else:
            st.info(f"Starting {run_id}: listing images, starting the model's workers…")
        return
    manifest = runs.read_manifest(path)
    counts = manifest.counts
    st.subheader(f"{widgets.status_badge(manifest.status)} {run_id}")
    fraction = counts.done / counts.inputs if counts.inputs else 0.0
    st.progress(min(fraction, 1.0), text=f"{counts.done:,} / {counts.inputs:,} images ({fraction:.0%})")
    if manifest.device:
        st.caption(manifest.device)
    so_far = "" if manifest.status == "complete" else " so far"  # a stopped run has part of its images
    m1, m2, m3, m4, m5 = st.columns(5)
    rate = manifest.images_per_s
    m1.metric("Images/s", f"{rate:.1f}" if rate else "–")
    remaining = (counts.inputs - counts.done) / rate if rate and manifest.status == "running" else None
    m2.metric("ETA", format_duration(remaining) if remaining is not None else "–")
    m3.metric("Elapsed", format_duration(manifest.elapsed_s))
    m4.metric("Failed", f"{counts.failed:,}")
    m5.metric(f"Top-1{so_far}", widgets.percent(manifest.accuracy.top1))
    if manifest.reason and manifest.status != "complete":
        (st.warning if manifest.status in ("cancelled", "interrupted") else st.error)(manifest.reason)
    # a complete run has no Cancel or Resume: its link goes first in the row
    button_column, link_column = st.columns([1, 2, 3])[:2] if manifest.status != "complete" else (None, st.container())
    if manifest.status == "running" and button_column.button("Cancel", key=f"cancel-{run_id}"):
        runs.request_cancel(path)
        st.toast("Cancelling after the batch in flight…")
    if manifest.status in ("interrupted", "failed", "cancelled") and button_column.button("Resume", key=f"resume-{run_id}"):
        try:
            launcher.launch_resume(path, settings.data)
            st.toast("Resuming: only the missing images will be classified")
        except UserError as error:
            st.error(str(error))
    link_column.page_link("pages/analytics.py", label="Open in Analytics", query_params={"run": run_id}, icon=":material/insights:")
    predictions = widgets.load_predictions(path, manifest)
    if len(predictions):
        figure = charts.label_counts(metrics.label_distribution(predictions, top_n=15), height=440, scope=so_far)
        st.plotly_chart(figure, width="stretch", key=f"live-{run_id}")


existing = widgets.runs_in(settings)
watched = st.session_state.get("watch_run") or next((m.run_id for _, m in existing if m.status == "running"), None)
if watched is None and existing:
    watched = existing[0][1].run_id
if watched:
    live_view(watched)


@st.fragment(run_every=3.0)
def runs_table() -> None:
    """Every run in the output folder, re-read every few seconds so new and finishing runs show up."""
    all_runs = widgets.runs_in(settings)
    st.subheader("All runs")
    if not all_runs:
        st.info(f"No runs in {root} yet.")
        return
    table = pd.DataFrame(
        [
            {
                "run": manifest.run_id,
                "status": manifest.status,
                "model": manifest.model.get("display_name"),
                "dataset": manifest.dataset,
                "predicted": manifest.counts.predicted,
                "failed": manifest.counts.failed,
                "inputs": manifest.counts.inputs,
                "top-1": manifest.accuracy.top1,
                "duration": format_duration(manifest.elapsed_s),
                "img/s": manifest.images_per_s,
                "ran on": manifest.device,  # engine, workers or actors, precision, batch: what sets img/s
                "started": manifest.created_at.replace("T", " ")[:19],
                "analytics": f"/analytics?run={manifest.run_id}",
                "folder": str(Path(path)),
            }
            for path, manifest in all_runs
        ]
    )
    st.dataframe(
        widgets.in_percent(table, ["top-1"]),
        hide_index=True,
        width="stretch",
        column_config={
            **{count: st.column_config.NumberColumn(format="localized") for count in ("predicted", "failed", "inputs")},
            "top-1": st.column_config.NumberColumn(format=widgets.PERCENT_FORMAT),
            "img/s": st.column_config.NumberColumn(format="%.1f"),
            "analytics": st.column_config.LinkColumn("open", display_text="Analytics"),
        },
    )
    watch = st.selectbox("Watch a run", [m.run_id for _, m in all_runs], index=None, placeholder="Pick a run to watch")
    if watch and watch != st.session_state.get("watch_run"):
        st.session_state["watch_run"] = watch
        st.rerun()


def delete_runs(listed: list[tuple[Path, runs.Manifest]]) -> None:
    """Runs picked by hand, deleted with everything they wrote; not the running ones: their processes would write on."""
    stopped = [m.run_id for _, m in listed if m.status != "running"]
    if not stopped:
        return
    with st.expander("Delete runs"):
        doomed = st.multiselect(
            "Runs to delete",
            stopped,
            placeholder="Pick runs",
            help="Their predictions, errors, inputs and manifests; this cannot be undone. Runs still running are not listed.",
        )
        if st.button("Delete", disabled=not doomed, key="delete-runs"):
            try:
                for run_id in doomed:
                    runs.delete_run(runs.run_dir(root, run_id))
            except UserError as error:
                st.error(str(error))
                return
            if st.session_state.get("watch_run") in doomed:
                del st.session_state["watch_run"]
            st.session_state["deleted_note"] = f"Deleted {len(doomed)} run(s): {', '.join(doomed)}"
            st.rerun()


runs_table()
delete_runs(existing)  # as this run of the page read them; delete_run reads each again, and refuses one since started
