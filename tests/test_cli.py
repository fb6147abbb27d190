"""The CLI as a user runs it: a fresh process each time, exit codes and what it prints."""

import json
import os
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from pipeline import metrics, runs

from .conftest import ROOT, add_kittens, cli_env, run_cli, small_input_program


def ray_servers() -> set[int]:
    """PIDs of Ray's raylets and GCS servers running now, whoever started them."""
    found = set()
    for process in psutil.process_iter(["pid", "name"]):
        if process.info["name"] in ("raylet", "gcs_server"):
            found.add(process.info["pid"])
    return found


def test_run_prints_progress_and_the_run_folder_last(small_folder, tmp_path):
    before = ray_servers()
    add_kittens(small_folder)
    result = run_cli("run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--batch-size", "4", "--topk", "3")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "manifest.json").is_file()
    assert "10/10" in result.stderr and "img/s" in result.stderr and "ETA" in result.stderr
    assert "top-3 " in result.stderr and "top-5" not in result.stderr  # the run's own k
    assert "note: 1 image has a ground truth that is not a class of this model (kittens)" in result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 10
    assert manifest["unmatched_truth"] == {"images": 1, "classes": 1, "names": ["kittens"]}
    assert ray_servers() <= before, "the CLI's local Ray outlived it"
    listed = run_cli("runs", "--out", str(tmp_path / "runs")).stdout.splitlines()[1].split()
    assert listed[0] == run_dir.name and listed[5] == manifest["engine"] == "local"  # a small run on this machine's CPUs
    assert listed[6] == manifest["precision"] == "fp32"  # auto, on CPUs


