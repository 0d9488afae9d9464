"""The main job, stage by stage: data → train → export → fold → parity → summary.

Each stage is a call into the library; this module only decides the order, times the
stages and names the files (``config.ARTIFACTS``) inside the output folder.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .export import writers as exporters
from .artifacts import atomic_path, atomic_write, library_versions, prepare_out_dir, write_json, write_manifest
from .config import (ARTIFACTS, DEFAULT_FIGURE_FORMAT, DEFAULT_TOLERANCE, INPUT_NAME, OUTPUT_NAME, PARITY_BATCH_SIZE,
                     SCHEDULES, SUMMARY_BENCH_RUNS, SUMMARY_BENCH_SECONDS, Tolerance, TrainConfig)
from .data import Dataset, load_for_config, parity_batch
from .distributed.process_group import Replicas
from .errors import BnexportError, first_line
from .fold import FoldReport, fold_module, fold_onnx
from .model import count_batchnorm
from .parity.compare import ParityReport, run_parity
from .parity.runners import (eager_runner, exported_program_runner, onnxruntime_cuda_runner, onnxruntime_runner, output_tensors,
                              torchscript_runner)
from .train.recording import TrainingRecorder, train_twin
from .tables import format_table
from .train.loop import TrainState, load_checkpoint, new_state, resume_state, save_checkpoint, total_steps, train

FILE_DESCRIPTIONS = {
    ARTIFACTS.checkpoint: "trained weights, optimizer state, config and library versions (torch.load weights_only=True)",
    ARTIFACTS.history: "per-step training loss and per-epoch test accuracy",
    ARTIFACTS.torchscript: "TorchScript, BatchNorm kept",
    ARTIFACTS.torchscript_folded: "TorchScript, BatchNorm folded into the conv",
    ARTIFACTS.exported_program: "torch.export ExportedProgram, BatchNorm kept, dynamic batch",
    ARTIFACTS.exported_program_folded: "torch.export ExportedProgram, BatchNorm folded into the conv, dynamic batch",
    ARTIFACTS.onnx: "ONNX, one BatchNormalization node per BN layer",
    ARTIFACTS.onnx_folded: "ONNX, BatchNorm folded into the conv by bnexport",
    ARTIFACTS.fold_report: "per-BatchNorm fold decisions, torch and ONNX",
    ARTIFACTS.parity: "numerical parity of every export against eager, seeded batch",
    ARTIFACTS.summary: "dataset, accuracy, folded BN count, parity verdict, seconds per stage",
    ARTIFACTS.bn_stats: "per-step batch statistics and running statistics of each BatchNorm (first 16 channels)",
    ARTIFACTS.training_curves: "loss and test accuracy of this run and of its twin trained with BatchNorm switched",
    ARTIFACTS.parity_outputs: "raw outputs of the reference and of every parity candidate on the parity batch",
    ARTIFACTS.report: "one-page HTML report: config, accuracy, parity, folding, BN health, every figure",
}


@dataclass
class RunSummary:
    """summary.json: what a run made of its model, for `train-and-export` (dataset, config, epochs and
    accuracy) and for `export` (the model's spec, weights and inputs) alike."""

    batchnorm_layers: int
    dataset: dict | None = None
    config: dict | None = None
    epochs: int | None = None
    test_accuracy: float | None = None
    model: dict | None = None  # export: LoadedModel.describe()
    inputs: dict[str, list[int]] | None = None  # export: the shape of every input the checks fed
    batchnorm_folded: int | None = None
    onnx_ops: dict[str, dict[str, int]] = field(default_factory=dict)
    parity_passed: bool | None = None
    file_sizes: dict[str, int] = field(default_factory=dict)
    bench: dict | None = None  # export: BatchNorm kept against folded, per runtime (bench.time_kept_against_folded)
    figure_data: str | None = None  # export: what the figures were drawn from
    figure_source: dict | None = None  # export: what reads the same figure samples again (visualize)
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    replicas: dict | None = None  # torchrun or --recalibrate-bn: ranks, backend, BN statistics spread and merge

    def to_json(self) -> dict:
        trained = {} if self.model is not None else {
            "dataset": self.dataset, "config": self.config, "epochs": self.epochs, "test_accuracy": self.test_accuracy}
        exported = {} if self.model is None else {
            "model": self.model, "inputs": self.inputs, "figure_data": self.figure_data,
            "figure_source": self.figure_source, "bench": self.bench}
        extra = {} if self.replicas is None else {"replicas": self.replicas}
        return {
            **trained,
            **exported,
            "batchnorm_layers": self.batchnorm_layers,
            "batchnorm_folded": self.batchnorm_folded,
            "onnx_ops": self.onnx_ops,
            "parity": None if self.parity_passed is None else ("pass" if self.parity_passed else "fail"),
            "file_sizes": self.file_sizes,
            "notes": self.notes,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "total_seconds": round(sum(self.stage_seconds.values()), 3),
            "versions": self.versions,
            **extra,
        }

    def _folded_line(self) -> str:
        """The ONNX fold's count against the BatchNormalization nodes it saw: a module called twice, or
        never, makes the module count another number."""
        nodes = self.onnx_ops.get(ARTIFACTS.onnx, {}).get("BatchNormalization")
        if nodes is None or nodes == self.batchnorm_layers:
            return f"{self.batchnorm_folded} of {self.batchnorm_layers}"
        modules = f"{self.batchnorm_layers} BatchNorm module{'s' if self.batchnorm_layers != 1 else ''}"
        return f"{self.batchnorm_folded} of {nodes} in {ARTIFACTS.onnx}, from {modules}"

    def table(self) -> str:
        rows = [("", "")]
        if self.model is not None:
            weights = "random (seed {})".format(self.model["seed"]) if self.model["random_weights"] else \
                (self.model["weights"] or "its own")
            rows.append(("model", f"{self.model['spec']} ({self.model['parameters']:,} parameters), weights {weights}"))
            rows.append(("inputs", ", ".join(f"{n} {'×'.join(map(str, s))}" for n, s in (self.inputs or {}).items())))
        if self.dataset is not None:
            rows.append(("dataset", f"{self.dataset['name']} {'x'.join(map(str, self.dataset['image_shape']))}, "
                                    f"{self.dataset['train_size']} train / {self.dataset['test_size']} test"))
        if self.epochs is not None:
            rows.append(("epochs", str(self.epochs)))
        if self.test_accuracy is not None:
            rows.append(("test accuracy", f"{self.test_accuracy:.2%}"))
        if self.batchnorm_folded is not None:
            rows.append(("BatchNorm folded", self._folded_line()))
        if self.parity_passed is not None:
            rows.append(("parity", "pass" if self.parity_passed else "FAIL"))
        if self.bench:
            rows.append(("folding buys", ", ".join(f"{name} {t['kept_ms']:.2f} → {t['folded_ms']:.2f} ms "
                                                   f"({t['speedup']:.2f}×)" for name, t in self.bench["runtimes"].items())))
        if self.replicas is not None:
            rows.append(("BatchNorm statistics", replicas_line(self.replicas)))
        for note in self.notes:
            rows.append(("note", note))
        seconds = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        rows.append(("time", f"{sum(self.stage_seconds.values()):.1f}s ({seconds})"))
        return "\n".join(format_table(rows).splitlines()[2:])


def file_sizes(out: Path, names) -> dict[str, int]:
    return {name: (out / name).stat().st_size for name in names if (out / name).is_file()}


@contextmanager
def _timed(seconds: dict[str, float], stage: str):
    started = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started


def replicas_line(record: dict) -> str:
    """One line for the summary table: ranks, and what happened to the BN statistics."""
    text = f"{record['world_size']} rank{'s' if record['world_size'] > 1 else ''} ({record['backend'] or 'no process group'}, {record['device']})"
    if record["sync_bn"]:
        text += ", SyncBatchNorm"
    if record["epochs"]:
        spreads = record["epochs"][-1]["spread_before_merge"].values()
        text += (f"; merged, spread before: means {max(s['mean_range_in_std'] for s in spreads):.2g} std, "
                 f"variances {max(s['var_range_relative'] for s in spreads):.2%}")
    if record["recalibration"]:
        text += f"; recalibrated on {record['recalibration']['samples']} samples"
    return text


def run_training(config: TrainConfig, out: Path, *, resume: str | Path | None = None, progress: bool = True,
                 seconds: dict[str, float] | None = None, replicas: Replicas | None = None,
                 recorder: TrainingRecorder | None = None) -> tuple[TrainState, Dataset]:
    """Train (or resume) and write the checkpoint and history.json into ``out`` (rank 0 only).

    With ``recorder`` rank 0 also writes bn_stats.json (when the model has BatchNorm).
    """
    replicas = replicas or Replicas()
    recorder = recorder if replicas.is_main else None
    validate_config(config)
    replicas.check_same("arguments", config.to_json())
    seconds = {} if seconds is None else seconds
    with _timed(seconds, "data"):
        dataset = replicas.together(lambda: load_for_config(config))
    replicas.check_same("data", dataset.describe())
    with _timed(seconds, "train"):
        if resume is not None:
            state = replicas.together(lambda: resume_state(load_checkpoint(resume), config, dataset, path=resume))
        else:
            state = new_state(config, dataset)
        if recorder is not None:
            recorder.attach(state.model, dataset, total_steps=total_steps(config, dataset, replicas=replicas))
        try:
            train(state, dataset, progress=progress and replicas.is_main, on_step=recorder, replicas=replicas)
        finally:
            if recorder is not None:
                recorder.close()
        if replicas.is_main:
            save_checkpoint(state, out / ARTIFACTS.checkpoint)
            write_json(out / ARTIFACTS.history, {**state.history.to_json(), "config": config.to_json()})
    if recorder is not None and recorder.stats.layers:
        write_json(out / ARTIFACTS.bn_stats, recorder.bn_stats(state.history).to_json())
    return state, dataset


def replicas_record(replicas: Replicas) -> dict | None:
    """What summary.json says about ranks and BN statistics; nothing for a plain one-process run."""
    if not (replicas.distributed or replicas.recalibrate_bn):
        return None
    return replicas.to_json()


@dataclass
class Exports:
    """What the export stage wrote and measured, as the later stages use it."""

    fold_reports: dict  # fold.json: the torch and the ONNX fold
    onnx_ops: dict[str, dict[str, int]]  # op counts of model.onnx and model.folded.onnx
    onnx_models: tuple[onnx.ModelProto, onnx.ModelProto]  # model.onnx and model.folded.onnx
    folded_module: torch.nn.Module
    onnx_fold: FoldReport | None = None  # the ONNX fold, for the terminal's table
    parity: ParityReport | None = None
    parity_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # artifact names, in the order they were written
    notes: list[str] = field(default_factory=list)  # what a reader should know: a fallback exporter, a skipped file
    how: dict[str, str] = field(default_factory=dict)  # artifact name → the exporter that wrote it
    timed_runners: tuple = ()  # parity's runners named in TIMED_AGAIN, for `export` to time next


# ONNX Runtime with its optimisations on, BatchNorm kept and folded: parity has run each once, and
# `export` times them next, reusing the sessions (each takes a second or more to build for a large
# model) and taking parity's call as their warm-up.
TIMED_AGAIN = (f"ORT {ARTIFACTS.onnx} (default opt)", f"ORT {ARTIFACTS.onnx_folded} (default opt)")


EXPORT_STAGES = ("fold module", "TorchScript", "torch.export", "ONNX", "fold ONNX", "parity")


class StageBar:
    """One progress bar over named stages; ``start(stage)`` counts the stages started before as done
    and shows ``stage`` as the one under way.

    It draws on a terminal only, as the training bar does: on a pipe or a log file each redraw
    would be a line of its own, mixed into the command's output, so there it writes nothing.
    Stages take very different times, so it shows the time spent and no rate or estimate.
    """

    def __init__(self, stages: tuple[str, ...], *, progress: bool, file=None):
        from tqdm.auto import tqdm

        self._width = max(map(len, stages))  # one width for every name, so that the bar keeps its length
        self._started = 0
        self._bar = tqdm(total=len(stages), desc=stages[0].ljust(self._width), disable=None if progress else True,
                         leave=False, file=file, bar_format="{n_fmt}/{total_fmt} {desc} |{bar}| {elapsed}")

    def start(self, stage: str) -> None:
        self._bar.n = self._started
        self._bar.set_description_str(stage.ljust(self._width))  # draws now: a stage change is never skipped
        self._started += 1

    def close(self) -> None:
        self._bar.close()


def export_stage(model: torch.nn.Module, parity_inputs: tuple[torch.Tensor, ...], out: Path, *,
                 input_names: tuple[str, ...], output_names: list[str] | None, example: tuple[torch.Tensor, ...],
                 seed: int, tolerance: Tolerance = DEFAULT_TOLERANCE, expected_batchnorm: int | None = None,
                 dynamic_batch: bool = True, progress: bool = False, label: str = "the model",
                 seconds: dict[str, float] | None = None, bar: StageBar | None = None) -> Exports:
    """Fold, write every export (BatchNorm kept and folded) and fold.json, then check every export
    against eager on ``parity_inputs``: the one export pipeline of ``train-and-export`` and ``export``.

    ``example`` is what the exporters trace (a batch of 2 or more for a dynamic batch axis);
    ``expected_batchnorm`` is how many BatchNorm calls model.onnx must show (default: the BN modules).
    TorchScript falls back from script to trace, and ONNX from the dynamo exporter to the TorchScript
    one; a torch.export failure skips the two .pt2 files with a note. ONNX that neither exporter
    writes ends the run with a ``BnexportError`` naming both. ``bar``, from a caller with stages
    of its own around this one, is taken through ``EXPORT_STAGES`` and left open; without it the
    stage draws a bar of its own when ``progress`` is on.
    """
    seconds = {} if seconds is None else seconds
    notes: list[str] = []
    how: dict[str, str] = {}
    written: list[str] = []
    own_bar = bar is None
    bar = StageBar(EXPORT_STAGES, progress=progress) if own_bar else bar
    try:
        with _timed(seconds, "export"):
            bar.start("fold module")
            folded_module, torch_report = fold_module(model, check=False, example_inputs=example)  # checked below
            bar.start("TorchScript")
            for module, name in ((model, ARTIFACTS.torchscript), (folded_module, ARTIFACTS.torchscript_folded)):
                try:
                    how[name] = "torch.jit." + exporters.export_torchscript(module, out / name, example=example)
                    written.append(name)
                except BnexportError as err:
                    notes.append(f"{name} not written: {err}")
            if how.get(ARTIFACTS.torchscript) == "torch.jit.trace":
                notes.append(f"{label} is not scriptable: the TorchScript files are traced at the example's shapes, "
                             "so data-dependent branches are frozen")
            bar.start("torch.export")
            for module, name in ((model, ARTIFACTS.exported_program), (folded_module, ARTIFACTS.exported_program_folded)):
                try:
                    exporters.export_program(module, example, out / name, dynamic_batch=dynamic_batch)
                    how[name] = "torch.export"
                    written.append(name)
                except Exception as err:  # torch.export's own errors: a graph break, an unsupported op
                    skipped = " and ".join(n for n in (ARTIFACTS.exported_program, ARTIFACTS.exported_program_folded)
                                           if n not in written)
                    notes.append(f"{skipped} not written: torch.export cannot export {label} ({first_line(err)})")
                    break
            bar.start("ONNX")
            onnx_model, how[ARTIFACTS.onnx] = exporters.to_onnx_with_fallback(
                model, example, input_names=list(input_names), output_names=output_names, dynamic_batch=dynamic_batch,
                label=label)
            if how[ARTIFACTS.onnx] != "dynamo":
                notes.append(f"{ARTIFACTS.onnx}: the dynamo exporter failed, so the TorchScript exporter wrote it")
            bar.start("fold ONNX")
            folded_onnx, onnx_report = fold_onnx(onnx_model, check=False)
            ops = {ARTIFACTS.onnx: exporters.op_counts(onnx_model), ARTIFACTS.onnx_folded: exporters.op_counts(folded_onnx)}
            expected = count_batchnorm(model) if expected_batchnorm is None else expected_batchnorm
            found = ops[ARTIFACTS.onnx].get("BatchNormalization", 0)
            if found < expected:
                raise RuntimeError(f"exporter wrote {found} BatchNormalization nodes for {expected} BN calls; "
                                   "check ONNX_EXPORT_OPTIONS")
            if found > expected:
                notes.append(f"{ARTIFACTS.onnx} has {found} BatchNormalization nodes for {expected} BN module calls: "
                             "the others come from functional batch_norm calls")
            folded_bytes = folded_onnx.SerializeToString()  # once, for the check and the file: 0.1 s per 100 MB
            onnx.checker.check_model(folded_bytes, full_check=True)
            exporters.save_onnx(onnx_model, out / ARTIFACTS.onnx)
            atomic_write(out / ARTIFACTS.onnx_folded, lambda tmp: tmp.write_bytes(folded_bytes))
            written += [ARTIFACTS.onnx, ARTIFACTS.onnx_folded]
            how[ARTIFACTS.onnx_folded] = "bnexport fold"
            reports = {"torch": torch_report.to_json(), "onnx": onnx_report.to_json()}
            write_json(out / ARTIFACTS.fold_report, reports)
            written.append(ARTIFACTS.fold_report)
        bar.start("parity")
        exports = Exports(reports, ops, (onnx_model, folded_onnx), folded_module, onnx_report, written=written,
                          notes=notes, how=how)
        with _timed(seconds, "parity"):
            candidates = parity_runners(folded_module, out, written=written)
            exports.parity, exports.parity_outputs = check_exports(model, folded_module, out, parity_inputs,
                                                                   input_names=input_names, seed=seed,
                                                                   tolerance=tolerance, candidates=candidates)
            exports.timed_runners = tuple(candidates[name] for name in TIMED_AGAIN)
        exports.written += [ARTIFACTS.parity, ARTIFACTS.parity_outputs]
    finally:
        if own_bar:
            bar.close()
    return exports


def parity_runners(folded_module: torch.nn.Module, out: Path, *, written: list[str] | None = None) -> dict:
    """A runner for the folded module and for every export in ``out``, by the name parity reports it
    under. ``written`` lists the export files that exist (all of them by default)."""
    present = set(written) if written is not None else None

    def exists(name: str) -> bool:
        return present is None or name in present

    candidates = {"eager folded": eager_runner(folded_module)}
    files = {
        "TorchScript": (ARTIFACTS.torchscript, torchscript_runner),
        "TorchScript folded": (ARTIFACTS.torchscript_folded, torchscript_runner),
        "torch.export": (ARTIFACTS.exported_program, exported_program_runner),
        "torch.export folded": (ARTIFACTS.exported_program_folded, exported_program_runner),
    }
    for name, (file, load) in files.items():
        if exists(file):
            candidates[name] = load(out / file)
    for file in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded):
        candidates[f"ORT {file} (no graph opt)"] = onnxruntime_runner(out / file, optimize=False)
        candidates[f"ORT {file} (default opt)"] = onnxruntime_runner(out / file, optimize=True)
    for name in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded):  # where onnxruntime has a working CUDA provider
        cuda = onnxruntime_cuda_runner(out / name)
        if cuda is not None:
            candidates[f"ORT {name} (CUDA)"] = cuda
    return candidates


