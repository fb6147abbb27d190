"""A real Ray head, started with ``ray start --head`` on a free port, used through ``--address``."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline import runs

from .conftest import ROOT, cli_env, free_port, run_cli, small_input_program

RAY = Path(sys.executable).with_name("ray")
CLUSTER_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@contextlib.contextmanager
def ray_head_process():
    """``ray start --head --block`` on a free port; yields (address, process); stopped afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must stay under 107 bytes
    if not RAY.exists():
        pytest.skip(f"ray CLI not found next to {sys.executable}")
    port = free_port()
    # Token authentication, as `ray start --head` sets up by default; the token is this test's own.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **CLUSTER_AUTH}
    command = [
        str(RAY),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--block",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not head_is_up(address, env):
            if time.monotonic() > deadline:
                pytest.fail("ray head did not come up in 60 s")
            time.sleep(1)
        yield address, head
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def head_is_up(address: str, env: dict) -> bool:
    """`ray status` answers, and the head's raylet has started too: the GCS answers before it does."""
    status = subprocess.run([str(RAY), "status", f"--address={address}"], capture_output=True, env=env)
    return status.returncode == 0 and len(head_servers(address)) == 2


def stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    with ray_head_process() as (address, _):
        yield address


def head_servers(address: str) -> list[psutil.Process]:
    """The raylet and GCS server that ``ray start --head`` started for the head listening at ``address``."""
    option = f"--port={address.rpartition(':')[2]}"
    starters = [p for p in psutil.process_iter(["cmdline"]) if option in (p.info["cmdline"] or [])]
    return [child for p in starters for child in p.children(recursive=True) if child.name() in ("raylet", "gcs_server")]


def test_run_through_an_existing_cluster(ray_head, small_folder, tmp_path):
    servers = head_servers(ray_head)
    assert len(servers) == 2
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path), "--address", ray_head, cwd=tmp_path, env=CLUSTER_AUTH)
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9
    assert manifest["params"]["address"] == ray_head and ray_head in manifest["device"]
    assert all(server.is_running() for server in servers), "the CLI stopped the cluster it only joined"
    token = CLUSTER_AUTH["RAY_AUTH_TOKEN"]
    assert token not in result.stderr + result.stdout
    assert not [f for f in run_dir.rglob("*") if f.is_file() and token.encode() in f.read_bytes()]


# ``python -m pipeline`` whose driver deletes the user's checkpoint and labels files where it would ship them to
# the cluster: once it has put them in Ray's object store (SHIP=yes), or instead (a node without the files).
DELETE_AT_SHIPPING = """
import os, sys
from pipeline import runner
from pipeline.cli import main

shipping = runner.ship_checkpoint

def delete_at_shipping(options):
    shipped = shipping(options) if os.environ["SHIP"] == "yes" else options
    os.remove(options.info.spec.checkpoint)
    os.remove(options.info.spec.labels_file)
    return shipped

runner.ship_checkpoint = delete_at_shipping
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("ship", ["yes", "no"])
def test_a_users_own_checkpoint_travels_to_the_cluster_with_the_run(ray_head, small_folder, tmp_path, ship):
    checkpoint, labels = small_input_program(tmp_path, small_folder)  # a torch.export program of 32-px inputs
    classes = labels.read_text().split()
    args = ["run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--address", ray_head]
    args += ["--checkpoint", str(checkpoint), "--labels", str(labels), "--preprocess", "crop=32", "--engine", "ray"]
    result = subprocess.run(
        [sys.executable, "-c", DELETE_AT_SHIPPING, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env({**CLUSTER_AUTH, "SHIP": ship}),
        cwd=tmp_path,
    )
    assert not checkpoint.exists() and not labels.exists()
    assert "Traceback" not in result.stderr and "core_worker" not in result.stderr  # Ray's own logs stay out of it
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if ship == "yes":
        assert result.returncode == 0, result.stderr
        assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9 and manifest["counts"]["failed"] == 0
        assert ray_head in manifest["device"]
        assert set(runs.read_predictions(run_dir).column("label").to_pylist()) <= set(classes)
    else:  # every actor fails to load the network: the run fails in one line that says why
        message = f"a model actor could not start on Ray: FileNotFoundError: [Errno 2] No such file or directory: '{checkpoint}'"
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {message}"
        assert manifest["status"] == "failed" and manifest["reason"] == message


def test_the_cluster_command_reports_the_head_as_ray_sees_it(ray_head, tmp_path):
    result = run_cli("cluster", "--address", ray_head, cwd=tmp_path, env=CLUSTER_AUTH)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["address"], info["cpus"], info["gpus"], info["node_cpus"]) == (ray_head, 2.0, 0.0, 2.0)


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


def test_without_ray_installed_the_local_engine_runs_and_ray_is_a_one_line_error(small_folder, tmp_path):
    """The GPU machines lent here have no Ray: ``--engine local`` must not need it, and asking for Ray
    there says what to do. A ``ray`` package that fails to import stands in for the missing one."""
    shadow = tmp_path / "without-ray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), str(ROOT), os.environ.get("PYTHONPATH")]))}
    local_run = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--engine", "local", env=env)
    assert local_run.returncode == 0 and "complete: 9 predicted" in local_run.stderr, local_run.stderr
    ray_run = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--engine", "ray", env=env)
    assert ray_run.returncode == 2 and "Traceback" not in ray_run.stderr
    assert ray_run.stderr.strip().splitlines()[-1].startswith("error: Ray Data is not installed here")


def test_a_cluster_that_goes_away_ends_the_run_resumably(tmp_path):
    from pipeline import runs

    from .test_robustness import assert_exactly_once, start_cli_run, wait_for_progress

    with ray_head_process() as (address, head):
        run = start_cli_run(tmp_path / "runs", "--address", address, env=CLUSTER_AUTH)
        path = wait_for_progress(tmp_path / "runs", 8)
        os.killpg(head.pid, signal.SIGKILL)  # the whole head node dies at once
        try:
            run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    assert run.returncode != 0
    manifest = runs.read_manifest(path)
    assert manifest.status in ("failed", "interrupted") and manifest.reason, manifest
    assert 0 < manifest.counts.done < 200
    result = run_cli("resume", str(path), "--address", "local", timeout=480)
    assert result.returncode == 0, result.stderr
    assert_exactly_once(path)


def test_the_run_page_on_a_cluster_offers_ray_data_only(ray_head, tmp_path, monkeypatch):
    """Local worker processes cannot run on a cluster: the Run page does not offer them there, and its auto says Ray."""
    from streamlit.testing.v1 import AppTest

    for name, value in {**CLUSTER_AUTH, "DASHBOARD_RUNS_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/run.py").run()
    assert next(s for s in at.selectbox if s.label == "Engine").options[0].startswith("auto: local processes")  # this machine
    at.sidebar.text_input(key="setting_address").set_value(ray_head).run()
    engine = next(s for s in at.selectbox if s.label == "Engine")
    assert engine.options == ["auto: Ray Data, on the cluster", "Ray Data"] and engine.value == "auto"
    assert engine.help == "On a cluster, Ray Data's actors run the model on its nodes."
    assert any(f"Ray cluster at {ray_head}: 2 CPUs" in caption.value for caption in at.caption)
    assert not at.exception and not at.error