@pytest.mark.parametrize(("engine", "worker_title"), [("ray", "ray::MapWorker"), ("local", "-c from multiprocessing.forkserver import")])
def test_no_process_of_the_clis_workers_outlives_it(small_folder, tmp_path, engine, worker_title):
    """Its workers (a local Ray's, or its own processes) are killed, not left tearing down torch on
    the CPUs after the command returned."""
    command = [sys.executable, "-m", "pipeline", "run", "--data", str(small_folder), "--out", str(tmp_path / "runs"), "--engine", engine]
    cli = psutil.Popen(command, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    descendants: dict[int, psutil.Process] = {}
    titles: dict[int, str] = {}  # Ray renames a worker once it holds an actor: keep the latest
    while cli.poll() is None:
        with suppress(psutil.Error):  # a process may end between two calls: the next look gets the rest
            for process in cli.children(recursive=True):
                descendants.setdefault(process.pid, process)
                titles[process.pid] = " ".join(process.cmdline())
        time.sleep(0.05)
    assert cli.returncode == 0
    assert any(worker_title in title for title in titles.values())  # the model's workers were seen
    time.sleep(0.3)  # a killed process may take a moment to leave the kernel

    def running(process: psutil.Process) -> bool:
        with suppress(psutil.Error):
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        return False

    assert not [titles.get(pid, pid) for pid, process in descendants.items() if running(process)]


def test_preview_prints_a_table_with_top5(small_folder):
    add_kittens(small_folder)
    result = run_cli("preview", "--data", str(small_folder), "-n", "10", "--seed", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["path", "ground", "truth"] and len(lines) == 11
    assert all(line.count("(") >= 5 for line in lines[1:])  # five labels with scores each
    assert "note: 1 image has a ground truth that is not a class of this model (kittens)" in result.stderr
    positional = run_cli("preview", str(small_folder), "-n", "10", "--seed", "1")  # `preview DATA`, as `--data DATA`
    assert positional.returncode == 0 and positional.stdout == result.stdout, positional.stderr


def test_preview_answers_among_the_datasets_classes_when_asked(small_folder, tmp_path):
    restricted = run_cli("preview", str(small_folder), "-n", "9", "--dataset-classes")
    assert restricted.returncode == 0, restricted.stderr
    lines = restricted.stdout.strip().splitlines()
    assert lines[0].endswith("top-3 among the dataset's 3 classes") and len(lines) == 10
    classes = {"tench", "English springer", "cassette player"}
    for line in lines[1:]:
        answers = line.split("  ")[-1].lstrip("✓✗ ").split(", ")
        assert {answer.rsplit(" (", 1)[0] for answer in answers} == classes
    one_class = tmp_path / "one"
    (one_class / "n01440764").mkdir(parents=True)
    for image in list((small_folder / "n01440764").iterdir())[:2]:
        (one_class / "n01440764" / image.name).write_bytes(image.read_bytes())
    unrestricted = run_cli("preview", str(one_class), "--dataset-classes")
    assert unrestricted.returncode == 0 and unrestricted.stdout.splitlines()[0].endswith("top-5"), unrestricted.stderr
    assert "note: the dataset's folders name no subset of the model's classes" in unrestricted.stderr


def test_models_lists_the_embedded_default_as_offline():
    result = run_cli("models")
    assert result.returncode == 0
    first = result.stdout.splitlines()[1].split()
    assert first[0] == "efficientnet_lite0" and "yes" in first
    assert any(line.startswith("resnet152 ") for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--data", "/no/such/folder"], "dataset not found"),
        (["run", "/no/such/folder"], "dataset not found"),
        (["run", "/a", "--data", "/b"], "two datasets given: /a and --data /b"),
        (["run", "--model", "resnet9000"], "unknown model"),
        (["run", "--batch-size", "0"], "positive integer"),
        (["run", "--batch-size", "-3"], "positive integer"),
        (["run", "--concurrency", "abc"], "whole number"),
        (["preview", "--data", "s3://"], "no bucket"),
        (["frobnicate"], "invalid choice"),
        (["resume", "/no/such/run"], "not a run folder"),
        (["run", "--concurrency", "64"], "CPUs this run can use"),
        (["run", "--engine", "warp"], "invalid choice"),
        (["run", "--topk", "30"], "top-k must be between 1 and 20"),
        (["run", "--engine", "local", "--address", "10.0.0.5:6379"], "--engine local runs on this machine"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_empty_folder_exits_2(tmp_path):
    result = run_cli("run", "--data", str(tmp_path), "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and "is empty" in result.stderr


def test_synthesize_report_and_compare(tmp_path):
    made = [
        run_cli("synthesize", "--rows", "3000", "--out", str(tmp_path), "--run-id", name, "--seed", seed)
        for name, seed in (("a", "0"), ("b", "1"))
    ]
    assert all(result.returncode == 0 for result in made), made[0].stderr
    a, b = (Path(result.stdout.strip().splitlines()[-1]) for result in made)
    report = run_cli("report", str(a), "-o", str(tmp_path / "a.html"))
    assert report.returncode == 0 and report.stdout.strip() == str(tmp_path / "a.html")
    assert "Plotly.newPlot" in (tmp_path / "a.html").read_text()
    compared = run_cli("compare", str(a), str(b))
    assert compared.returncode == 0, compared.stderr
    assert "images in common: 3,000" in compared.stdout and "agreement:" in compared.stdout
    comparison = metrics.compare(metrics.load(a), metrics.load(b))
    first = comparison.disagreement_pairs(1).iloc[0]
    lines = compared.stdout.splitlines()
    after = lines.index("most frequent disagreements, A's label → B's:") + 1
    assert lines[after].split() == [f"{first['count']:,}", *first["label_a"].split(), "→", *first["label_b"].split()]
    assert "largest changes in per-class recall, A → B:" in lines
    itself = run_cli("compare", str(a), str(a))
    assert itself.returncode == 0 and "(0 labelled differently)" in itself.stdout and "disagreements" not in itself.stdout


def test_only_a_pipe_without_its_reader_counts_as_cut_short(tmp_path):
    """Another broken pipe (a worker's) stays an internal error: only stdout's lost reader ends quietly."""
    from pipeline.cli import _reader_gone

    read, write = os.pipe()
    with open(write, "w") as pipe, open(tmp_path / "out.txt", "w") as file:
        assert not _reader_gone(pipe) and not _reader_gone(file)
        os.close(read)
        assert _reader_gone(pipe)


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_output_cut_short_by_its_reader_ends_quietly(unbuffered):
    """`python -m pipeline models | head -1`: the pipe closes before the listing is written, line by line
    (PYTHONUNBUFFERED) or, as in a user's shell, all at once when the command ends."""
    env = {name: value for name, value in cli_env().items() if name != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT
    )
    process.stdout.close()
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 141 and stderr == b"", stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "/nonexistent/run"], "is not a run folder"),
        (["compare", "/nonexistent/a", "/nonexistent/b"], "is not a run folder"),
        (["synthesize", "--rows", "0"], "must be a positive integer"),
    ],
)
def test_analytics_commands_reject_bad_input_in_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_exported_program_runs_alike_in_local_workers_and_on_ray(small_folder, tmp_path):
    """A user's own torch.export program (.pt2) and labels file, through each engine's own processes:
    batches of 4 and a last one of 1, every image predicted with one of its labels, alike in both."""
    import pyarrow.parquet as pq
    import torch
    import torchvision

    classes = sorted(folder.name for folder in small_folder.iterdir())
    (tmp_path / "labels.txt").write_text("\n".join(classes) + "\n")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(classes)).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 224, 224),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "mine.pt2")
    labels = {}
    for engine in ("local", "ray"):
        result = run_cli(
            "run", "--data", str(small_folder), "--out", str(tmp_path / engine), "--engine", engine, "--batch-size", "4",
            "--checkpoint", str(tmp_path / "mine.pt2"), "--labels", str(tmp_path / "labels.txt"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        run_dir = Path(result.stdout.strip().splitlines()[-1])
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9, manifest
        assert manifest["model"]["display_name"] == "custom:mine.pt2"
        predictions = pq.read_table(run_dir / "predictions", columns=["path", "label"]).to_pylist()
        labels[engine] = {Path(row["path"]).name: row["label"] for row in predictions}
    assert len(labels["local"]) == 9 and set(labels["local"].values()) <= set(classes)
    assert labels["ray"] == labels["local"]


def test_a_custom_program_of_its_own_input_size_is_refused_at_224_and_runs_with_preprocess(small_folder, tmp_path):
    checkpoint, labels = small_input_program(tmp_path, small_folder)
    common = ("--data", str(small_folder), "--out", str(tmp_path / "runs"), "--checkpoint", str(checkpoint), "--labels", str(labels))
    refused = run_cli("run", *common)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
    assert refused.stderr.startswith(f"error: checkpoint {checkpoint} cannot classify a batch of 1 image(s) of 3 × 224 × 224: ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/manifest.json"))
    ran = run_cli("run", *common, "--preprocess", "crop=32")
    assert ran.returncode == 0, ran.stderr
    manifest = json.loads((Path(ran.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["predicted"] == 9 and manifest["counts"]["failed"] == 0
    assert manifest["model"]["preprocess"] == "crop=32"


def test_a_checkpoint_that_is_no_program_is_one_line(small_folder, tmp_path):
    """torch.export logs a stack trace for a file it cannot read before raising: the user sees one line."""
    checkpoint, labels = small_input_program(tmp_path, small_folder)
    checkpoint.write_bytes(b"not a program\n")
    result = run_cli("run", "--data", str(small_folder), "--checkpoint", str(checkpoint), "--labels", str(labels), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot load checkpoint {checkpoint} (a .pt2 file is read as a torch.export program, any other as TorchScript): "
        "File is not a zip file"
    ]


def test_runs_lists_every_run_as_an_aligned_table(tmp_path):
    for rows, run_id in ((40, "20260101-000000-small"), (12_000, "20260101-000001-big")):
        assert run_cli("synthesize", "--rows", str(rows), "--out", str(tmp_path), "--run-id", run_id).returncode == 0
    result = run_cli("runs", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["run", "status", "images", "top-1", "img/s", "engine", "precision", "model", "dataset", "folder"]
    assert len(lines) == 2
    assert all(line.split()[5:7] == ["-", "-"] for line in lines)  # synthesized: no engine ran them
    assert {line.split()[0] for line in lines} == {"20260101-000000-small", "20260101-000001-big"}
    assert any("12,000/12,000" in line for line in lines)
    for line in lines:  # which dataset each run classified
        assert json.loads((tmp_path / line.split()[0] / "manifest.json").read_text())["dataset"] in line
    end = header.index("images") + len("images")  # numbers end under their heading
    assert all(line[end - len(line.split()[2]) : end] == line.split()[2] for line in lines)


def test_delete_removes_every_run_named_or_none_of_them(tmp_path):
    names = ["20260101-000000-a", "20260101-000001-b", "20260101-000002-c"]
    for run_id in names:
        assert run_cli("synthesize", "--rows", "10", "--out", str(tmp_path), "--run-id", run_id).returncode == 0
    running = runs.read_manifest(tmp_path / names[2])
    running.status = "running"
    running.claim()  # owned by this test's (live) process
    runs.write_manifest(tmp_path / names[2], running)
    result = run_cli("delete", str(tmp_path / names[0]), str(tmp_path / names[2]))
    assert result.returncode == 2 and f"run {names[2]} is still running: cancel it first (nothing deleted)" in result.stderr
    assert (tmp_path / names[0] / "manifest.json").is_file()
    result = run_cli("delete", str(tmp_path / names[0]), str(tmp_path / names[1]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"deleted {name} ({tmp_path / name})" for name in names[:2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[2]]
    result = run_cli("delete", str(tmp_path))
    assert result.returncode == 2 and "is not a run folder" in result.stderr and (tmp_path / names[2]).is_dir()
