"""Benchmark: how fast bnexport folds BatchNorm, how much memory it takes, and which BNs each tool folds.

    python tools/bench_fold.py [--repeats 5] [--threads N] [--json out.json] [--skip-coverage]
                               [--skip-scaling] [--skip-memory] [--skip-processes]

1. Speed, on resnet50 (weights=None, randomized BN statistics): our ONNX fold against
   onnxsim's ``simplify``, onnxslim's ``slim`` and onnxoptimizer's ``fuse_bn_into_conv``, and
   our module fold against ``torch.fx.experimental.optimization.fuse``; the parity check is
   excluded. Each figure is the median of ``--repeats`` runs after one warm-up, all in this
   process, and each baseline is printed as a ratio to bnexport's time.
2. Whole processes on resnet50's ONNX file: ``python -m bnexport inspect`` against a bare
   ``import onnx, onnxruntime`` plus ``onnx.load``, and ``python -m bnexport fold --no-check``
   against the same plus ``onnx.save``; runs alternate, median of ``--repeats`` after a
   warm-up of each. ``-X importtime`` tells whether the bnexport process imported torch.
3. Scaling: chains of n Conv→BN pairs; the time per BN should stay flat as n grows.
4. Peak memory: the process's extra resident memory during each fold, sampled every
   millisecond, in units of the model's weight bytes.
5. Coverage: on zoo models from both ONNX exporters and on small models with one pattern
   each, how many BatchNorms each tool folds, and the error of its output relative to the
   output's scale (ONNX Runtime with graph optimisations off is the reference). Real-world
   models (timm, the onnx wheel's zoo, fp16, PaddleOCR) are in ``tools/coverage_fold.py``.

A tool that is missing or fails is a row saying so; the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coverage_fold  # noqa: E402  (beside this file)
from bnexport.tables import format_table  # noqa: E402

INPUT = (1, 3, 64, 64)
TARGETS = {  # the speed each ratio must reach: (baseline, bnexport, "≥" or "≤", bound)
    "onnxsim ÷ bnexport ONNX fold": ("ONNX: onnxsim", "ONNX: bnexport", "≥", 8.0),
    "fx.fuse ÷ bnexport module fold": ("module: fx.fuse", "module: bnexport", "≥", 2.0),
}
PROCESS_TARGETS = {"inspect": 1.5, "fold": 2.0}  # bnexport's process time ÷ the bare one, at most


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:80] if text else ''}"


# models --------------------------------------------------------------------------------

def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def torchscript_onnx(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, do_constant_folding=False, opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


def dynamo_onnx(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (example,), dynamo=True, optimize=False, verbose=False).model_proto


def conv_bn_chain(pairs: int, channels: int = 8) -> nn.Module:
    layers = []
    for _ in range(pairs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return randomize_bn(nn.Sequential(*layers))


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def pattern_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """One pattern per model, with the input shape it takes."""
    return {
        "Conv→BN (SimpleCNN)": (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()), (1, 3, 16, 16)),
        "ConvTranspose→BN": (nn.Sequential(nn.ConvTranspose2d(8, 8, 3, stride=2), nn.BatchNorm2d(8)), (1, 8, 8, 8)),
        "ConvTranspose(groups=2)→BN": (nn.Sequential(nn.ConvTranspose2d(8, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8)), (1, 8, 8, 8)),
        "Linear→BN1d": (nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)), (2, 16)),
        "BN→Conv (no padding)": (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)), (1, 3, 16, 16)),
        "BN→Linear": (nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 8)), (2, 16)),
        "shared conv, two BNs": (SharedConv(), (1, 3, 16, 16)),
    }


def zoo_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "resnet18": (torchvision.models.resnet18(weights=None), INPUT),
        "mobilenet_v2": (torchvision.models.mobilenet_v2(weights=None), INPUT),
        "vgg11_bn": (torchvision.models.vgg11_bn(weights=None), (1, 3, 224, 224)),
        "densenet121": (torchvision.models.densenet121(weights=None), INPUT),
    }


# the tools -----------------------------------------------------------------------------

def _copying(fold):
    """A module fold that folds in place, run on a deep copy (as fx.fuse copies): the input stays as it was."""
    return lambda module, example: fold(copy.deepcopy(module), example)


def _installed(tools: dict, *, copy_first: tuple[str, ...] = ()) -> dict:
    """coverage_fold's tools whose package is installed: a baseline that is not installed is no row."""
    return {name: (_copying(tool) if name in copy_first else tool) for name, tool in tools.items()
            if importlib.util.find_spec(coverage_fold.TOOL_PACKAGES[name]) is not None}