def check_exports(model: torch.nn.Module, folded_module: torch.nn.Module, out: Path, inputs, *,
                  seed: int, tolerance: Tolerance = DEFAULT_TOLERANCE, input_names: tuple[str, ...] = (INPUT_NAME,),
                  written: list[str] | None = None, candidates: dict | None = None) -> tuple[ParityReport, dict[str, np.ndarray]]:
    """Every export against the unfolded eager model, on the same seeded input (a tensor, or one per
    input name); writes parity.json and parity_outputs.npz, and returns the report and those raw outputs.
    ``candidates`` are the runners checked (default: ``parity_runners(folded_module, out, written=written)``)."""
    candidates = parity_runners(folded_module, out, written=written) if candidates is None else candidates
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    feeds = {name: tensor.numpy() for name, tensor in zip(input_names, tensors)}
    outputs: dict[str, np.ndarray] = {}

    def keeping_output(name: str, runner):  # the parity figure needs every |Δ|, not only the summary
        def run(batch):
            result = runner(batch)
            if isinstance(result, dict) and len(result) > 1:  # one entry per output, named as the parity results are:
                # by position, as compare_outputs names them after eager's "output i" (ONNX Runtime's are output_i)
                outputs.update({f"{name} [output {i}]": np.asarray(value) for i, value in enumerate(result.values())})
                outputs.setdefault(name, np.asarray(next(iter(result.values()))))
            else:
                outputs[name] = np.asarray(next(iter(result.values())) if isinstance(result, dict) else result)
            return result
        return run

    report = run_parity(keeping_output("reference", eager_runner(model)),
                        {name: keeping_output(name, runner) for name, runner in candidates.items()},
                        feeds, reference_name="eager (BatchNorm kept)", seed=seed, tolerance=tolerance)
    write_json(out / ARTIFACTS.parity, report.to_json())
    with atomic_path(out / ARTIFACTS.parity_outputs) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **outputs)
    return report, outputs


