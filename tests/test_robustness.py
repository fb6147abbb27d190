"""Dirty inputs and faults: every file accounted for, nothing lost, nothing twice."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline import runs
from pipeline.runner import RunRequest, run

from .conftest import ROOT, SAMPLE, cli_env, run_cli


def photo(size=(640, 480)) -> Image.Image:
    return Image.open(sorted((SAMPLE / "n01440764").iterdir())[0]).convert("RGB").resize(size)


def save(path: Path, image: Image.Image, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)


def build_nasty_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """Valid-but-odd files that must be predicted, and broken ones that must be reported (with a reason fragment)."""
    good = root / "good"
    save(good / "cmyk.jpg", photo().convert("CMYK"), "JPEG")
    save(good / "progressive.jpg", photo(), "JPEG", progressive=True)
    save(good / "gray.jpg", photo().convert("L"), "JPEG")
    save(good / "sixteen.png", Image.fromarray(np.asarray(photo().convert("L")).astype(np.uint16) * 257), "PNG")
    save(good / "rgba.png", photo().convert("RGBA"), "PNG")
    save(good / "palette.gif", photo().convert("P"), "GIF")
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save(good / "animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    save(good / "photo.webp", photo(), "WEBP")
    save(good / "photo.tiff", photo(), "TIFF")
    save(good / "photo.bmp", photo(), "BMP")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(good / "rotated.jpg", photo(), "JPEG", exif=exif)
    save(good / "huge.jpg", photo((6000, 4500)), "JPEG", quality=70)
    save(good / "tiny.png", photo((8, 8)), "PNG")
    save(good / "name with spaces (1).jpg", photo(), "JPEG")
    save(good / "a" / "b" / "c" / "d" / "e" / "deep.jpg", photo(), "JPEG")
    save(good / "UPPER.JPEG", photo(), "JPEG")
    save(good / "Upper.PNG", photo(), "PNG")

    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    photo().save(buffer, "JPEG")
    (bad / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (bad / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (bad / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    Image.new("1", (20_000, 20_000)).save(bad / "bomb.png")  # 400 Mpx: over twice Pillow's limit
    (root / "notes.txt").write_text("not an image")
    expected_bad = {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "page.jpg": "not a recognised image",
        "noise.png": "not a recognised image",
        "bomb.png": "decompression bomb",
    }
    good_files = {str(p) for p in good.rglob("*") if p.is_file()}
    return good_files, {str(bad / name): reason for name, reason in expected_bad.items()}


def test_nasty_files_are_predicted_or_reported_and_counted(tmp_path):
    good, bad = build_nasty_folder(tmp_path / "data")
    path, manifest = run(RunRequest(data=str(tmp_path / "data"), out=str(tmp_path / "runs"), batch_size=8))
    predicted = runs.read_predictions(path).to_pylist()
    errors = {row["path"]: row["error"] for row in runs.read_errors(path).to_pylist()}
    assert {row["path"] for row in predicted} == good
    assert set(errors) == set(bad)
    for file, reason in bad.items():
        assert reason in errors[file], (file, errors[file])
    assert manifest.status == "complete"
    counts = manifest.counts
    assert (counts.inputs, counts.predicted, counts.failed, counts.skipped) == (len(good) + len(bad), len(good), len(bad), 1)
    assert counts.inputs == counts.predicted + counts.failed


def wait_for_progress(run_root: Path, at_least: int, timeout_s: float = 240) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for manifest_file in run_root.glob("*/manifest.json"):
            try:
                if json.loads(manifest_file.read_text())["counts"]["predicted"] >= at_least:
                    return manifest_file.parent
            except (ValueError, KeyError):
                pass
        time.sleep(0.2)
    pytest.fail(f"no run in {run_root} reached {at_least} predictions in {timeout_s} s")


def start_cli_run(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The CLI as started from a terminal: its own process group, and Ctrl-C not ignored (a shell
    without job control, as CI's may be, starts background commands with SIGINT ignored)."""
    command = [sys.executable, "-m", "pipeline", "run", "--out", str(out), "--batch-size", "8", *extra]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def assert_exactly_once(path: Path) -> None:
    predicted = runs.read_predictions(path).column("path").to_pylist()
    failed = runs.read_errors(path).column("path").to_pylist()
    done = predicted + failed
    assert len(done) == len(set(done)) == 200
    manifest = runs.read_manifest(path)
    assert manifest.counts.predicted == len(predicted) and manifest.counts.done == manifest.counts.inputs == 200