# one definition of each tool, shared with tools/coverage_fold.py; AIMET (aimet-onnx, aimet-torch) is optional
ONNX_TOOLS = _installed(coverage_fold.ONNX_TOOLS)
MODULE_TOOLS = _installed(coverage_fold.TORCH_TOOLS, copy_first=("aimet_torch",))
ours_onnx, ours_module = ONNX_TOOLS["bnexport"], MODULE_TOOLS["bnexport"]


# measuring -----------------------------------------------------------------------------

def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(run) -> int:
    """Largest resident memory above the level just before ``run``, sampled every millisecond.

    Meaningful only in a fresh process: memory an earlier run freed can stay resident and be
    reused unseen, which is why ``speed`` measures each tool in its own subprocess.
    """
    gc.collect()
    baseline = _rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = run()
    done.set()
    sampler.join()
    peak = max(peak, _rss_bytes())
    del result
    return peak - baseline


def count_bn(model) -> int:
    """BatchNorms the model still runs: ONNX nodes, or BN call sites of an fx graph, or BN modules."""
    if isinstance(model, onnx.ModelProto):
        return sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if isinstance(model, torch.fx.GraphModule):  # fx.fuse leaves the BN modules registered, unused
        modules = dict(model.named_modules())
        return sum(node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm)
                   for node in model.graph.nodes)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(reference - candidate).max() / max(np.abs(reference).max(), 1e-30))


