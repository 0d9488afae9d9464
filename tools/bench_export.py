"""Benchmark: ``bnexport export`` against the bare library calls it wraps.

    python tools/bench_export.py [--models resnet18@1,3,64,64 resnet50@1,3,224,224] [--repeats 3]
                                 [--threads N] [--skip-no-bench] [--stub-figures] [--json out.json]

The table in docs/benchmarks.md ("Export: the command against the bare calls") is
``python tools/bench_export.py --repeats 3 --threads 1 --json export.json``, and the same without
``--threads 1``.

For each model (a bnexport spec or a torchvision name, ``@`` its input shape; random weights from
the spec's seed, as ``bnexport export`` builds it), in rounds of one process per side, the sides
taking turns so that a change in the machine's load touches each alike:

- **bare**: the calls the command wraps, each once, in this order, on the command's seeded input
  at the given shape and otherwise with the libraries' defaults: ``torch.jit.trace``
  (``check_trace=False``, as the command traces), ``torch.export.export``,
  ``torch.onnx.export(dynamo=True, optimize=False)``, ``torch.onnx.export(dynamo=False)`` into a
  buffer, and one ONNX Runtime session (default options) on the dynamo model, run once.
- **export**: ``bnexport.pipeline.export_model``, the library call ``bnexport export`` makes, into
  a fresh folder: every file, the parity of each against eager, the timing of BatchNorm kept
  against folded, the report and its figures; ``summary.stage_seconds`` splits it by stage.
- **export --no-bench**: the same with ``bench=False``, which shows what that timing costs
  (``--skip-no-bench`` leaves it out).

The command does more than the bare calls: it scripts and exports both the model and its folded
copy and saves each file, exports with a dynamic batch axis (tracing at batch 2) where the bare
calls trace the given shape, folds, checks every file and draws the figures. The ratio is the
price of all that.

Each side runs in a fresh process, so that neither inherits the other's warm caches (torch.export
and the dynamo exporter are much faster the second time in a process). The clock starts after the
imports (the same list on both sides, plus bnexport and matplotlib for the command) and after the
model is built, and stops when the calls return. ``CPU`` is the process's CPU time over the same
span, every thread's: steadier than the wall time where other work shares the cores. ``process``
is the whole process's wall time, imports and model included. Every figure is the median over
``--repeats`` rounds, and the ratio is export ÷ bare of the medians. ``--threads`` sets
OMP_NUM_THREADS for both sides; on a shared machine 1 keeps torch's threads from spin-waiting
for a busy core.

``--stub-figures`` draws no figures and no report, for timing the other stages while the figures
cannot be drawn; the output says so, and it is no measure of the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnexport.tables import format_table  # noqa: E402  (no torch: the parent process stays light)

DEFAULT_MODELS = ("resnet18@1,3,64,64", "resnet50@1,3,224,224")
TARGET_RATIO = 2.5  # export's seconds ÷ the bare calls' seconds, at most
BARE_CALLS = ("torch.jit.trace", "torch.export.export", "torch.onnx.export dynamo", "torch.onnx.export legacy",
              "ORT session + run")
SIDES = ("bare", "export", "export --no-bench")
RESULT_MARK = "bench_export result: "


def parse_model(text: str) -> tuple[str, tuple[int, ...]]:
    """``SPEC@SHAPE``: a bnexport spec (a bare name is torchvision's) and its comma-separated input shape."""
    spec, at, shape = text.rpartition("@")
    if not at or not spec:
        raise argparse.ArgumentTypeError(f"--models {text}: give SPEC@SHAPE, e.g. resnet18@1,3,64,64")
    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--models {text}: the shape must be integers separated by commas") from None
    return (spec if ":" in spec else f"torchvision:{spec}"), dims


def label(spec: str, shape: tuple[int, ...]) -> str:
    return f"{spec.removeprefix('torchvision:')} {'×'.join(map(str, shape[1:]))}"


# one side, in its own process ------------------------------------------------------------

def warm_imports() -> None:
    """What both sides import before the clock starts: torch and every package the calls load lazily."""
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch  # noqa: F401
    import torch.export  # noqa: F401
    import torch.onnx._internal.exporter._compat  # noqa: F401  (the dynamo exporter's first call imports it)
    import torchvision  # noqa: F401


def load(spec: str, shape: tuple[int, ...]):
    """The model as ``bnexport export`` builds it (seeded random weights), its input shapes and seeded input."""
    from bnexport.model_spec import load_model, seeded_tensors

    loaded = load_model(spec)
    shapes = {loaded.input_names[0]: shape}
    return loaded, shapes, seeded_tensors(shapes, seed=loaded.seed)


def run_bare(loaded, inputs: tuple) -> dict:
    import io
    import warnings

    import onnxruntime as ort
    import torch

    from bnexport.config import DEFAULT_OPSET

    model = loaded.module.eval()
    seconds = {}

    def timed(name, call):
        started = time.perf_counter()
        result = call()
        seconds[name] = time.perf_counter() - started
        return result

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed("torch.jit.trace", lambda: torch.jit.trace(model, inputs, check_trace=False))
        timed("torch.export.export", lambda: torch.export.export(model, inputs))
        program = timed("torch.onnx.export dynamo", lambda: torch.onnx.export(
            model, inputs, dynamo=True, optimize=False, opset_version=DEFAULT_OPSET, verbose=False))
        timed("torch.onnx.export legacy", lambda: torch.onnx.export(
            model, inputs, io.BytesIO(), dynamo=False, opset_version=DEFAULT_OPSET))

        def ort_run():
            session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
            return session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})

        timed("ORT session + run", ort_run)
    return {"seconds": seconds, "total": sum(seconds.values())}


