"""Time to charts on the Analytics page for a 1,000,000-row run, in a real browser.

Starts the dashboard on a runs folder holding a synthetic 1,000,000-row run and a small one,
opens Analytics on the small run, then picks the big run from the run chooser and times until
its numbers and charts are on the page (the script has finished and every chart is drawn).
The first pick reads the Parquet parts (cold); later picks hit the per-run cache (warm). Then, without
the browser, what a live run's refresh costs once one more part has arrived: reading that part alone
and appending it (what the pages do) against reading every part again (what they did before). Usage:

    python bench/analytics_latency.py [--rows 1000000] [--repeats 5] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pages.widgets import LivePredictions  # noqa: E402
from pipeline import metrics, runs  # noqa: E402
from pipeline.synthetic import write_synthetic_run  # noqa: E402

CHARTS = 5  # label counts, confidence, confusion, reliability, coverage (all tabs are drawn)


def start_server(runs_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "DASHBOARD_RUNS_DIR": str(runs_dir), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(180):
        try:
            if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("streamlit did not start")


def pick(page, label: str, predicted: str) -> float:
    """Choose a run in the chooser; seconds until its KPI and all charts are on the page."""
    page.locator('[data-testid="stMain"] [data-testid="stSelectbox"] input').first.click()
    page.keyboard.type(label)
    option = page.get_by_role("option").filter(has_text=label).first
    option.wait_for(timeout=10_000)
    began = time.perf_counter()
    option.click()
    page.wait_for_function(
        """([predicted, charts]) => {
            const values = [...document.querySelectorAll('[data-testid="stMetricValue"]')].map(e => e.innerText.trim());
            const busy = document.querySelector('[data-testid="stStatusWidget"]');
            return values[0] === predicted && !busy && document.querySelectorAll('.js-plotly-plot .main-svg').length >= charts;
        }""",
        arg=[predicted, CHARTS],
        timeout=60_000,
        polling=20,
    )
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")  # painted
    return time.perf_counter() - began


def live_refresh(run: Path) -> tuple[float, float]:
    """Seconds to take in one new part: appended to what was read, and by reading every part again."""
    live = LivePredictions(run, [])
    live.current()
    parts = runs.prediction_parts(run)
    added = run / runs.PREDICTIONS / f"part-{len(parts):06d}.parquet"
    shutil.copy(parts[-1], added)  # one more part, as a live run writes them
    try:
        began = time.perf_counter()
        appended = live.current()
        incremental = time.perf_counter() - began
        began = time.perf_counter()
        everything = metrics.load(run)
        full = time.perf_counter() - began
    finally:
        added.unlink()
    assert len(appended) == len(everything)
    return incremental, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs-dir", default=None, help="reuse a folder with the runs already generated")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--screenshot", default=str(ROOT / "bench" / "results" / "analytics-1m.png"))
    args = parser.parse_args()

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="analytics-bench-"))
    big, small = f"synthetic-{args.rows}", "synthetic-small"
    if not (runs_dir / big).exists():
        began = time.perf_counter()
        write_synthetic_run(runs_dir, args.rows, big)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - began:.1f} s")
    if not (runs_dir / small).exists():
        write_synthetic_run(runs_dir, 1000, small, seed=1)

    from playwright.sync_api import sync_playwright

    server = start_server(runs_dir, args.port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://localhost:{args.port}/analytics?run={small}")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
            cold = pick(page, big, f"{args.rows:,}")
            warm = []
            for _ in range(args.repeats):
                pick(page, small, "1,000")
                warm.append(pick(page, big, f"{args.rows:,}"))
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.screenshot)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    incremental, full = live_refresh(runs_dir / big)
    cpu = f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    print(f"{cpu}; {args.rows:,}-row run; chart-ready times after picking it in the run chooser")
    print(f"cold (first read of the Parquet parts): {cold:.2f} s")
    print(f"warm (cached per run): median {statistics.median(warm):.2f} s, max {max(warm):.2f} s over {len(warm)}")
    print(f"live refresh after one more part: {incremental:.3f} s reading it alone and appending, {full:.2f} s reading every part")
    print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
