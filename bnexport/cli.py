"""Command line: parse arguments, call the library, print a table, return an exit code.

Exit codes (``bnexport.errors.exit_code_for``): 0 success; 1 a check failed (parity); 2 bad input
(one line on stderr); 3 under torchrun, a peer process died or stopped answering (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Only light modules at the top: `--help`, `view` and `inspect` should not wait for torch.
from .config import (BENCH_BATCHES, BENCH_MIN_SECONDS, DATASETS, DEFAULT_ATOL, DEFAULT_DIST_TIMEOUT_S, DEFAULT_FIGURE_FORMAT,
                     DEFAULT_OUT_DIR, DEFAULT_RTOL, DEFAULT_SEED, DEVICES, FIGURE_FORMATS, FOLD_TABLE_ROWS, GUESSED_BATCH,
                     GUESSED_IMAGE_SIDE, GUESSED_LENGTH, NETRON_PORT, SCHEDULES, Tolerance, TrainConfig, tolerance_for)
from .errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, BnexportError, CheckFailed, exit_code_for, reported_here

# What a MODEL argument of fold, parity, bench and recalibrate may be, besides a file.
SPEC_HELP = ("a model spec: torchvision:NAME, timm:NAME, package.module:callable or path/to/file.py:callable "
             "(a callable that returns an nn.Module; --weights fills it)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, with exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(*, allow_zero: bool):
    """An argparse type for a finite number > 0, or >= 0 with ``allow_zero``."""
    wanted = "a number >= 0" if allow_zero else "a positive number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


positive_float = finite_float(allow_zero=False)
non_negative_float = finite_float(allow_zero=True)


def shape_triple(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"must be C,H,W with three positive integers, got {text!r}")
    return parts  # type: ignore[return-value]


def shape_list(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if not parts or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, e.g. 1,3,224,224; got {text!r}")
    return parts


def input_shape_arg(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``NAME=1,3,224,224`` for the input called NAME, or ``1,3,224,224`` for a model's only input."""
    name, equals, dims = text.rpartition("=")
    if equals and not name:
        raise argparse.ArgumentTypeError(f"must be NAME=DIMS or DIMS, e.g. images=1,3,224,224; got {text!r}")
    return (name if equals else None), shape_list(dims)


def given_shapes(pairs: list[tuple[str | None, tuple[int, ...]]] | None):
    """``--input-shape`` as the library takes it: None, one bare shape, or shapes by input name."""
    if not pairs:
        return None
    unnamed = [dims for name, dims in pairs if name is None]
    if unnamed:
        if len(pairs) > 1:
            raise BnexportError("--input-shape: a shape without NAME= is for a model's only input; "
                                "with several, give each as NAME=DIMS")
        return unnamed[0]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in pairs:
        if name in shapes:
            raise BnexportError(f"--input-shape: {name} is given twice")
        shapes[name] = dims
    return shapes


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default=defaults.dataset,
                       help="bundled: 5,000 real MNIST digits shipped with bnexport (default, offline); "
                            "mnist, fashion-mnist, cifar10: torchvision datasets under --data-root; "
                            "synthetic: generated, any shape")
    group.add_argument("--data-root", default=defaults.data_root, help="folder of torchvision datasets (default: %(default)s)")
    group.add_argument("--download", action="store_true", help="allow downloading a torchvision dataset (network access)")
    group.add_argument("--synthetic-shape", type=shape_triple, default=defaults.synthetic_shape, metavar="C,H,W",
                       help="image shape of --dataset synthetic (default: 1,28,28)")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="total epochs (default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="default: %(default)s")
    group.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam learning rate (default: %(default)s)")
    group.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                       help="learning-rate schedule over the run (default: %(default)s)")
    group.add_argument("--shift", type=int, default=defaults.shift, metavar="PIXELS",
                       help="random-shift augmentation of up to PIXELS; 0 turns it off (default: %(default)s)")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for weights, shuffling and parity input (default: %(default)s)")
    group.add_argument("--no-bn", action="store_true", help="train SimpleCNN without BatchNorm, for comparison")
    group.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per epoch, for smoke runs")
    group.add_argument("--resume", type=Path, default=None, metavar="CHECKPOINT",
                       help="continue from a bnexport checkpoint up to --epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices and torchrun (see README: Many processes)")
    group.add_argument("--device", choices=DEVICES, default=TrainConfig().device,
                       help="auto: CUDA when present (default); cuda without a GPU is an error")
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on CUDA, train with nn.SyncBatchNorm (exported as plain BatchNorm)")
    group.add_argument("--recalibrate-bn", action="store_true",
                       help="at the end, recompute BatchNorm statistics exactly over the training set")
    group.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                       help="under torchrun, how long a rank waits for the others before it stops (default: %(default)g)")


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-no-bn", action="store_true",
                        help="skip the twin run with BatchNorm switched that the training-curves figure compares against")


