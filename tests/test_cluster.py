"""A real Ray head, started with ``ray start --head`` on a free port, used through ``--address``."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import free_port, run_cli

RAY = Path(sys.executable).with_name("ray")
CLUSTER_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    if not RAY.exists():
        pytest.skip(f"ray CLI not found next to {sys.executable}")
    port = free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # Token authentication, as `ray start --head` sets up by default; the token is this test's own.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **CLUSTER_AUTH}
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--block",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = subprocess.run([str(RAY), "status", f"--address={address}"], capture_output=True, text=True, env=env)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("ray head did not come up in 60 s")
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_through_an_existing_cluster(ray_head, small_folder, tmp_path):
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path), "--address", ray_head, cwd=tmp_path, env=CLUSTER_AUTH)
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9
    assert manifest["params"]["address"] == ray_head and ray_head in manifest["device"]
    token = CLUSTER_AUTH["RAY_AUTH_TOKEN"]
    assert token not in result.stderr + result.stdout
    assert not [f for f in run_dir.rglob("*") if f.is_file() and token.encode() in f.read_bytes()]


def test_missing_token_is_a_one_line_error(ray_head, small_folder, tmp_path):
    result = run_cli(
        "run",
        "--data",
        str(small_folder),
        "--out",
        str(tmp_path),
        "--address",
        ray_head,
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0], result.stderr


def test_unreachable_cluster_is_a_one_line_error(small_folder, tmp_path):
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path), "--address", f"127.0.0.1:{free_port()}", timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot connect to the Ray cluster") and "Traceback" not in result.stderr
