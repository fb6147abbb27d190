"""Home: what this is, the current settings, where to go, the latest runs."""

import streamlit as st

from pages import widgets
from pipeline.runs import format_duration

settings = widgets.current_settings()

st.title("Batch image classification")
st.markdown(
    "Point it at a folder or bucket of images, **preview** what an ImageNet-trained model says about a sample, "
    "**run** the whole dataset on Ray Data and watch it live, then **explore** the saved predictions."
)

left, middle, right = st.columns(3)
left.metric(
    "Dataset",
    widgets.SAMPLE_DATA.name if settings.data == str(widgets.SAMPLE_DATA) else settings.data_display.rstrip("/").rsplit("/", 1)[-1],
)
left.caption(settings.data_display)
middle.metric("Model", settings.model_display)
right.metric("Ray cluster", settings.address or "local")
right.caption(f"runs saved in {settings.out}")

st.divider()
cols = st.columns(3)
cols[0].page_link("pages/preview.py", label="Preview a sample", icon=":material/photo_library:")
cols[1].page_link("pages/run.py", label="Run on the whole dataset", icon=":material/play_circle:")
cols[2].page_link("pages/analytics.py", label="Explore results", icon=":material/insights:")

st.subheader("Latest runs")
latest = widgets.runs_in(settings)[:5]
if not latest:
    st.info("No runs yet. Start one from the Run page.")
for _, manifest in latest:
    counts = manifest.counts
    top1 = widgets.percent(manifest.accuracy.top1)
    st.markdown(
        f"{widgets.status_badge(manifest.status)} · [{manifest.run_id}](/analytics?run={manifest.run_id}) · "
        f"{manifest.model.get('display_name')} · {counts.done:,}/{counts.inputs:,} images · top-1 {top1} · "
        f"{format_duration(manifest.elapsed_s)}"
    )
