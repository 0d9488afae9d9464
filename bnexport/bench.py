"""Inference latency: what folding BatchNorm buys at run time, per runtime and batch size.

Each runner is timed on the same seeded input: a few warm-up calls, then repeated calls
until both ``min_runs`` and ``min_seconds`` are reached; the median is reported, with its
ratio to the first runner (the baseline) at the same batch size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .config import BENCH_BATCHES, BENCH_MIN_RUNS, BENCH_MIN_SECONDS, BENCH_WARMUP, DEFAULT_SEED
from .errors import BnexportError
from .tables import format_table

Runner = Callable[[np.ndarray], object]


@dataclass
class Timing:
    name: str
    batch: int
    median_ms: float
    min_ms: float
    runs: int
    ratio: float  # median / the baseline's median at this batch size


@dataclass
class BenchReport:
    model: str
    baseline: str
    threads: int
    timings: list[Timing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # a runtime left out, and why

    def to_json(self) -> dict:
        data = {"model": self.model, "baseline": self.baseline, "threads": self.threads,
                "timings": [asdict(t) for t in self.timings]}
        if self.notes:
            data["notes"] = self.notes
        return data

    def table(self) -> str:
        rows = [("runtime", "batch", "median ms", "min ms", f"vs {self.baseline}")]
        rows += [(t.name, str(t.batch), f"{t.median_ms:.3f}", f"{t.min_ms:.3f}", f"{t.ratio:.2f}×") for t in self.timings]
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return (format_table(rows) + f"\n{self.model}; {self.threads} thread(s) for torch and ONNX Runtime; "
                "median of repeated calls" + notes)


def measure(run: Callable[[], object], *, warmup: int = BENCH_WARMUP, min_runs: int = BENCH_MIN_RUNS,
            min_seconds: float = BENCH_MIN_SECONDS) -> list[float]:
    """Seconds per call, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return times


def bench(runners: dict[str, Runner], input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]], *,
          batches: tuple[int, ...] = BENCH_BATCHES, model: str = "model", seed: int = DEFAULT_SEED,
          min_seconds: float = BENCH_MIN_SECONDS, min_runs: int = BENCH_MIN_RUNS) -> BenchReport:
    """Time every runner at every batch size; the first runner is the baseline.

    ``input_shape`` is the one input's shape, or float32 inputs' shapes by name (fed to the
    runners by name); the batch sizes replace each one's first dim.
    """
    baseline = next(iter(runners))
    report = BenchReport(model=model, baseline=baseline, threads=torch.get_num_threads())
    for batch in batches:
        inputs = batch_inputs(input_shape, batch, seed=seed)
        base_median = None
        for name, runner in runners.items():
            times = measure(lambda: runner(inputs), min_seconds=min_seconds, min_runs=min_runs)
            median = statistics.median(times)
            base_median = median if base_median is None else base_median
            report.timings.append(Timing(name, batch, median * 1e3, min(times) * 1e3, len(times), median / base_median))
    return report


def batch_inputs(input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]], batch: int, *, seed: int):
    """Seeded standard-normal input at ``batch``: one array for one input, feeds by name for several."""
    from .parity.compare import seeded_input
    from .parity.inputs import seeded_value

    if not isinstance(input_shape, Mapping):
        return seeded_input((batch, *input_shape[1:]), seed=seed)
    if len(input_shape) == 1:
        return seeded_input((batch, *next(iter(input_shape.values()))[1:]), seed=seed)
    return {name: seeded_value((batch, *shape[1:]), "float32", seed=seed, index=index)
            for index, (name, shape) in enumerate(input_shape.items())}


def onnx_runners(unfolded: onnx.ModelProto, folded: onnx.ModelProto | None, *, threads: int | None = None) -> dict[str, Runner]:
    """ONNX Runtime (CPU) with its graph optimisations disabled and at their default, unfolded and folded."""
    from .export.writers import onnx_bytes
    from .parity.runners import onnxruntime_runner

    runners = {}
    for label, model in (("unfolded", unfolded), ("folded", folded)):
        if model is None:
            continue
        data = onnx_bytes(model)
        runners[f"ORT {label} (no graph opt)"] = onnxruntime_runner(data, optimize=False, threads=threads)
        runners[f"ORT {label} (default opt)"] = onnxruntime_runner(data, optimize=True, threads=threads)
    return runners