def ort_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_bytes(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# the four parts --------------------------------------------------------------------------

def resnet50_case():
    torch.manual_seed(0)
    module = randomize_bn(torchvision.models.resnet50(weights=None))
    example = torch.zeros(INPUT)
    return module, example, torchscript_onnx(module, example)


def speed(repeats: int, *, memory: bool = True) -> dict:
    """Median seconds of each fold on resnet50, all in this process; a tool that fails is kept with its error."""
    module, example, model = resnet50_case()
    weight_bytes = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    timed = {f"ONNX: {name}": (lambda tool=tool: tool(model)) for name, tool in ONNX_TOOLS.items()
             if name != "ORT fusion"}  # ORT builds a session, not a model rewrite: not comparable in time
    timed.update({f"module: {name}": (lambda tool=tool: tool(module, example)) for name, tool in MODULE_TOOLS.items()})
    rows, errors = {}, {}
    for name, run in timed.items():
        try:
            rows[name] = median_seconds(run, repeats)
        except Exception as err:  # a baseline missing or failing is a row saying so
            rows[name], errors[name] = math.nan, short_error(err)
    peak = {}
    if memory:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "resnet50.onnx"
            path.write_bytes(onnx_bytes(model))
            for name in rows:
                if name in errors:
                    continue
                probe = subprocess.run([sys.executable, __file__, "--memory-probe", name, str(path),
                                        "--threads", str(torch.get_num_threads())],
                                       capture_output=True, text=True)
                peak[name] = int(probe.stdout.split()[-1]) / weight_bytes if probe.returncode == 0 else math.nan
    return {"model": "resnet50", "batchnorm": count_bn(module), "weight_mib": weight_bytes / 2**20,
            "seconds": rows, "errors": errors, "peak_extra_memory_in_weights": peak}


# Runs the commands in a small process of its own: a child's peak resident memory counts the
# pages it shares with its parent at the fork, and this process holds torch and resnet50.
_PROCESS_DRIVER = """
import json, os, subprocess, sys, time
results = []
for command in json.loads(sys.argv[1]):
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    results.append([time.perf_counter() - started, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)])
print(json.dumps(results))
"""


def _timed_processes(commands: list[list[str]]) -> list[tuple[float, int, int]]:
    """Wall seconds, peak resident bytes and exit status of each command, run one after the other."""
    driver = subprocess.run([sys.executable, "-c", _PROCESS_DRIVER, json.dumps(commands)], capture_output=True,
                            text=True, check=True, env=_child_env())
    return [tuple(r) for r in json.loads(driver.stdout)]


def _child_env() -> dict:
    """This process's environment, with the repository first on the path so its bnexport is the one run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *filter(None, [env.get("PYTHONPATH")])])
    return env


def imports_torch(command: list[str]) -> bool | None:
    """Whether the command, run under ``-X importtime``, imports torch; None if it fails."""
    run = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, env=_child_env())
    if run.returncode != 0:
        return None
    return any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "torch" for line in run.stderr.splitlines()
               if line.startswith("import time:"))


def processes(repeats: int) -> dict:
    """bnexport's ``inspect`` and ``fold --no-check`` as whole processes, against bare onnx + onnxruntime ones.

    The four commands run in turn, ``repeats`` rounds after one warm-up round, so that a
    change in the machine's load touches each of them alike.
    """
    _, _, model = resnet50_case()
    python = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet50.onnx"
        path.write_bytes(onnx_bytes(model))
        out_bare, out_ours = Path(folder) / "bare.onnx", Path(folder) / "folded.onnx"
        commands = {
            "bnexport inspect": [python, "-m", "bnexport", "inspect", str(path)],
            "bare load": [python, "-c", f"import onnx, onnxruntime; onnx.load({str(path)!r})"],
            "bnexport fold --no-check": [python, "-m", "bnexport", "fold", str(path), "-o", str(out_ours), "--no-check"],
            "bare load + save": [python, "-c", f"import onnx, onnxruntime; m = onnx.load({str(path)!r}); "
                                               f"onnx.save(m, {str(out_bare)!r})"],
        }
        runs = {name: [] for name in commands}
        results = _timed_processes(list(commands.values()) * (repeats + 1))
        for index, result in enumerate(results[len(commands):]):  # the first round is the warm-up
            runs[list(commands)[index % len(commands)]].append(result)
        torch_imported = {name: imports_torch(commands[name]) for name in ("bnexport inspect", "bnexport fold --no-check")}
    rows = {}
    for name, results in runs.items():
        codes = {code for _, _, code in results}
        rows[name] = {"seconds": statistics.median(t for t, _, _ in results),
                      "peak_mib": statistics.median(m for _, m, _ in results) / 2**20,
                      "exit": max(codes, key=abs)}
        if name in torch_imported:
            rows[name]["imports_torch"] = torch_imported[name]
    ratios = {"inspect": rows["bnexport inspect"]["seconds"] / rows["bare load"]["seconds"],
              "fold": rows["bnexport fold --no-check"]["seconds"] / rows["bare load + save"]["seconds"]}
    return {"model": "resnet50", "file_mib": len(onnx_bytes(model)) / 2**20, "rows": rows, "ratios": ratios}


def scaling(repeats: int) -> list[dict]:
    rows = []
    for pairs in (25, 50, 100, 200):
        module = conv_bn_chain(pairs)
        example = torch.zeros(1, 8, 8, 8)
        model = torchscript_onnx(module, example)
        onnx_seconds = median_seconds(lambda: ours_onnx(model), repeats)
        module_seconds = median_seconds(lambda: ours_module(module, example), repeats)
        rows.append({"batchnorm": pairs, "onnx_seconds": onnx_seconds, "module_seconds": module_seconds,
                     "onnx_ms_per_bn": onnx_seconds / pairs * 1e3, "module_ms_per_bn": module_seconds / pairs * 1e3})
    return rows


def executed_bn(module: nn.Module, example: torch.Tensor) -> int:
    """BatchNorm sites the module runs on ``example``, whatever the class it returns (see coverage_fold)."""
    from coverage_fold import run_module

    return run_module(module, example)[1]


def _tool_result(tool, *args, reference=None, run=None, count=None) -> dict:
    """BNs left and relative error of one tool's output; an exception is reported, not raised."""
    count = count or count_bn
    try:
        output = tool(*args)
    except Exception as err:  # a baseline tool failing is a finding, not a benchmark error
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"}
    try:
        error = relative_error(reference, run(output))
    except Exception as err:
        return {"left": count(output), "error": f"output does not run: {type(err).__name__}"}
    return {"left": count(output), "rel_error": error}


def coverage() -> list[dict]:
    rows = []
    cases = {**pattern_models(), **zoo_models()}
    for name, (module, shape) in cases.items():
        torch.manual_seed(0)
        module = randomize_bn(module)
        example = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        x = example.numpy()
        with torch.no_grad():
            reference = module(example).numpy()
        total = executed_bn(module, example)
        row = {"model": name, "batchnorm": total, "tools": {}}
        for tool_name, tool in MODULE_TOOLS.items():
            def run(m):
                with torch.no_grad():
                    return m(example).numpy()
            row["tools"][f"module: {tool_name}"] = _tool_result(lambda m: tool(m, example), copy.deepcopy(module),
                                                               reference=reference, run=run,
                                                               count=lambda m: executed_bn(m, example))
        for exporter_name, exporter in (("TorchScript", torchscript_onnx), ("dynamo", dynamo_onnx)):
            try:
                model = exporter(module, example)
            except Exception as err:  # an exporter limitation, reported in the table
                row["tools"][f"{exporter_name} export"] = {"error": f"{type(err).__name__}"}
                continue
            onnx_reference = ort_output(model, x)
            row.setdefault("onnx_batchnorm", {})[exporter_name] = count_bn(model)
            for tool_name, tool in ONNX_TOOLS.items():
                row["tools"][f"{exporter_name}: {tool_name}"] = _tool_result(  # a copy each: some tools edit their input
                    tool, onnx.ModelProto.FromString(model.SerializeToString()), reference=onnx_reference,
                    run=lambda m: ort_output(m, x))
        rows.append(row)
        print(f"  coverage: {name} done", file=sys.stderr)
    return rows


# output ---------------------------------------------------------------------------------

def speed_table(result: dict) -> str:
    seconds, errors = result["seconds"], result.get("errors", {})
    ours = {"ONNX": seconds.get("ONNX: bnexport", math.nan), "module": seconds.get("module: bnexport", math.nan)}
    rows = [("fold", "seconds", "time ÷ bnexport's", "extra peak memory (× weights)")]
    for name, value in seconds.items():
        if name in errors:
            rows.append((name, f"fails: {errors[name]}", "", ""))
            continue
        world = name.split(":")[0]
        memory = result["peak_extra_memory_in_weights"].get(name)
        rows.append((name, f"{value:.3f}", f"{value / ours[world]:.2f}×", "" if memory is None else f"{memory:.2f}"))
    return format_table(rows)


def ratio_lines(result: dict) -> list[str]:
    """Each baseline's time over bnexport's, with the issue's targets where there is one."""
    seconds = result["seconds"]
    lines = []
    for baseline in seconds:
        world, name = baseline.split(": ")
        if name == "bnexport":
            continue
        label = f"{name} ÷ bnexport {world} fold"
        ratio = seconds[baseline] / seconds.get(f"{world}: bnexport", math.nan)
        target = TARGETS.get(label)
        verdict = ""
        if target and math.isfinite(ratio):
            verdict = f" (target ≥ {target[3]:g}×: {'met' if ratio >= target[3] else 'NOT met'})"
        lines.append(f"  {label}: {ratio:.2f}×{verdict}" if math.isfinite(ratio) else f"  {label}: n/a")
    return lines


def process_table(result: dict) -> str:
    rows = [("process", "seconds", "peak RSS MiB", "exit", "imports torch")]
    for name, row in result["rows"].items():
        torch_column = {True: "yes", False: "no", None: "?"}.get(row.get("imports_torch"), "") if "imports_torch" in row else ""
        rows.append((name, f"{row['seconds']:.3f}", f"{row['peak_mib']:.0f}", str(row["exit"]), torch_column))
    lines = [format_table(rows)]
    for key, bound in PROCESS_TARGETS.items():
        ratio = result["ratios"][key]
        lines.append(f"  bnexport {key} ÷ bare: {ratio:.2f}× (target ≤ {bound:g}×: {'met' if ratio <= bound else 'NOT met'})")
    return "\n".join(lines)


def memory_probe(tool_name: str, onnx_path: str) -> int:
    """Run one tool once in this fresh process; return its extra peak resident bytes."""
    world, name = tool_name.split(": ")
    if world == "ONNX":
        model = onnx.load(onnx_path)
        tool = ONNX_TOOLS[name]
        return peak_extra_memory(lambda: tool(model))
    torch.manual_seed(0)
    module = randomize_bn(torchvision.models.resnet50(weights=None))
    example = torch.zeros(INPUT)
    tool = MODULE_TOOLS[name]
    return peak_extra_memory(lambda: tool(module, example))


def scaling_table(rows: list[dict]) -> str:
    table = [("Conv→BN pairs", "ONNX fold s", "ms per BN", "module fold s", "ms per BN")]
    table += [(str(r["batchnorm"]), f"{r['onnx_seconds']:.3f}", f"{r['onnx_ms_per_bn']:.2f}",
               f"{r['module_seconds']:.3f}", f"{r['module_ms_per_bn']:.2f}") for r in rows]
    return format_table(table)


def coverage_table(rows: list[dict]) -> str:
    tools = sorted({t for r in rows for t in r["tools"]}, key=lambda t: (t.split(":")[0] != "module", t))
    table = [("model", "BN", *tools)]
    for r in rows:
        cells = []
        for tool in tools:
            result = r["tools"].get(tool)
            if result is None:
                cells.append("")
            elif "left" not in result:
                cells.append(f"fails ({result['error']})")
            else:
                total = r.get("onnx_batchnorm", {}).get(tool.split(":")[0], r["batchnorm"]) if not tool.startswith("module") else r["batchnorm"]
                folded = total - result["left"]
                wrong = " WRONG" if result.get("rel_error", 0) > 1e-4 else ""
                error = f" {result['rel_error']:.0e}" if "rel_error" in result else f" ({result['error']})"
                cells.append(f"{folded}/{total}{error}{wrong}")
        table.append((r["model"], str(r["batchnorm"]), *cells))
    return format_table(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory probes (a fresh process per tool)")
    parser.add_argument("--skip-processes", action="store_true", help="no whole-process timings of the command line")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and OpenMP) threads (default: torch's own). On a loaded machine use 1: "
                             "with more, thread contention, not the fold, sets the module folds' times")
    parser.add_argument("--memory-probe", nargs=2, metavar=("TOOL", "ONNX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(memory_probe(*args.memory_probe))
        return 0
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "versions": versions(), "load_average_before": os.getloadavg()}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; torch threads: {results['threads']}")
    results["speed"] = speed(args.repeats, memory=not args.skip_memory)
    print(f"resnet50 ({results['speed']['batchnorm']} BN, {results['speed']['weight_mib']:.0f} MiB of weights), "
          f"median of {args.repeats}, parity check excluded:")
    print(speed_table(results["speed"]))
    print("\n".join(ratio_lines(results["speed"])), "\n")
    if not args.skip_processes:
        results["processes"] = processes(args.repeats)
        print(f"whole processes on resnet50's ONNX file ({results['processes']['file_mib']:.0f} MiB), "
              f"median of {args.repeats} after a warm-up:")
        print(process_table(results["processes"]), "\n")
    if not args.skip_scaling:
        results["scaling"] = scaling(args.repeats)
        print(scaling_table(results["scaling"]), "\n")
    if not args.skip_coverage:
        results["coverage"] = coverage()
        print("BatchNorm folded / total, and max |Δ| / max |reference| of the tool's output:")
        print(coverage_table(results["coverage"]))
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxoptimizer", "onnxsim", "onnxslim"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


if __name__ == "__main__":
    raise SystemExit(main())
