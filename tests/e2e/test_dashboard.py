"""The dashboard in a real browser: Streamlit started for real, Debian's Chromium driven by Playwright.

Screenshots go to tests/e2e/screenshots/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ..conftest import ROOT, SAMPLE, free_port, run_cli, small_input_program

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).parent / "screenshots"
EXCEPTION = '[data-testid="stException"]'


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dashboard-runs")


def start_server(runs_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DASHBOARD_RUNS_DIR": str(runs_dir), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail("streamlit did not answer /_stcore/health in 90 s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); scripts/setup.sh --dev installs it")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(runs_dir):
    process, url = start_server(runs_dir)
    yield url
    stop_server(process)


def open_page(browser, url: str, height: int = 1000):
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.goto(url)
    page.wait_for_selector("h1", timeout=60_000)
    wait_idle(page)
    return page


def wait_idle(page, timeout_s: float = 60) -> None:
    """Until Streamlit has finished running the script (no running indicator for a moment)."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.5:
            return
        time.sleep(0.25)


def assert_app_chrome(page) -> None:
    """The app's own navigation and shared settings, not Streamlit's folder-based fallback."""
    links = page.locator('[data-testid="stSidebarNavLink"]')
    labels = [links.nth(i).locator("span").last.inner_text().strip() for i in range(links.count())]
    assert labels == ["Home", "Preview", "Run", "Analytics", "Compare"]
    assert page.get_by_role("textbox", name="Dataset").count() == 1


def assert_no_exception(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    exceptions = page.locator(EXCEPTION)
    assert exceptions.count() == 0, exceptions.first.inner_text()


@pytest.mark.parametrize("path", ["", "preview", "run", "analytics", "compare"])
def test_every_page_loads_without_an_exception(browser, server, path):
    page = open_page(browser, f"{server}/{path}")
    assert page.locator("h1").count() >= 1
    assert_app_chrome(page)
    assert_no_exception(page, f"page-{path or 'home'}")
    page.close()


def test_preview_shows_images_with_labels(browser, server):
    page = open_page(browser, f"{server}/preview")
    page.wait_for_selector('[data-testid="stImage"] img', timeout=60_000)
    wait_idle(page)
    images = page.locator('[data-testid="stImage"] img')
    assert images.count() == 16
    assert images.first.evaluate("img => img.naturalWidth") > 50
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "16 images in" in text and "truth: tench" in text
    judged = re.search(r"· (\d+)/16 correct", text)
    assert judged and "among the dataset's" not in text
    page.get_by_text("Only the dataset's 10 classes").click()  # label-set-restricted: the sample's 10 folders
    page.get_by_text("correct among the dataset's 10 classes").wait_for(timeout=30_000)
    wait_idle(page)
    restricted = re.search(r"· (\d+)/16 correct among", page.locator('[data-testid="stMain"]').inner_text())
    assert restricted and int(restricted.group(1)) >= int(judged.group(1))  # a right answer stays right among fewer classes
    assert images.count() == 16  # the same sample
    page.get_by_text("Show every image's top classes").click()  # each card's top 5, named and scored, inline
    page.locator('[data-testid="stProgress"]').nth(79).wait_for(timeout=30_000)
    wait_idle(page)
    bars = page.locator('[data-testid="stMain"] [data-testid="stProgress"]')
    assert bars.count() == 80 and re.fullmatch(r".+ · \d+\.\d%", bars.first.inner_text().strip())
    assert_no_exception(page, "preview-grid")
    page.close()


def test_a_users_own_checkpoint_from_the_sidebar_previews(browser, server, tmp_path):
    checkpoint, labels = small_input_program(tmp_path, SAMPLE)  # a torch.export program of 32-px inputs
    page = open_page(browser, f"{server}/preview")
    page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="Model").click()
    page.keyboard.type("own checkpoint")  # the list is long: typing filters it
    page.get_by_role("option", name="your own checkpoint…").click()
    for name, value in (("Checkpoint file", checkpoint), ("Labels file", labels), ("Input", "crop=32")):
        box = page.get_by_role("textbox", name=name)
        box.fill(str(value))
        box.press("Enter")
        wait_idle(page)
    page.get_by_role("button", name="Classify sample").click()
    wait_idle(page)
    assert page.locator('[data-testid="stSidebar"] [data-testid="stAlert"]').count() == 0
    assert page.locator('[data-testid="stImage"] img').count() == 16
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "16 images in" in text
    answers = re.findall(r"^(?:check_circle|cancel) (\S+) · \d+%$", text, re.MULTILINE)  # mark, label, confidence
    assert len(answers) == 16 and set(answers) <= set(labels.read_text().split())  # its own labels: the sample's folders
    assert_no_exception(page, "preview-own-checkpoint")
    page.close()


def test_bad_dataset_uri_gives_a_one_line_error(browser, server):
    page = open_page(browser, f"{server}/preview")
    box = page.get_by_role("textbox", name="Dataset")
    box.fill("/no/such/folder")
    box.press("Enter")
    wait_idle(page)
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="dataset not found").first
    alert.wait_for(timeout=30_000)
    assert "/no/such/folder" in alert.inner_text() and len(alert.inner_text().strip().splitlines()) == 1
    assert_no_exception(page, "bad-uri")
    page.close()