def module_runners(module: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], *,
                   input_names: tuple[str, ...] | None = None, threads: int | None = None,
                   notes: list[str] | None = None, label: str = "the model") -> dict[str, Runner]:
    """Eager unfolded (the baseline) and folded, TorchScript folded, and ONNX Runtime on both exports.

    ``example`` (one tensor, or one per input, a batch of 2 or more) is what the exporters trace;
    the ONNX inputs are called ``input_names``. TorchScript falls back from script to trace, and
    ONNX from the dynamo exporter to the TorchScript one; a runtime that cannot take the model is
    left out, with a line in ``notes`` saying why.
    """
    from .export.writers import to_onnx_with_fallback, to_torchscript
    from .fold import fold_module, fold_onnx
    from .parity.runners import eager_runner

    notes = [] if notes is None else notes
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    folded, _ = fold_module(module, example_inputs=example, check=False)  # bench times; `fold` and `parity` verify
    runners = {
        "eager unfolded": eager_runner(module),
        "eager folded": eager_runner(folded),
    }
    try:
        scripted, how = to_torchscript(folded, example=example)
        runners["TorchScript folded"] = eager_runner(scripted.eval())
        if how == "trace":
            notes.append(f"TorchScript folded: {label} is not scriptable, so it is traced at the example's shapes")
    except BnexportError as err:
        notes.append(f"TorchScript folded left out: {err}")
    try:
        unfolded_onnx, _ = to_onnx_with_fallback(module, example, input_names=None if input_names is None
                                                 else list(input_names), label=label)
    except BnexportError as err:
        notes.append(f"ONNX Runtime left out: {err}")
        return runners
    folded_onnx, _ = fold_onnx(unfolded_onnx, check=False)
    runners.update(onnx_runners(unfolded_onnx, folded_onnx, threads=threads))
    return runners


def bench_file(path: str | Path, *, input_shapes=None, threads: int | None = None, weights: str | Path | None = None,
               **timing) -> BenchReport:
    """Time the model in an ONNX file, a bnexport checkpoint or a model spec, BatchNorm kept and folded.

    An ONNX file is timed in ONNX Runtime, unfolded and folded; a torch module (a checkpoint's, or
    the model a spec names, filled from ``weights``) in eager torch, TorchScript and ONNX Runtime
    (see ``module_runners``). The folds are not checked: ``fold`` and ``parity`` verify, this only
    times. ``input_shapes`` is the one input's shape (a bare shape, or one NAME=shape), or a
    model spec's inputs by name; ``threads`` sets torch's and ONNX Runtime's thread counts;
    ``timing`` (batches, seed, min_seconds, min_runs) goes to ``bench``, and its seed also seeds a
    model spec's weights when ``weights`` is None.
    """
    from .fold import fold_onnx
    from .parity.sources import load_source, module_feeds, names_a_spec, single_shape

    seed = timing.get("seed", DEFAULT_SEED)
    given = None if names_a_spec(path) else single_shape(Path(path), input_shapes)
    source = load_source(path, input_shape=given, weights=weights, seed=seed)
    if threads:
        torch.set_num_threads(threads)
    if source.kind == "onnx":
        folded, _ = fold_onnx(source.onnx_model, check=False)
        runners = onnx_runners(source.onnx_model, folded, threads=threads)
        return bench(runners, given or source.input_shape, model=str(path), **timing)
    from .model_spec import run_checked, seeded_tensors

    shapes = {feed.name: feed.shape for feed in module_feeds(source, input_shapes)}
    run_checked(source.module, seeded_tensors(shapes, seed=seed), shapes=shapes, spec=source.name)
    # a batch of 2 for the exporters: a batch of 1 would leave ONNX and TorchScript fixed at 1
    notes: list[str] = []
    runners = module_runners(source.module, seeded_tensors(shapes, seed=seed, batch=2), input_names=tuple(shapes),
                             threads=threads, notes=notes, label=source.name)
    report = bench(runners, shapes, model=str(path), **timing)
    report.notes = notes
    return report


def time_kept_against_folded(runners: dict[str, tuple[Runner, Runner]], feeds, *, warmup: int = 1,
                             min_runs: int = BENCH_MIN_RUNS, min_seconds: float = BENCH_MIN_SECONDS) -> dict:
    """What folding buys, per runtime: median ms with BatchNorm kept and folded, on ``feeds``.

    ``runners`` maps a runtime to its (kept, folded) pair; the two are timed alternately in the
    same loop, so that a machine that slows down mid-run slows both alike.
    """
    result = {}
    for name, (kept, folded) in runners.items():
        times = {"kept": [], "folded": []}
        for _ in range(warmup):
            kept(feeds)
            folded(feeds)
        started = time.perf_counter()
        while len(times["kept"]) < min_runs or time.perf_counter() - started < min_seconds:
            for which, run in (("kept", kept), ("folded", folded)):
                begin = time.perf_counter()
                run(feeds)
                times[which].append(time.perf_counter() - begin)
        kept_ms, folded_ms = (statistics.median(times[k]) * 1e3 for k in ("kept", "folded"))
        result[name] = {"kept_ms": round(kept_ms, 4), "folded_ms": round(folded_ms, 4),
                        "speedup": round(kept_ms / folded_ms, 4), "runs": len(times["kept"])}
    return {"threads": torch.get_num_threads(), "runtimes": result}