def add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR,
                        help="folder of a train-and-export run; figures go to OUT/figures (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to draw (default: OUT/checkpoint.pt)")
    parser.add_argument("--format", choices=FIGURE_FORMATS, default=DEFAULT_FIGURE_FORMAT,
                        help="figure format (default: %(default)s)")


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def add_view_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL",
                        help="ONNX model files, or the folder of an export or train-and-export run "
                             "(its model.onnx and model.folded.onnx)")
    parser.add_argument("--port", type=port_number, default=NETRON_PORT,
                        help="port of the first model; the others take the next ones; 0 picks free ports (default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true", help="print the URLs without opening a browser")


def add_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=non_negative_float, default=None,
                        help=f"absolute tolerance (default: {DEFAULT_ATOL:g} for float32 models; "
                             "coarser dtypes get their own, from their machine epsilon)")
    parser.add_argument("--rtol", type=non_negative_float, default=None,
                        help=f"tolerance relative to max|reference| (default: {DEFAULT_RTOL:g} for float32 models, "
                             f"{tolerance_for('float16').rtol:.2g} for float16, {tolerance_for('bfloat16').rtol:.2g} "
                             "for bfloat16: ten units of the dtype's rounding)")


def tolerance_from_args(args: argparse.Namespace) -> Tolerance:
    """--atol and --rtol where given, float32's default for the other."""
    from .parity.compare import tolerance_given

    return tolerance_given(atol=args.atol, rtol=args.rtol)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, data_root=args.data_root, download=args.download, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, shift=args.shift, seed=args.seed, batch_norm=not args.no_bn,
        max_steps=args.max_steps, synthetic_shape=args.synthetic_shape,
        device=args.device, sync_bn=args.sync_bn, recalibrate_bn=args.recalibrate_bn,
    )


def replicas_for(config: TrainConfig, args: argparse.Namespace):
    """torchrun's process group for the command's lifetime, or one plain process without torchrun."""
    from .distributed.process_group import process_group

    return process_group(device=config.device, sync_bn=config.sync_bn, recalibrate_bn=config.recalibrate_bn,
                         timeout_s=args.dist_timeout)


# Handlers: one per subcommand, each returns an exit code -----------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    """Train SimpleCNN and write checkpoint.pt, history.json and summary.json."""
    from .artifacts import prepare_out_dir
    from .pipeline import train_only

    config = config_from_args(args)
    with replicas_for(config, args) as replicas:
        out = replicas.together(lambda: prepare_out_dir(args.out), main_only=True) or args.out
        summary = train_only(config, out, resume=args.resume, progress=not args.quiet, replicas=replicas)
    if summary is None:  # a rank other than 0: rank 0 reports
        return EXIT_OK
    print(summary.table())
    print(f"artifacts in {out}/")
    return EXIT_OK


