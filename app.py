"""Dashboard entry point: ``streamlit run app.py``. Pages are thin views over ``pipeline``."""

import streamlit as st

from pages import widgets

st.set_page_config(page_title="Batch image classification", page_icon="🖼️", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/home.py", title="Home", icon=":material/home:", url_path="", default=True),
        st.Page("pages/preview.py", title="Preview", icon=":material/photo_library:", url_path="preview"),
        st.Page("pages/run.py", title="Run", icon=":material/play_circle:", url_path="run"),
        st.Page("pages/analytics.py", title="Analytics", icon=":material/insights:", url_path="analytics"),
        st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    ]
)
widgets.sidebar_settings()
navigation.run()
