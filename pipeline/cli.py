"""``python -m pipeline``: the same functions the dashboard uses, from a terminal.

Exit codes: 0 success (also when some images failed; they are in errors.parquet), 2 bad
arguments or inputs (one line on stderr), 130 a run cancelled (Ctrl-C, or Cancel on the dashboard:
what it predicted is kept, and ``resume`` finishes it), 1 a failed run or an internal failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from .errors import DEBUG_ENV, UserError, one_line
from .models import DEFAULT_MODEL, describe, parse_model, registry
from .runner import LOCAL_MAX_IMAGES, MAX_TOPK
from .runs import ENGINES, delete_run, format_duration, list_runs, read_manifest
from .sources import SAMPLE_DATA, list_images, open_source

ENGINE_HELP = (
    "what runs the model: ray (Ray Data), local (worker processes on this machine, its CPUs or GPUs, no Ray start-up), "
    f"or auto (default: local on this machine's GPUs, or for up to {LOCAL_MAX_IMAGES:,} images on its CPUs; else ray)"
)


# A run's status → the command's exit code: 130 is what a shell reports for a command its user interrupted
EXIT_CODES = {"complete": 0, "cancelled": 130}


class ArgumentError(UserError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every bad input is one line."""

    def error(self, message: str):
        raise ArgumentError(f"{message} (see --help)")