def cmd_train_and_export(args: argparse.Namespace) -> int:
    """Train SimpleCNN, export TorchScript, torch.export and ONNX (BatchNorm kept and folded), check parity."""
    from .artifacts import prepare_out_dir
    from .pipeline import train_and_export

    config = config_from_args(args)
    with replicas_for(config, args) as replicas:
        out = replicas.together(lambda: prepare_out_dir(args.out), main_only=True) or args.out
        summary, parity = train_and_export(config, out, resume=args.resume, progress=not args.quiet,
                                           tolerance=tolerance_from_args(args), compare_bn=not args.skip_no_bn,
                                           replicas=replicas)
    if summary is None or parity is None:  # a rank other than 0: rank 0 reports
        return EXIT_OK
    print(parity.table())
    print()
    print(summary.table())
    print(f"artifacts in {out}/ (manifest.json lists them)")
    return EXIT_OK if parity.passed else EXIT_CHECK_FAILED


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="torchvision:NAME, timm:NAME, package.module:callable, path/to/file.py:callable "
                             "(a callable that returns an nn.Module), or a bnexport checkpoint")
    add_weights_argument(parser)
    parser.add_argument("--input-shape", type=input_shape_arg, action="append", default=None, metavar="[NAME=]N,C,H,W",
                        help="shape of the model's input, NAME=DIMS once per input for several (default: what a "
                             "checkpoint or timm model says it takes); parity runs on seeded input of this shape")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the random weights (without --weights) and of every check input (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: %(default)s)")
    group = parser.add_argument_group("data for the report's figures (default: seeded synthetic input, and the report says so)")
    group.add_argument("--data", default=None, metavar="DIR|FILE",
                       help="a folder of images in class folders (ImageFolder), or an .npy/.npz file of samples")
    group.add_argument("--dataset", choices=DATASETS, default=None, help="a dataset by name, its test split")
    group.add_argument("--data-root", default=TrainConfig().data_root, help="folder of torchvision datasets (default: %(default)s)")
    group.add_argument("--download", action="store_true", help="allow downloading a torchvision dataset (network access)")
    parser.add_argument("--format", choices=FIGURE_FORMATS, default=DEFAULT_FIGURE_FORMAT,
                        help="figure format (default: %(default)s)")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick timing of BatchNorm kept against folded")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE",
                        help="a state dict, or a checkpoint holding one, for a model spec (read with weights_only=True); "
                             "without it the model's weights are random, from --seed")


def cmd_export(args: argparse.Namespace) -> int:
    """Export any model: TorchScript, torch.export and ONNX, BatchNorm kept and folded, with parity, report and figures."""
    from .data import load_figure_data
    from .model_spec import load_model, resolve_shapes
    from .pipeline import export_model

    loaded = load_model(args.model, weights=args.weights, seed=args.seed)
    shapes = resolve_shapes(loaded, given_shapes(args.input_shape))
    figures = None
    if args.data is not None or args.dataset is not None:
        figures = load_figure_data(shapes, data=args.data, dataset=args.dataset, seed=args.seed,
                                   data_root=args.data_root, download=args.download)
    summary, parity, fold = export_model(loaded, shapes, args.out, seed=args.seed, tolerance=tolerance_from_args(args),
                                   figure_data=figures, figure_format=args.format, bench=not args.no_bench,
                                   progress=not args.quiet)
    if args.json:
        print_json({"summary": summary.to_json(), "parity": parity.to_json(), "fold": fold.to_json()})
    else:
        print(fold.table(limit=FOLD_TABLE_ROWS))
        print()
        print(parity.table())
        print()
        print(summary.table())
        print(f"artifacts in {args.out}/ (manifest.json lists them)")
    return EXIT_OK if parity.passed else EXIT_CHECK_FAILED