def stub_figures() -> None:
    """No figures and no report: ``visualize`` and whatever the pipeline builds its inputs with do nothing."""
    import bnexport.viz.visualize as figures

    class Nothing:
        def __call__(self, *args, **kwargs):
            return self

        def __getattr__(self, name):
            return self

        def descriptions(self) -> dict:
            return {}

    figures.VisualizeInputs = figures.visualize = Nothing()


def run_export(loaded, shapes: dict, *, bench: bool) -> dict:
    from bnexport.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="bench_export-") as folder:
        started = time.perf_counter()
        summary, parity, _ = export_model(loaded, shapes, Path(folder) / "out", bench=bench, progress=False)
        total = time.perf_counter() - started
    return {"seconds": dict(summary.stage_seconds), "total": total, "parity": "pass" if parity.passed else "fail"}


def cpu_seconds() -> float:
    """This process's CPU time, every thread's, user and system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_side(side: str, spec: str, shape: tuple[int, ...], *, stub: bool) -> dict:
    warm_imports()
    if side != "bare":
        import bnexport.bench  # noqa: F401  (the command's own imports, out of the clock as the bare side's are)
        import bnexport.pipeline  # noqa: F401
        import bnexport.viz.visualize  # noqa: F401  (matplotlib)

        if stub:
            stub_figures()
    loaded, shapes, inputs = load(spec, shape)
    before = cpu_seconds()
    result = run_bare(loaded, inputs) if side == "bare" else run_export(loaded, shapes, bench=side == "export")
    return {**result, "cpu": cpu_seconds() - before}


# rounds ----------------------------------------------------------------------------------

def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_side(side: str, spec: str, shape: tuple[int, ...], *, threads: int | None, stub: bool) -> dict:
    """One side in a fresh process: its result, the process's whole wall time, or its error."""
    command = [sys.executable, __file__, "--side", side, spec, ",".join(map(str, shape))]
    command += ["--stub-figures"] * stub
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, env=child_env(threads))
    wall = time.perf_counter() - started
    found = [line for line in child.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if child.returncode != 0 or not found:
        lines = (child.stderr or child.stdout).strip().splitlines()
        return {"error": lines[-1][:160] if lines else f"exit {child.returncode}", "process": wall}
    return {**json.loads(found[-1][len(RESULT_MARK):]), "process": wall}


def median_of(runs: list[dict]) -> dict:
    """Per-call (or per-stage) medians, the median total and the median process time of one side's runs."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"], "runs": len(runs)}
    names = list(dict.fromkeys(name for r in good for name in r["seconds"]))
    result = {"seconds": {n: statistics.median(r["seconds"].get(n, 0.0) for r in good) for n in names},
              "total": statistics.median(r["total"] for r in good),
              "process": statistics.median(r["process"] for r in good),
              "cpu": statistics.median(r["cpu"] for r in good),
              "totals": [round(r["total"], 3) for r in good], "runs": len(good)}
    if any("parity" in r for r in good):
        result["parity"] = "pass" if all(r.get("parity") == "pass" for r in good) else "fail"
    if len(good) < len(runs):
        result["failed_runs"] = len(runs) - len(good)
    return result


def bench_model(spec: str, shape: tuple[int, ...], *, repeats: int, sides: tuple[str, ...], threads: int | None,
                stub: bool) -> dict:
    runs = {side: [] for side in sides}
    for round_index in range(repeats):
        for side in sides:
            result = run_side(side, spec, shape, threads=threads, stub=stub)
            runs[side].append(result)
            shown = f"{result['total']:.1f}s" if "error" not in result else f"failed: {result['error']}"
            print(f"  {label(spec, shape)}, round {round_index + 1}/{repeats}: {side} {shown}", file=sys.stderr, flush=True)
    medians = {side: median_of(side_runs) for side, side_runs in runs.items()}
    bare = medians["bare"].get("total", math.nan)
    ratios = {side: medians[side].get("total", math.nan) / bare for side in sides if side != "bare"}
    return {"model": spec, "input_shape": list(shape), "sides": medians, "ratios": ratios}


# output ----------------------------------------------------------------------------------

def seconds_cell(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.2f}"


def bare_table(results: list[dict]) -> str:
    rows = [("model", *BARE_CALLS, "total", "CPU", "process")]
    for r in results:
        bare = r["sides"]["bare"]
        if "error" in bare:
            rows.append((label(r["model"], r["input_shape"]), f"fails: {bare['error']}", *[""] * (len(BARE_CALLS) + 2)))
            continue
        rows.append((label(r["model"], r["input_shape"]), *(seconds_cell(bare["seconds"].get(c)) for c in BARE_CALLS),
                     seconds_cell(bare["total"]), seconds_cell(bare["cpu"]), seconds_cell(bare["process"])))
    return format_table(rows)


def export_table(results: list[dict]) -> str:
    stages = list(dict.fromkeys(s for r in results for side in SIDES[1:] for s in r["sides"].get(side, {}).get("seconds", {})))
    rows = [("model", "run", *stages, "total", "CPU", "process", "parity")]
    for r in results:
        for side in SIDES[1:]:
            if side not in r["sides"]:
                continue
            got = r["sides"][side]
            name = label(r["model"], r["input_shape"])
            if "error" in got:
                rows.append((name, side, f"fails: {got['error']}", *[""] * (len(stages) + 3)))
                continue
            rows.append((name, side, *(seconds_cell(got["seconds"].get(s)) for s in stages), seconds_cell(got["total"]),
                         seconds_cell(got["cpu"]), seconds_cell(got["process"]), got.get("parity", "")))
    return format_table(rows)


def ratio_table(results: list[dict]) -> str:
    rows = [("model", "bare s", "export s", "ratio", "CPU ratio", "export --no-bench s", "ratio", "target", "verdict")]
    for r in results:
        sides, ratios = r["sides"], r["ratios"]
        ratio = ratios.get("export", math.nan)
        verdict = "n/a" if not math.isfinite(ratio) else ("met" if ratio <= TARGET_RATIO else "NOT met")
        no_bench = ratios.get("export --no-bench")
        rows.append((label(r["model"], r["input_shape"]), seconds_cell(sides["bare"].get("total")),
                     seconds_cell(sides["export"].get("total")), ratio_cell(ratio),
                     ratio_cell(sides["export"].get("cpu", math.nan) / sides["bare"].get("cpu", math.nan)),
                     seconds_cell(sides.get("export --no-bench", {}).get("total")),
                     "" if no_bench is None else ratio_cell(no_bench), f"≤ {TARGET_RATIO:g}×", verdict))
    return format_table(rows)


def ratio_cell(value: float) -> str:
    return f"{value:.2f}×" if math.isfinite(value) else "n/a"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "matplotlib"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=parse_model, nargs="+", default=[parse_model(m) for m in DEFAULT_MODELS],
                        metavar="SPEC@SHAPE", help="default: " + " ".join(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model; the median is reported (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every side (default: torch's own)")
    parser.add_argument("--skip-no-bench", action="store_true", help="no run of export with bench=False")
    parser.add_argument("--stub-figures", action="store_true",
                        help="draw no figures and no report (a run that says so; not a measure of the command)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--side", nargs=3, metavar=("SIDE", "SPEC", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    if args.side:
        side, spec, shape = args.side
        result = measure_side(side, spec, tuple(int(d) for d in shape.split(",")), stub=args.stub_figures)
        print(RESULT_MARK + json.dumps(result))
        return 0
    sides = SIDES[:2] if args.skip_no_bench else SIDES
    results = {"versions": versions(), "cpus": os.cpu_count(), "threads": args.threads, "repeats": args.repeats,
               "figures_stubbed": args.stub_figures, "load_average_before": os.getloadavg(), "models": []}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs")
    for spec, shape in args.models:
        results["models"].append(bench_model(spec, shape, repeats=args.repeats, sides=sides, threads=args.threads,
                                             stub=args.stub_figures))
    results["load_average_after"] = os.getloadavg()
    median = f"median of {args.repeats}, each side in a fresh process, imports and model construction excluded"
    print(f"\nbare calls, seconds ({median}; process: the whole process, imports included):")
    print(bare_table(results["models"]))
    print(f"\nexport_model, seconds per stage ({median}):")
    print(export_table(results["models"]))
    print("\nexport ÷ bare:")
    print(ratio_table(results["models"]))
    if args.stub_figures:
        print("figures stubbed (--stub-figures): no figures and no report were drawn; this is not the command's time")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
