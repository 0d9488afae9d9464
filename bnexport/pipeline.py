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
from .artifacts import atomic_path, library_versions, write_json, write_manifest
from .config import ARTIFACTS, DEFAULT_FIGURE_FORMAT, DEFAULT_TOLERANCE, PARITY_BATCH_SIZE, SCHEDULES, Tolerance, TrainConfig
from .data import Dataset, load_for_config, parity_batch
from .distributed.process_group import Replicas
from .errors import BnexportError
from .fold import FoldReport, fold_module, fold_onnx
from .model import count_batchnorm
from .parity.compare import ParityReport, run_parity
from .parity.runners import (eager_runner, exported_program_runner, onnxruntime_cuda_runner, onnxruntime_runner,
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
    dataset: dict
    config: dict
    epochs: int
    test_accuracy: float | None
    batchnorm_layers: int
    batchnorm_folded: int | None = None
    onnx_ops: dict[str, dict[str, int]] = field(default_factory=dict)
    parity_passed: bool | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    replicas: dict | None = None  # torchrun or --recalibrate-bn: ranks, backend, BN statistics spread and merge

    def to_json(self) -> dict:
        extra = {} if self.replicas is None else {"replicas": self.replicas}
        return {
            "dataset": self.dataset,
            "config": self.config,
            "epochs": self.epochs,
            "test_accuracy": self.test_accuracy,
            "batchnorm_layers": self.batchnorm_layers,
            "batchnorm_folded": self.batchnorm_folded,
            "onnx_ops": self.onnx_ops,
            "parity": None if self.parity_passed is None else ("pass" if self.parity_passed else "fail"),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "total_seconds": round(sum(self.stage_seconds.values()), 3),
            "versions": self.versions,
            **extra,
        }

    def table(self) -> str:
        rows = [("", "")]
        rows.append(("dataset", f"{self.dataset['name']} {'x'.join(map(str, self.dataset['image_shape']))}, "
                                f"{self.dataset['train_size']} train / {self.dataset['test_size']} test"))
        rows.append(("epochs", str(self.epochs)))
        if self.test_accuracy is not None:
            rows.append(("test accuracy", f"{self.test_accuracy:.2%}"))
        if self.batchnorm_folded is not None:
            rows.append(("BatchNorm folded", f"{self.batchnorm_folded} of {self.batchnorm_layers}"))
        if self.parity_passed is not None:
            rows.append(("parity", "pass" if self.parity_passed else "FAIL"))
        if self.replicas is not None:
            rows.append(("BatchNorm statistics", replicas_line(self.replicas)))
        seconds = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        rows.append(("time", f"{sum(self.stage_seconds.values()):.1f}s ({seconds})"))
        return "\n".join(format_table(rows).splitlines()[2:])


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
    """What ``export_all`` wrote, as the later stages use it."""

    fold_reports: dict  # fold.json: the torch and the ONNX fold
    onnx_ops: dict[str, dict[str, int]]  # op counts of model.onnx and model.folded.onnx
    onnx_models: tuple[onnx.ModelProto, onnx.ModelProto]  # model.onnx and model.folded.onnx


def export_all(model: torch.nn.Module, folded_module: torch.nn.Module, torch_report: FoldReport,
               example: torch.Tensor, out: Path) -> Exports:
    """Write every export, BN kept and folded, and fold.json."""
    exporters.export_torchscript(model, out / ARTIFACTS.torchscript)
    exporters.export_torchscript(folded_module, out / ARTIFACTS.torchscript_folded)
    exporters.export_program(model, example, out / ARTIFACTS.exported_program)
    onnx_model = exporters.to_onnx(model, example)
    folded_onnx, onnx_report = fold_onnx(onnx_model, check=False)
    ops = {ARTIFACTS.onnx: exporters.op_counts(onnx_model), ARTIFACTS.onnx_folded: exporters.op_counts(folded_onnx)}
    expected_bn = count_batchnorm(model)
    if ops[ARTIFACTS.onnx].get("BatchNormalization", 0) != expected_bn:
        raise RuntimeError(f"exporter wrote {ops[ARTIFACTS.onnx].get('BatchNormalization', 0)} BatchNormalization nodes "
                           f"for {expected_bn} BN layers; check ONNX_EXPORT_OPTIONS")
    onnx.checker.check_model(folded_onnx, full_check=True)
    exporters.save_onnx(onnx_model, out / ARTIFACTS.onnx)
    exporters.save_onnx(folded_onnx, out / ARTIFACTS.onnx_folded)
    reports = {"torch": torch_report.to_json(), "onnx": onnx_report.to_json()}
    write_json(out / ARTIFACTS.fold_report, reports)
    return Exports(reports, ops, (onnx_model, folded_onnx))


def check_exports(model: torch.nn.Module, folded_module: torch.nn.Module, out: Path, inputs: torch.Tensor, *,
                  seed: int, tolerance: Tolerance = DEFAULT_TOLERANCE) -> tuple[ParityReport, dict[str, np.ndarray]]:
    """Every export against the unfolded eager model, on the same seeded test batch; writes
    parity.json and parity_outputs.npz, and returns the report and those raw outputs."""
    candidates = {
        "eager folded": eager_runner(folded_module),
        "TorchScript": torchscript_runner(out / ARTIFACTS.torchscript),
        "TorchScript folded": torchscript_runner(out / ARTIFACTS.torchscript_folded),
        "torch.export": exported_program_runner(out / ARTIFACTS.exported_program),
        "ORT model.onnx (no graph opt)": onnxruntime_runner(out / ARTIFACTS.onnx, optimize=False),
        "ORT model.onnx (default opt)": onnxruntime_runner(out / ARTIFACTS.onnx, optimize=True),
        "ORT model.folded.onnx (no graph opt)": onnxruntime_runner(out / ARTIFACTS.onnx_folded, optimize=False),
        "ORT model.folded.onnx (default opt)": onnxruntime_runner(out / ARTIFACTS.onnx_folded, optimize=True),
    }
    for name in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded):  # where onnxruntime has a working CUDA provider
        cuda = onnxruntime_cuda_runner(out / name)
        if cuda is not None:
            candidates[f"ORT {name} (CUDA)"] = cuda
    outputs: dict[str, np.ndarray] = {}

    def keeping_output(name: str, runner):  # the parity figure needs every |Δ|, not only the summary
        def run(batch: np.ndarray) -> np.ndarray:
            outputs[name] = runner(batch)
            return outputs[name]
        return run

    report = run_parity(keeping_output("reference", eager_runner(model)),
                        {name: keeping_output(name, runner) for name, runner in candidates.items()},
                        inputs.numpy(), reference_name="eager (BatchNorm kept)", seed=seed, tolerance=tolerance)
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
    with _timed(seconds, "export"):
        folded_module, torch_report = fold_module(model, check=False)  # checked below, with every export
        exports = export_all(model, folded_module, torch_report, inputs[:2], out)
    with _timed(seconds, "parity"):
        parity, outputs = check_exports(model, folded_module, out, inputs, seed=config.seed, tolerance=tolerance)
    summary = RunSummary(
        dataset=dataset.describe(), config=config.to_json(), epochs=state.epoch,
        test_accuracy=state.history.test_accuracy[-1] if state.history.test_accuracy else None,
        batchnorm_layers=count_batchnorm(model), batchnorm_folded=exports.fold_reports["onnx"]["folded"],
        onnx_ops=exports.onnx_ops, parity_passed=parity.passed, stage_seconds=seconds, replicas=replicas_record(replicas),
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