def add_recalibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help=f"a bnexport checkpoint.pt (recalibrated over its own training data), or {SPEC_HELP}, "
                             "recalibrated over --data")
    parser.add_argument("--data", default=None, metavar="DIR|FILE",
                        help="for a model spec: the samples, every one of them (up to --batches): a folder of images "
                             "in class folders (ImageFolder), or an .npy/.npz file (an .npz holds one array per input name)")
    add_weights_argument(parser)
    parser.add_argument("--input-shape", type=input_shape_arg, action="append", default=None, metavar="[NAME=]N,C,H,W",
                        help="for a model spec: its input's shape, NAME=DIMS once per input for several (default: "
                             "what the model says it takes, else the shape of the .npy/.npz samples)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="for a model spec: seed of its random weights without --weights (default: %(default)s)")
    parser.add_argument("--batches", type=positive_int, default=None, metavar="N",
                        help="recompute over the first N batches: of the checkpoint's seeded training order, or of "
                             "--data in its own order (default: all of it)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"default: the checkpoint's; {TrainConfig().batch_size} for --data (the statistics do not "
                             "depend on it)")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                        help="new checkpoint (default: CHECKPOINT with .recalibrated before its suffix); for a model "
                             "spec, required: the state dict file to write")
    parser.add_argument("--in-place", action="store_true",
                        help="replace CHECKPOINT itself, or a model spec's --weights file (atomically)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def cmd_recalibrate(args: argparse.Namespace) -> int:
    """Recompute BatchNorm running statistics exactly (pooled in float64): a checkpoint's over its own
    training data, a model spec's over --data; save them in a new file."""
    from .distributed.recalibrate import recalibrate_checkpoint, recalibrate_model
    from .parity.sources import names_a_spec

    spec_flags = [flag for flag, value in (("--data", args.data), ("--weights", args.weights),
                                           ("--input-shape", args.input_shape)) if value is not None]
    if not names_a_spec(args.model):
        if spec_flags and Path(args.model).is_file():
            raise BnexportError(f"{spec_flags[0]}: {args.model} is a bnexport checkpoint, recalibrated over its own "
                                f"training data; {spec_flags[0]} is for a model spec")
        result = recalibrate_checkpoint(args.model, args.output, batches=args.batches, batch_size=args.batch_size,
                                        in_place=args.in_place)
    else:
        result = recalibrate_model(args.model, args.data, args.output, weights=args.weights,
                                   input_shapes=given_shapes(args.input_shape), batches=args.batches,
                                   batch_size=args.batch_size, in_place=args.in_place, seed=args.seed)
    if args.json:
        print_json(result.to_json())
    else:
        print(result.table())
        print(f"written {result.output}")
    return EXIT_OK


def cmd_visualize(args: argparse.Namespace) -> int:
    """Draw the figures of a train-and-export run into OUT/figures and write OUT/report.html."""
    from .viz.visualize import update_manifest, visualize

    result = visualize(args.out, checkpoint=args.checkpoint, figure_format=args.format)
    update_manifest(args.out, result)
    print(result.table())
    print(f"report: {result.report}")
    return EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    """Serve models in Netron on 127.0.0.1, one port each, until Ctrl-C."""
    from .viz import netron as view

    served = view.start(view.models_to_serve(args.models), port=args.port)
    for model in served:
        print(f"serving {model.path} at {model.url}", flush=True)
    print("Ctrl-C stops", flush=True)
    if not args.no_browser:
        view.open_in_browser(served)
    try:
        view.wait(served)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return EXIT_OK


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", type=input_shape_arg, action="append", default=None, metavar="[NAME=]N,C,H,W",
                        help="shape of a seeded check input, NAME=DIMS once per input (a bare shape for a one-input "
                             f"model); default: the model's, dynamic dims guessed (batch {GUESSED_BATCH}, image sides "
                             f"{GUESSED_IMAGE_SIDE}, other lengths {GUESSED_LENGTH}) and printed")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the check input, and of a model spec's random weights without --weights "
                             "(default: %(default)s)")


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=f"an ONNX file, a bnexport checkpoint, or {SPEC_HELP}")
    add_weights_argument(parser)
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="where to write the folded model; for a checkpoint or a model spec (which requires it) "
                             "its suffix picks the format: .onnx, .ts or .pt2")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON", help="also write the per-BatchNorm decisions as JSON")
    parser.add_argument("--in-place", action="store_true", help="overwrite the input ONNX file with the folded model")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check of the folded model")
    parser.add_argument("--fold-overridable", action="store_true",
                        help="ONNX: also fold BNs whose parameters are graph inputs with defaults (IR >= 4), "
                             "treating those defaults as constants; by default they are kept, since a caller may override them")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="an ONNX file")


def add_parity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", metavar="REFERENCE",
                        help=f"the reference: an ONNX file, a bnexport checkpoint, or {SPEC_HELP}")
    parser.add_argument("candidate", metavar="CANDIDATE", help="the model to compare with it, of the same kinds")
    add_weights_argument(parser)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=f"an ONNX file, a bnexport checkpoint, or {SPEC_HELP}")
    add_weights_argument(parser)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=list(BENCH_BATCHES),
                        help=f"batch sizes (default: {' '.join(map(str, BENCH_BATCHES))})")
    parser.add_argument("--min-seconds", type=positive_float, default=BENCH_MIN_SECONDS, help="time each runner at least this long (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for torch and ONNX Runtime (default: their own defaults)")