def _number(kind: type, what: str, minimum: float, bound: str):
    """An argparse type: ``kind`` parsed from text, at least ``minimum``, with one-line messages."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value:g}")
        return value

    return parse


positive_int = _number(int, "a whole number", 1, "a positive integer")
non_negative_float = _number(float, "a number", 0, "≥ 0")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    where = "folder, s3://bucket/prefix or gs://bucket/prefix (default: the embedded Imagenette sample)"
    parser.add_argument("data_path", nargs="?", metavar="DATA", help=where)
    parser.add_argument("--data", default=None, help="the same, as an option")
    parser.add_argument(
        "--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, torchvision model[:WEIGHTS] (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--checkpoint", help="your own model: a TorchScript file, a torch.export program (.pt2), or a state dict with --arch"
    )
    parser.add_argument("--arch", help="torchvision architecture of a state-dict --checkpoint")
    parser.add_argument("--labels", help="class names of a --checkpoint, one per line")
    parser.add_argument(
        "--preprocess",
        metavar="KEY=VALUE,...",
        help="a --checkpoint's input: crop=299 (an image's shorter side resized to 342 first, ImageNet's ratio), "
        "resize=, mean=0.5/0.5/0.5, std=, interpolation=bilinear|bicubic (default: resize 256, crop 224, ImageNet's mean "
        "and std, bilinear; with --arch, its weights')",
    )


def build_parser() -> Parser:
    parser = Parser(prog="python -m pipeline", description="Batch image classification on Ray Data.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = commands.add_parser("run", help="classify a whole dataset into a run folder")
    _add_source_options(run)
    _add_model_options(run)
    run.add_argument("--out", default="runs", help="runs folder (default: runs/)")
    run.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per batch sent to a model actor (default: 64 on CPU, 512 on GPU)"
    )
    run.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="model actors, at most one per batch (default: two per GPU, or one 1-thread actor per CPU, up to 8)",
    )
    run.add_argument(
        "--num-gpus",
        type=non_negative_float,
        default=None,
        help="GPUs per actor (default with GPUs: 0.5, or the GPUs shared by --concurrency actors; else 0)",
    )
    run.add_argument("--limit", type=positive_int, default=None, help="classify a reproducible random sample of N images")
    run.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else this machine: see --engine)")
    run.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto (default): bf16 autocast on GPUs where the model's top-1 holds, fp32 on CPUs",
    )
    run.add_argument("--engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    run.add_argument(
        "--topk",
        type=positive_int,
        default=5,
        help=f"classes kept per image, best first, 1-{MAX_TOPK} (default 5); top-k accuracy counts them",
    )
    run.add_argument("--run-id", default=None, help=argparse.SUPPRESS)

    resume = commands.add_parser("resume", help="finish an interrupted, failed or cancelled run")
    resume.add_argument("run_dir")
    resume.add_argument("--address", default=None, help="continue on another Ray cluster (`local` for this machine)")
    resume.add_argument("--engine", choices=ENGINES, default=None, help="override the run's engine (see run --help)")

    preview = commands.add_parser("preview", help="classify a few sample images and print a table")
    _add_source_options(preview)
    _add_model_options(preview)
    preview.add_argument("-n", type=positive_int, default=10, help="how many images (default 10)")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument(
        "--dataset-classes",
        action="store_true",
        help="answer only with the classes the dataset's folders name, where they are a few of the model's "
        "(Imagenette: 10 of 1,000): label-set-restricted, as Analytics offers for a run",
    )

    commands.add_parser("models", help="list models and whether their weights are available offline")

    cluster = commands.add_parser("cluster", help="connect to the Ray cluster and print its CPUs and GPUs as JSON")
    cluster.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    runs = commands.add_parser("runs", help="list the runs in a runs folder")
    runs.add_argument("--out", default="runs")

    delete = commands.add_parser("delete", help="delete runs: their predictions, errors, inputs and manifests")
    delete.add_argument("run_dirs", nargs="+", metavar="run_dir")

    report = commands.add_parser("report", help="write a run's analytics as one self-contained HTML file")
    report.add_argument("run_dir")
    report.add_argument("-o", "--output", default=None, help="file to write (default: RUN_DIR/report.html)")

    compare = commands.add_parser("compare", help="compare two runs over the same images")
    compare.add_argument("run_a")
    compare.add_argument("run_b")

    synthesize = commands.add_parser("synthesize", help="write a synthetic run of N rows (scale tests, demos)")
    synthesize.add_argument("--rows", type=positive_int, required=True)
    synthesize.add_argument("--out", default="runs")
    synthesize.add_argument("--classes", type=positive_int, default=10, help="ground-truth classes (default 10, Imagenette's)")
    synthesize.add_argument("--run-id", default=None)
    synthesize.add_argument("--seed", type=int, default=0)
    return parser


class ProgressPrinter:
    """A bar on a terminal, a line every few seconds otherwise; always on stderr."""

    def __init__(self, stream=sys.stderr, interval_s: float = 5.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.last = 0.0
        self.finished_shown = False

    def __call__(self, progress) -> None:
        now = time.monotonic()
        counts = progress.counts
        finished = counts.done >= counts.inputs
        if self.finished_shown or (now - self.last < self.interval_s and not finished):
            return
        self.last, self.finished_shown = now, finished
        rate = f"{progress.rate:6.1f} img/s" if progress.rate else "  starting"
        eta = f"ETA {format_duration(progress.eta_s)}" if progress.eta_s is not None else "ETA --"
        text = f"{counts.done}/{counts.inputs} {rate} {eta} elapsed {format_duration(progress.elapsed_s)}"
        if counts.failed:
            text += f" ({counts.failed} failed)"
        if self.tty:
            width = 30
            filled = int(width * counts.done / counts.inputs) if counts.inputs else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            if finished:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _model_spec(args):
    return parse_model(args.model, checkpoint=args.checkpoint, arch=args.arch, labels_file=args.labels, preprocess=args.preprocess)


def cmd_run(args) -> int:
    from .runner import RunRequest, run

    out = _result_stream()
    request = RunRequest(
        data=args.data,
        model=_model_spec(args),
        out=args.out,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        limit=args.limit,
        address=args.address,
        s3_endpoint=args.s3_endpoint,
        run_id=args.run_id,
        topk=args.topk,
        precision=args.precision,
        engine=args.engine,
    )
    path, manifest = run(request, ProgressPrinter())
    return _report(path, manifest, out)


def cmd_resume(args) -> int:
    from .runner import resume

    out = _result_stream()
    path = Path(args.run_dir)
    manifest = resume(path, ProgressPrinter(), args.address, args.engine)
    return _report(path, manifest, out)


def _result_stream():
    """Keep stdout for the result line alone: Ray prints raylet and worker notices on file descriptor 1
    (even at exit), so from here on fd 1 points at stderr and the result goes to a copy of the real stdout."""
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return result


def _report(path: Path, manifest, out) -> int:
    counts = manifest.counts
    summary = f"{manifest.status}: {counts.predicted} predicted, {counts.failed} failed, {counts.skipped} skipped"
    if manifest.accuracy.top1 is not None:
        summary += f"; top-1 {manifest.accuracy.top1:.1%}, top-{manifest.params.topk} {manifest.accuracy.top5:.1%}"
        if manifest.label_set:
            summary += f", top-1 among the dataset's {len(manifest.label_set)} classes {manifest.accuracy.label_set_top1:.1%}"
    if manifest.images_per_s:
        summary += f"; {manifest.images_per_s:.1f} img/s"
    if manifest.reason and manifest.status != "complete":
        summary += f" ({manifest.reason})"
    print(summary, file=sys.stderr)
    if manifest.unmatched_truth:
        print(f"note: {manifest.unmatched_truth.sentence()}", file=sys.stderr)
    print(path, file=out, flush=True)
    return EXIT_CODES.get(manifest.status, 1)


def cmd_preview(args) -> int:
    from .inference import Classifier
    from .models import ensure_weights
    from .preview import preview

    spec = _model_spec(args)
    listing = list_images(open_source(args.data, args.s3_endpoint))
    ensure_weights(describe(spec))
    result = preview(listing, Classifier(spec), n=args.n, seed=args.seed)
    among = ""
    if args.dataset_classes and result.label_set:
        result, among = result.restricted(), f" among the dataset's {len(result.label_set)} classes"
    elif args.dataset_classes:
        print("note: the dataset's folders name no subset of the model's classes: answering with all of them", file=sys.stderr)
    ranking = f"top-{max(len(row.topk) for row in result.rows) or 5}{among}"  # 5 where no image could be read
    width = max(len(row.relative) for row in result.rows)
    truth_width = max([len("ground truth")] + [len(row.ground_truth or "-") for row in result.rows])
    print(f"{'path':<{width}}  {'ground truth':<{truth_width}}  {ranking}")
    for row in result.rows:
        top = row.error or ", ".join(f"{label} ({score:.2f})" for label, score in row.topk)
        mark = {True: "✓", False: "✗", None: " "}[row.correct]
        print(f"{row.relative:<{width}}  {row.ground_truth or '-':<{truth_width}}  {mark} {top}")
    print(f"{len(result.rows)} images in {result.seconds:.2f} s", file=sys.stderr)
    if result.unmatched_truth:
        print(f"note: {result.unmatched_truth.sentence()}", file=sys.stderr)
    return 0


def cmd_models(_args) -> int:
    entries = registry()
    width = max(len(entry.name) for entry in entries)
    print(f"{'model':<{width}}  {'weights':<22}  offline  source")
    for entry in entries:
        offline = "yes" if entry.available_offline else "no"
        print(f"{entry.name:<{width}}  {entry.weights:<22}  {offline:<7}  {entry.source}")
    return 0


def cmd_runs(args) -> int:
    found = list_runs(args.out)
    if not found:
        print(f"no runs in {args.out}", file=sys.stderr)
        return 0
    rows = [("run", "status", "images", "top-1", "img/s", "engine", "precision", "model", "dataset", "folder")]
    for path, manifest in found:
        top1 = f"{manifest.accuracy.top1:.1%}" if manifest.accuracy.top1 is not None else "-"
        images = f"{manifest.counts.done:,}/{manifest.counts.inputs:,}"
        speed = f"{manifest.images_per_s:,.1f}" if manifest.images_per_s else "-"
        model = manifest.model.get("display_name", "?")
        # what tells apart speeds of one model on one machine: local workers or Ray's start and actors, fp32 or bf16
        engine, precision = manifest.engine or "-", manifest.precision or "-"
        rows.append((manifest.run_id, manifest.status, images, top1, speed, engine, precision, model, manifest.dataset, str(path)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    numbers = (2, 3, 4)  # images, top-1 and img/s, right-aligned
    for row in rows:
        cells = [row[c].rjust(widths[c]) if c in numbers else row[c].ljust(widths[c]) for c in range(len(widths))]
        print("  ".join([*cells, row[-1]]))
    return 0


def cmd_cluster(args) -> int:
    from .cluster import connect

    info = connect(args.address)
    print(json.dumps(dataclasses.asdict(info)))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(_existing_run(args.run_dir), args.output))
    return 0


COMPARE_LINES = 10  # rows of each ranking `compare` prints


def cmd_compare(args) -> int:
    from . import metrics
    from .runs import read_manifest

    loaded = []
    for run in (args.run_a, args.run_b):
        path = _existing_run(run)
        loaded.append(metrics.load(path, read_manifest(path).label_set))
    comparison = metrics.compare(*loaded)
    if not comparison.common:
        raise UserError("the two runs have no image in common")
    shares, distance = comparison.drift(top_n=COMPARE_LINES)
    differ = comparison.disagreeing()
    print(f"images in common: {comparison.common:,} (only in A: {comparison.only_a:,}, only in B: {comparison.only_b:,})")
    print(f"agreement: {comparison.agreement():.2%} ({differ:,} labelled differently)")
    print(f"label distribution shift (total variation): {distance:.2%}")
    top1 = [metrics.summary(side).top1 for side in (comparison.a, comparison.b)]
    if None not in top1:
        print(f"top-1 A: {top1[0]:.2%}\ntop-1 B: {top1[1]:.2%} ({(top1[1] - top1[0]) * 100:+.2f} pts)")
    if differ:
        print("most frequent disagreements, A's label → B's:")
        for pair in comparison.disagreement_pairs(COMPARE_LINES).itertuples():
            print(f"{pair.count:>7,}  {pair.label_a} → {pair.label_b}")
        _print_changes("largest changes in predicted-label share, A → B:", shares["label"], shares["A"], shares["B"])
    if None not in top1:
        recall = comparison.per_class_delta()
        recall = recall[recall["delta"] != 0].head(COMPARE_LINES)
        _print_changes("largest changes in per-class recall, A → B:", recall["class"], recall["A"], recall["B"])
    return 0


def _print_changes(heading: str, names, before, after) -> None:
    """One aligned line per name: its share in A, in B, and the change in points."""
    if len(names):
        print(heading)
        width = max(map(len, names))
        for name, a, b in zip(names, before, after, strict=True):
            print(f"  {name:<{width}}  {a:7.2%} → {b:7.2%}  ({(b - a) * 100:+.2f} pts)")


def cmd_delete(args) -> int:
    """Every folder named is checked before any is deleted: one that is not a run, or a run still running,
    stops the command with nothing deleted."""
    paths = [_existing_run(run_dir) for run_dir in args.run_dirs]
    running = [m.run_id for m in map(read_manifest, paths) if m.status == "running"]
    if running:
        raise UserError(f"run {running[0]} is still running: cancel it first (nothing deleted)")
    for path in paths:
        print(f"deleted {delete_run(path).run_id} ({path})")
    return 0


def cmd_synthesize(args) -> int:
    from .synthetic import write_synthetic_run

    print(write_synthetic_run(args.out, args.rows, args.run_id, args.classes, seed=args.seed))
    return 0


def _existing_run(run_dir: str) -> Path:
    path = Path(run_dir)
    if not (path / "manifest.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no manifest.json)")
    return path


COMMANDS = {
    "cluster": cmd_cluster,
    "run": cmd_run,
    "resume": cmd_resume,
    "preview": cmd_preview,
    "models": cmd_models,
    "runs": cmd_runs,
    "delete": cmd_delete,
    "report": cmd_report,
    "compare": cmd_compare,
    "synthesize": cmd_synthesize,
}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if hasattr(args, "data_path"):  # `run DATA` or `run --data DATA`
            if args.data_path and args.data and args.data_path != args.data:
                parser.error(f"two datasets given: {args.data_path} and --data {args.data}")
            args.data = args.data_path or args.data or str(SAMPLE_DATA)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # the last of the output, here where a reader that left (`… | head`) is handled
        return code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as error:
        if not _reader_gone(sys.stdout):  # another pipe broke (a worker's): not the user's `| head`
            return _internal_error(error)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail again
        return 128 + signal.SIGPIPE
    except Exception as error:
        return _internal_error(error)


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reader has closed it (`… | head` has what it wanted): poll then
    reports an error on the pipe's write end."""
    poller = select.poll()
    poller.register(stream.fileno(), 0)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _internal_error(error: Exception) -> int:
    if os.environ.get(DEBUG_ENV):
        raise error
    print(f"internal error: {type(error).__name__}: {one_line(error)} (set {DEBUG_ENV}=1 for details)", file=sys.stderr)
    return 1