def train_and_export(config: TrainConfig, out: Path, *, resume: str | Path | None = None, progress: bool = True,
                     tolerance: Tolerance = DEFAULT_TOLERANCE, compare_bn: bool = True,
                     figure_format: str = DEFAULT_FIGURE_FORMAT,
                     replicas: Replicas | None = None) -> tuple[RunSummary | None, ParityReport | None]:
    """The main job. Under torchrun every rank trains; rank 0 alone exports, checks and writes
    (the others return (None, None) once the statistics are pooled). ``compare_bn`` also trains
    the twin with BatchNorm switched, for the curves figure."""
    replicas = replicas or Replicas()
    seconds: dict[str, float] = {}
    recorder = TrainingRecorder()
    state, dataset = run_training(config, out, resume=resume, progress=progress, seconds=seconds,
                                  replicas=replicas, recorder=recorder)
    if not replicas.is_main:
        return None, None
    runs = [recorder.curves(state.history, batch_norm=config.batch_norm)]
    if compare_bn:
        with _timed(seconds, "compare"):
            if progress:
                print(f"training the same run {'without' if config.batch_norm else 'with'} BatchNorm for comparison "
                      f"(--skip-no-bn skips it)", flush=True)
            runs.append(train_twin(config, dataset, progress=progress))
    write_json(out / ARTIFACTS.training_curves, {"config": config.to_json(), "runs": [run.to_json() for run in runs]})
    model = state.model.eval()
    inputs = parity_batch(dataset, seed=config.seed, size=PARITY_BATCH_SIZE)
    exports = export_stage(model, (inputs,), out, input_names=(INPUT_NAME,), output_names=[OUTPUT_NAME],
                           example=(inputs[:2],), seed=config.seed, tolerance=tolerance, progress=progress,
                           label="SimpleCNN", seconds=seconds)
    parity, outputs = exports.parity, exports.parity_outputs
    summary = RunSummary(
        dataset=dataset.describe(), config=config.to_json(), epochs=state.epoch,
        test_accuracy=state.history.test_accuracy[-1] if state.history.test_accuracy else None,
        batchnorm_layers=count_batchnorm(model), batchnorm_folded=exports.fold_reports["onnx"]["folded"],
        onnx_ops=exports.onnx_ops, parity_passed=parity.passed, file_sizes=file_sizes(out, exports.written),
        notes=exports.notes, stage_seconds=seconds, replicas=replicas_record(replicas),
    )
    from .viz.visualize import VisualizeInputs, visualize  # matplotlib is needed by this stage only, not by `train`

    # What the run holds, as visualize would read it back from the files written above. The
    # report shows the summary as it stands before this stage; summary.json, written once
    # after it, adds the stage's own seconds.
    held = VisualizeInputs.from_training(
        model=model, config=config, dataset=dataset, history=state.history, parity=parity.to_json(),
        parity_outputs=outputs, fold=exports.fold_reports, onnx_models=exports.onnx_models, runs=runs,
        bn_stats=recorder.bn_stats(state.history) if recorder.stats.layers else None, summary=summary.to_json(),
    )
    with _timed(seconds, "visualize"):
        figures = visualize(out, figure_format=figure_format, inputs=held)
    write_json(out / ARTIFACTS.summary, summary.to_json())
    write_manifest(out, {**FILE_DESCRIPTIONS, **figures.descriptions()}, name=ARTIFACTS.manifest)
    return summary, parity