@pytest.mark.parametrize(("engine", "worker_title"), [("ray", "ray::MapWorker"), ("local", "multiprocessing.forkserver import main")])
def test_a_killed_worker_loses_nothing(tmp_path, engine, worker_title):
    process = start_cli_run(tmp_path, "--engine", engine)
    try:
        wait_for_progress(tmp_path, 8)
        workers = [p for p in psutil.Process(process.pid).children(recursive=True) if worker_title in " ".join(p.cmdline())]
        assert workers, "no model worker process found to kill"
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=480)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    assert_exactly_once(Path(stdout.strip().splitlines()[-1]))


def test_ctrl_c_cancels_a_local_run_at_once_and_leaves_no_process(tmp_path):
    """As a terminal's Ctrl-C does: SIGINT to the whole process group (driver, fork server, workers).
    One worker on batches of one image, so that the run is still going (as below)."""
    process = start_cli_run(tmp_path, "--engine", "local", "--concurrency", "1", "--batch-size", "1")
    try:
        path = wait_for_progress(tmp_path, 8)
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("multiprocessing.forkserver" in " ".join(child.cmdline()) for child in children)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "interrupted from the keyboard" in stderr and "Traceback" not in stderr
    time.sleep(0.5)
    assert not [child for child in children if _running(child)]
    manifest = runs.read_manifest(path)
    assert manifest.status == "cancelled" and manifest.counts.predicted == len(runs.read_predictions(path)) < 200


def test_a_cli_run_cancelled_from_the_dashboard_exits_130_with_its_predictions_kept(tmp_path):
    """The dashboard's Cancel writes the run's cancel request; the CLI that runs it stops as after Ctrl-C."""
    process = start_cli_run(tmp_path, "--engine", "local", "--concurrency", "1", "--batch-size", "1")
    try:
        path = wait_for_progress(tmp_path, 8)
        runs.request_cancel(path)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "cancelled by the user" in stderr and "Traceback" not in stderr
    assert Path(stdout.strip().splitlines()[-1]) == path
    manifest = runs.read_manifest(path)
    assert manifest.status == "cancelled" and manifest.counts.predicted == len(runs.read_predictions(path)) < 200


# Locally, one worker on batches of one image: at full speed the 200 images are done about a second
# after the first predictions are written, too soon to kill the driver mid-run.
@pytest.mark.parametrize(
    "engine", [("--engine", "ray"), ("--engine", "local", "--concurrency", "1", "--batch-size", "1")], ids=["ray", "local"]
)
def test_a_killed_driver_reads_as_interrupted_and_resumes_without_duplicates(tmp_path, engine):
    process = start_cli_run(tmp_path, *engine)
    try:
        path = wait_for_progress(tmp_path, 16)
        workers = psutil.Process(process.pid).children(recursive=True)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    time.sleep(1)
    if "local" in engine:  # its workers die with it
        assert not [worker for worker in workers if _running(worker)]
    elif _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)  # what is left of the dead driver's local Ray
    manifest = runs.read_manifest(path)
    assert manifest.status == "interrupted" and 0 < manifest.counts.done < 200
    result = run_cli("resume", str(path), timeout=480)
    assert result.returncode == 0, result.stderr
    assert_exactly_once(path)
    assert runs.read_manifest(path).resumed == 1


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {result.stderr.strip() or result.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_run_with_the_reason(tiny_disk):
    out = tiny_disk / "runs"
    out.mkdir()
    stats = os.statvfs(tiny_disk)
    room = 20 * 1024  # enough for the manifest and the input list, not for predictions
    (tiny_disk / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - room))
    result = run_cli("run", "--out", str(out), "--batch-size", "8", timeout=480)
    assert result.returncode == 1, result.stderr
    manifest = runs.read_manifest(next(out.iterdir()))
    assert manifest.status == "failed" and "No space left" in manifest.reason
    assert "Traceback" not in result.stderr