def cmd_fold(args: argparse.Namespace) -> int:
    """Fold every BatchNorm that folds exactly, check parity, and write the folded model.

    Prints one line per BatchNorm: folded into which layer, or kept and why. Exit 1 when the
    folded model fails the parity check (nothing is written then), 2 on bad input.
    """
    from .fold.files import fold_file
    from .parity.compare import inputs_text

    try:
        report = fold_file(args.model, args.output, in_place=args.in_place, report_path=args.report,
                           check=not args.no_check, input_shapes=given_shapes(args.input_shape), seed=args.seed,
                           atol=args.atol, rtol=args.rtol, fold_overridable=args.fold_overridable, weights=args.weights)
    except CheckFailed as failed:
        print(failed.report.table())
        print(f"bnexport fold: {args.model}: {failed}; nothing written", file=sys.stderr)
        return exit_code_for(failed)
    output = args.model if args.in_place else args.output
    print(report.table())
    if not report.records:
        print(f"{args.model} has no BatchNorm; {output} is the same model")
    elif report.parity is not None:
        worst = max(report.parity.results, key=lambda r: r.max_rel if math.isfinite(r.max_rel) else math.inf)
        print(f"parity: max |Δ| {worst.max_abs:.2e} = {worst.max_rel:.2e} of scale "
              f"(rtol {worst.rtol:g}) on seeded input: ok")
        print(inputs_text(report.parity.inputs))
    print(f"wrote {output}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show an ONNX model: op counts, opset, inputs and outputs, parameters, and every BatchNormalization."""
    from .fold import load_onnx
    from .export.onnx_info import describe_onnx

    info = describe_onnx(load_onnx(args.model))
    if args.json:
        print_json(info.to_json())
    else:
        print(info.table())
    return EXIT_OK


def cmd_parity(args: argparse.Namespace) -> int:
    """Compare two models, ONNX files, bnexport checkpoints or model specs, on seeded input.

    Every graph input gets a seeded value of its own dtype and shape; every output is compared.
    ONNX runs in ONNX Runtime with graph optimisations disabled. Exit 0 when they agree within
    --atol + --rtol·max|reference| (by default the coarser model dtype's tolerance), 1 when they
    differ, 2 on bad input.
    """
    from .parity.files import compare_files

    report = compare_files(args.reference, args.candidate, input_shapes=given_shapes(args.input_shape), seed=args.seed,
                           atol=args.atol, rtol=args.rtol, weights=args.weights)
    if args.json:
        print_json(report.to_json())
    else:
        print(report.table())
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


def cmd_bench(args: argparse.Namespace) -> int:
    """Inference latency of an ONNX file, a checkpoint or a model spec, BatchNorm kept and folded, per runtime and batch size."""
    from .bench import bench_file

    report = bench_file(args.model, input_shapes=given_shapes(args.input_shape), threads=args.threads,
                        batches=tuple(args.batch), seed=args.seed, min_seconds=args.min_seconds, weights=args.weights)
    if args.json:
        print_json(report.to_json())
    else:
        print(report.table())
    return EXIT_OK


COMMANDS = {
    "train": (cmd_train, [add_training_arguments, add_distributed_arguments]),
    "train-and-export": (cmd_train_and_export, [add_training_arguments, add_distributed_arguments, add_tolerance_arguments,
                                               add_comparison_arguments]),
    "export": (cmd_export, [add_export_arguments, add_tolerance_arguments, add_json_argument]),
    "fold": (cmd_fold, [add_fold_arguments, add_check_arguments, add_tolerance_arguments]),
    "inspect": (cmd_inspect, [add_inspect_arguments, add_json_argument]),
    "parity": (cmd_parity, [add_parity_arguments, add_check_arguments, add_tolerance_arguments, add_json_argument]),
    "bench": (cmd_bench, [add_bench_arguments, add_check_arguments, add_json_argument]),
    "visualize": (cmd_visualize, [add_visualize_arguments]),
    "view": (cmd_view, [add_view_arguments]),
    "recalibrate": (cmd_recalibrate, [add_recalibrate_arguments]),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = ArgumentParser(prog="bnexport", description="Train a BatchNorm CNN, fold BatchNorm, export it and prove parity.")
    parser.add_argument("--version", action="version", version=f"bnexport {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for name, (handler, adders) in COMMANDS.items():
        doc = (handler.__doc__ or "").strip()
        sub = subparsers.add_parser(name, help=doc.splitlines()[0], description=doc)
        for add in adders:
            add(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BnexportError as err:
        if reported_here(err):
            print(f"bnexport {args.command}: error: {err}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt as err:
        print(f"bnexport {args.command}: interrupted", file=sys.stderr)
        return exit_code_for(err)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))