def train_only(config: TrainConfig, out: Path, *, resume: str | Path | None = None, progress: bool = True,
               replicas: Replicas | None = None) -> RunSummary | None:
    """Train and write checkpoint, history and summary; under torchrun only rank 0 returns a summary."""
    replicas = replicas or Replicas()
    seconds: dict[str, float] = {}
    state, dataset = run_training(config, out, resume=resume, progress=progress, seconds=seconds, replicas=replicas)
    if not replicas.is_main:
        return None
    summary = RunSummary(
        dataset=dataset.describe(), config=config.to_json(), epochs=state.epoch,
        test_accuracy=state.history.test_accuracy[-1] if state.history.test_accuracy else None,
        batchnorm_layers=count_batchnorm(state.model), stage_seconds=seconds, replicas=replicas_record(replicas),
    )
    write_json(out / ARTIFACTS.summary, summary.to_json())
    written = (ARTIFACTS.checkpoint, ARTIFACTS.history, ARTIFACTS.summary)
    write_manifest(out, {name: FILE_DESCRIPTIONS[name] for name in written}, name=ARTIFACTS.manifest)
    return summary


def validate_config(config: TrainConfig) -> None:
    if config.epochs < 1:
        raise BnexportError(f"--epochs must be a positive integer, got {config.epochs}")
    if config.batch_size < 1:
        raise BnexportError(f"--batch-size must be a positive integer, got {config.batch_size}")
    if not config.lr > 0:
        raise BnexportError(f"--lr must be positive, got {config.lr}")
    if config.shift < 0:
        raise BnexportError(f"--shift must be 0 or more pixels, got {config.shift}")
    if config.schedule not in SCHEDULES:
        raise BnexportError(f"--schedule must be {' or '.join(SCHEDULES)}, got {config.schedule!r}")