def test_run_survives_closing_the_page_and_restarting_the_server(browser, runs_dir):
    process, url = start_server(runs_dir)
    page = open_page(browser, f"{url}/run")  # first visit of a fresh server, straight to /run
    assert_app_chrome(page)
    page.get_by_label("Limit (0 = all images)").fill("40")
    page.get_by_role("spinbutton", name="Top-k kept").fill("3")
    # On Ray: local worker processes would finish 40 images within seconds, before the server restarts.
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Engine").click()
    page.get_by_role("option", name="Ray Data", exact=True).click()
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Precision").click()
    page.get_by_role("option", name="bf16", exact=True).click()
    page.get_by_role("button", name="Start run").click()
    page.get_by_text("images (").first.wait_for(timeout=120_000)  # live progress bar text
    page.get_by_text("No runs in").wait_for(state="detached", timeout=30_000)  # the runs table picks it up
    page.screenshot(path=str(SHOTS / "run-live.png"), full_page=True)
    page.close()
    stop_server(process)  # the run is a process of its own: it keeps going

    process, url = start_server(runs_dir)
    try:
        page = open_page(browser, f"{url}/run")
        page.get_by_text("complete").first.wait_for(timeout=300_000)
        wait_idle(page)
        assert_no_exception(page, "run-complete")
        text = page.locator('[data-testid="stMain"]').inner_text()
        assert "40 / 40 images" in text and "CPU actor(s), bf16, batch 64, on Ray (local)" in text  # as asked
        run_ids = [p.name for p in runs_dir.iterdir() if (p / "manifest.json").is_file()]
        assert len(run_ids) == 1
        page.close()

        page = open_page(browser, f"{url}/analytics?run={run_ids[0]}", height=1600)
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        wait_idle(page)
        assert page.locator(".js-plotly-plot .main-svg").count() >= 5  # charts of every tab are drawn
        text = page.locator('[data-testid="stMain"]').inner_text()
        assert "Top-1" in text and "Label-set top-1" in text and "Labels: predicted vs ground truth" in text
        assert "Top-3" in text and "Top-5" not in text  # the run kept each image's top 3, as asked
        assert_no_exception(page, "analytics")
        for tab in ("Per class", "Confusion", "Calibration", "Examples"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(800)
            assert_no_exception(page, f"analytics-{tab.lower().replace(' ', '-')}")
        assert "Misclassified" in page.locator('[data-testid="stMain"]').inner_text()
        thumbnails = page.locator('[data-testid="stImage"] img:visible')
        assert thumbnails.count() >= 12 and thumbnails.first.evaluate("img => img.naturalWidth") > 50
        page.close()

        page = open_page(browser, f"{url}/run")  # done with it: delete the run
        wait_idle(page)
        page.get_by_text("Delete runs").click()
        page.wait_for_timeout(500)  # the expander opening
        page.locator('[data-testid="stMultiSelect"]').filter(has_text="Runs to delete").click()
        page.get_by_role("option", name=run_ids[0]).click()
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Delete", exact=True).click()
        page.get_by_text(f"Deleted 1 run(s): {run_ids[0]}").wait_for(timeout=30_000)
        page.get_by_text("No runs in").wait_for(timeout=30_000)
        assert not (runs_dir / run_ids[0]).exists() and not (runs_dir / ".launch" / f"{run_ids[0]}.log").exists()
        assert_no_exception(page, "run-deleted")
        page.close()
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, torch_home) -> Path:
    """The same 24 images through two real models: the embedded one and a (randomly initialised) resnet18."""
    out = tmp_path_factory.mktemp("compare-runs")
    for model in ("efficientnet_lite0", "resnet18"):
        result = run_cli("run", "--limit", "24", "--model", model, "--out", str(out), env={"TORCH_HOME": str(torch_home)})
        assert result.returncode == 0, result.stderr
    return out


def test_compare_view_and_the_exported_report(browser, two_runs, tmp_path):
    process, url = start_server(two_runs)
    try:
        page = open_page(browser, f"{url}/compare", height=2400)
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        wait_idle(page)
        text = page.locator('[data-testid="stMain"]').inner_text()
        assert "Images in common" in text and "Agreement" in text and "Per-class accuracy" in text
        common = page.locator('[data-testid="stMetric"]').filter(has_text="Images in common")
        assert common.locator('[data-testid="stMetricValue"]').inner_text().strip() == "24"
        assert page.locator(".js-plotly-plot .main-svg").count() >= 3
        thumbnails = page.locator('[data-testid="stImage"] img')
        assert thumbnails.count() >= 1 and thumbnails.first.evaluate("img => img.naturalWidth") > 50
        assert "A " in text and "B " in text  # each disagreement carries both predictions
        assert_no_exception(page, "compare")
        page.close()

        run_id = sorted(p.name for p in two_runs.iterdir() if "efficientnet" in p.name)[0]
        page = open_page(browser, f"{url}/analytics?run={run_id}")
        page.get_by_role("tab", name="Export").click()
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="Report (self-contained HTML)").click()
        report = tmp_path / "report.html"
        download.value.save_as(report)
        page.close()
    finally:
        stop_server(process)

    # the report on its own, from a file, with the dashboard gone
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(report.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert page.locator(".js-plotly-plot").count() == 5
    images = page.locator("figure img")
    assert images.count() >= 12 and images.first.evaluate("img => img.naturalWidth") > 50
    assert "Top-1 among the dataset" in page.inner_text("body")
    overflow = page.evaluate(  # each chart drawn within its column (the first was once drawn page-wide and cut off)
        "[...document.querySelectorAll('.js-plotly-plot')].map(p => p.querySelector('.main-svg').getBoundingClientRect().right"
        " - p.parentElement.getBoundingClientRect().right)"
    )
    assert len(overflow) == 5 and max(overflow) <= 1, overflow
    clipped = page.evaluate(  # every class name in full beside its bars (once cut to its last letters)
        "(() => { const plot = document.querySelector('.js-plotly-plot'), left = plot.getBoundingClientRect().left;"
        " return [...plot.querySelectorAll('.ytick text')].filter(t => t.getBoundingClientRect().left < left - 1)"
        ".map(t => t.textContent); })()"
    )
    assert clipped == [], clipped
    page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    page.close()
