"""Preview: a seeded sample through the model in this process, shown as a grid of labelled photos."""

import streamlit as st

from pages import widgets
from pipeline.errors import UserError
from pipeline.preview import preview

COLUMNS = 4

settings = widgets.current_settings()
st.title("Preview")
st.caption("A sample of the dataset through the model, right here — nothing is saved.")

left, middle, right = st.columns([3, 1, 1.5], vertical_alignment="bottom")  # the button's label whole at 1,024 px
n = left.slider("Images", 1, 64, 16)
seed = middle.number_input("Seed", min_value=0, value=0, step=1)
go = right.button("Classify sample", type="primary", width="stretch")
options, restrict = st.columns(2)
show_topk = options.toggle("Show every image's top classes", value=False)  # top-5, or all of a model with fewer

key = (settings.data, settings.model_choice, n, int(seed))
if go or st.session_state.get("preview_key") != key:
    problem = widgets.dataset_problem(settings.data) or widgets.model_problem(settings)
    if problem:
        st.error(problem)
        st.stop()
    try:
        classifier = widgets.cached_classifier(widgets.model_spec(settings))
        with st.spinner("Classifying…"):
            result = preview(widgets.cached_listing(settings.data), classifier, n=n, seed=int(seed))
    except UserError as error:
        st.error(str(error))
        st.stop()
    st.session_state.update(preview_key=key, preview_result=result)

result = st.session_state["preview_result"]
among = ""
if result.label_set and restrict.toggle(
    f"Only the dataset's {len(result.label_set)} classes",
    key="preview_restricted",
    help="Each image's best among the classes the dataset's folders name, instead of all the model's, with scores "
    "renormalised over them (label-set-restricted, as on Analytics).",
):
    result, among = result.restricted(), f" among the dataset's {len(result.label_set)} classes"
rows = result.rows
judged = [row.correct for row in rows if row.correct is not None]
summary = f"{len(rows)} images in {result.seconds:.2f} s"
if judged:
    summary += f" · {sum(judged)}/{len(judged)} correct{among}"
st.caption(summary)

for start in range(0, len(rows), COLUMNS):
    for column, row in zip(st.columns(COLUMNS), rows[start : start + COLUMNS], strict=False):
        with column.container(border=True):
            if row.thumbnail is not None:
                st.image(row.thumbnail, width="stretch")
            if row.error:
                st.error(f"{row.relative}: {row.error}")
                continue
            mark = {True: ":green[:material/check_circle:]", False: ":red[:material/cancel:]", None: ":gray[:material/help:]"}[row.correct]
            st.markdown(f"{mark} **{row.label}** · {row.score:.0%}")
            truth = f"truth: {row.ground_truth}" if row.ground_truth else "no ground truth"
            st.caption(f"{truth} (not a class of this model)" if row.truth_unmatched else truth)
            # a bar per class with its name and score above it: a table's bar column hid the scores in a card's width
            with st.container() if show_topk else st.popover(f"Top-{len(row.topk)}", width="stretch"):
                for label, score in row.topk:
                    st.progress(score, text=f"{label} · {score:.1%}")
            st.caption(row.relative)