# `export`: a user's model through the same export stage, no training ----------------------

EXPORT_DESCRIPTIONS = {
    **{name: text for name, text in FILE_DESCRIPTIONS.items()
       if name not in (ARTIFACTS.checkpoint, ARTIFACTS.history, ARTIFACTS.bn_stats, ARTIFACTS.training_curves)},
    ARTIFACTS.summary: "model spec, weights, inputs, folded BN count, parity verdict, what folding buys, seconds per stage",
    ARTIFACTS.report: "one-page HTML report: summary, BN health, folding, parity, figures",
}


def export_model(loaded, shapes: dict[str, tuple[int, ...]], out: Path, *, seed: int | None = None,
                 tolerance: Tolerance = DEFAULT_TOLERANCE, figure_data=None, figure_format: str = DEFAULT_FIGURE_FORMAT,
                 bench: bool = True, progress: bool = True) -> tuple[RunSummary, ParityReport, FoldReport]:
    """Export a user's model (a ``bnexport.model_spec.LoadedModel``) to ``out``: every file that
    ``train-and-export`` writes after training, with its report and figures.

    The model first runs once on seeded input of ``shapes`` (input name → shape); a model that
    rejects it ends the run before anything is written, naming the layer. The files are written in
    a staging folder beside ``out`` and moved in when all of them are there, so a run that fails
    leaves ``out`` as it was. ``figure_data`` is a ``bnexport.data.FigureData`` (default: seeded
    synthetic input). Returns the summary, the parity report and the ONNX fold's report; the caller decides the exit status.
    """
    import shutil
    import tempfile

    from .bench import time_kept_against_folded
    from .data import load_figure_data
    from .model_spec import run_checked, seeded_tensors

    seed = loaded.seed if seed is None else seed
    out = Path(out)
    _check_out_can_be_a_folder(out)
    model = loaded.module.eval()
    seconds: dict[str, float] = {}
    label = loaded.spec
    stages = ("check input", *EXPORT_STAGES, *(("bench",) if bench else ()), "figures")
    bar = StageBar(stages, progress=progress)
    bar.start("check input")
    try:
        with _timed(seconds, "check input"):
            parity_inputs = seeded_tensors(shapes, seed=seed)
            output, batchnorm_calls = run_checked(model, parity_inputs, shapes=shapes, spec=label)
            given_batch = next(iter(shapes.values()))[0]
            example, dynamic_batch, notes = parity_inputs, True, list(loaded.notes)
            if given_batch < 2:  # torch.export makes a batch of 1 a constant: trace at 2, check at the given shape
                example = seeded_tensors(shapes, seed=seed, batch=2)
                try:
                    run_checked(model, example, shapes={n: (2, *s[1:]) for n, s in shapes.items()}, spec=label)
                except BnexportError:
                    example, dynamic_batch = parity_inputs, False
                    notes.append(f"{label} does not run at batch 2, so the exports keep the batch size fixed at {given_batch}")
        outputs = output_tensors(output)
        output_names = [OUTPUT_NAME] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]  # innermost first
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        except OSError as err:
            raise BnexportError(f"--out {out}: cannot write beside it ({err.strerror or err})") from None
    except BaseException:
        bar.close()  # before the error is printed, which the bar's line would garble
        raise
    try:
        exports = export_stage(model, parity_inputs, staging, input_names=loaded.input_names, output_names=output_names,
                               example=example, seed=seed, tolerance=tolerance, expected_batchnorm=batchnorm_calls,
                               dynamic_batch=dynamic_batch, label=label, seconds=seconds, bar=bar)
        exports.notes = notes + exports.notes
        bench_result = None
        if bench:
            bar.start("bench")
            with _timed(seconds, "bench"):
                feeds = {name: tensor.numpy() for name, tensor in zip(loaded.input_names, parity_inputs)}
                runners = {"eager": (eager_runner(model), eager_runner(exports.folded_module)),
                           "ONNX Runtime": exports.timed_runners}
                # parity has just run each of these on the same feeds: that call is the warm-up
                bench_result = time_kept_against_folded(runners, feeds, warmup=0, min_runs=SUMMARY_BENCH_RUNS,
                                                        min_seconds=SUMMARY_BENCH_SECONDS)
        exports.timed_runners = ()  # the sessions' memory goes before the figures are drawn
        summary = RunSummary(
            batchnorm_layers=count_batchnorm(model), model=loaded.describe(),
            inputs={name: list(shape) for name, shape in shapes.items()},
            batchnorm_folded=exports.fold_reports["onnx"]["folded"], onnx_ops=exports.onnx_ops,
            parity_passed=exports.parity.passed, file_sizes=file_sizes(staging, exports.written), bench=bench_result,
            notes=exports.notes, stage_seconds=seconds,
        )
        bar.start("figures")
        with _timed(seconds, "visualize"):
            figures = figure_data or load_figure_data(shapes, seed=seed)
            summary.figure_data, summary.figure_source = figures.description, figures.source
            from .viz.visualize import VisualizeInputs, visualize

            held = VisualizeInputs(
                model=model, figure_inputs=figures.inputs, figure_data=figures.description, synthetic=figures.synthetic,
                parity=exports.parity.to_json(), parity_outputs=exports.parity_outputs, fold=exports.fold_reports,
                onnx_models=exports.onnx_models, summary=summary.to_json(),
            )
            drawn = visualize(staging, figure_format=figure_format, inputs=held, published=out)
        write_json(staging / ARTIFACTS.summary, summary.to_json())
        write_manifest(staging, {**EXPORT_DESCRIPTIONS, **drawn.descriptions()}, name=ARTIFACTS.manifest)
        _publish(staging, out)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
        if not out.exists():  # a failed run leaves no folder it made for --out either
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return summary, exports.parity, exports.onnx_fold


def _check_out_can_be_a_folder(out: Path) -> None:
    """Before any export: --out, or the nearest of its parents that exists, must be a folder."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise BnexportError(f"--out {out}: {folder} exists and is not a folder")
            return


def _publish(staging: Path, out: Path) -> None:
    """Move every file of ``staging`` into ``out``, replacing what is there under the same names
    (the figures folder as a whole, so that no figure of an older run stays behind)."""
    import os
    import shutil

    prepare_out_dir(out)
    for stale in EXPORT_DESCRIPTIONS:  # an older run's file that this run did not write (a skipped .pt2) goes
        if not (staging / stale).exists() and (out / stale).is_file():
            (out / stale).unlink()
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if entry.is_dir():
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        else:
            os.replace(entry, target)
