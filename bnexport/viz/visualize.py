"""The viz stage: write every figure and report.html from a run's model, data and results.

``visualize(out)`` reads what ``train-and-export`` wrote into ``out`` (the checkpoint, both
ONNX files, fold.json, parity.json and parity_outputs.npz; bn_stats.json, training_curves.json
and summary.json when present). The pipeline, which holds all of it in memory already, passes
a ``VisualizeInputs`` instead and nothing is read back. Each figure is a pure function in
``bnexport/viz``; this module only gathers the inputs, calls them and names the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..artifacts import prepare_out_dir, read_json
from ..config import ARTIFACTS, DEFAULT_FIGURE_FORMAT, FIGURE_FORMATS, TrainConfig
from ..data import Dataset, parity_batch
from ..errors import BnexportError
from ..fold import load_onnx
from ..tables import format_table
from ..train.loop import History, reopen_checkpoint
from ..train.recording import BNStats, RunCurves
from . import activations as activation_figures
from . import bn_layer, bn_params, graph, running_stats, training
from . import parity_errors as parity_figures
from .html_report import write_report

VIZ_BATCH_SIZE = 256  # test images pushed through the model for the activation figures: ~200k values a channel
REQUIRED = (ARTIFACTS.onnx, ARTIFACTS.onnx_folded, ARTIFACTS.fold_report, ARTIFACTS.parity, ARTIFACTS.parity_outputs)


@dataclass
class FigureFile:
    file: str  # relative to the output folder, as report.html links it
    title: str
    caption: str


@dataclass
class VisualizeResult:
    out: Path
    figures: list[FigureFile] = field(default_factory=list)
    health: list[bn_params.LayerHealth] = field(default_factory=list)
    effects: list[training.RunEffect] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def report(self) -> Path:
        return self.out / ARTIFACTS.report

    def descriptions(self) -> dict[str, str]:
        """Manifest entries for the figures."""
        return {figure.file: f"figure: {figure.title}" for figure in self.figures}

    def table(self) -> str:
        rows = [("figure", "what")] + [(f.file, f.title) for f in self.figures]
        return format_table(rows) + f"\n{len(self.figures)} figures and {ARTIFACTS.report} in {self.seconds:.1f}s"


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise BnexportError(f"{path}: not found; {hint}")
    return path


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def training_runs(out: Path, history: History, config: TrainConfig) -> list[RunCurves]:
    """training_curves.json when the run wrote it; otherwise the checkpoint's own history."""
    data = _optional_json(out / ARTIFACTS.training_curves)
    if data and data.get("runs"):
        return [RunCurves.from_json(run) for run in data["runs"]]
    return [RunCurves(batch_norm=config.batch_norm, step_loss=history.step_loss,
                      epoch_end_step=history.epoch_end_step, test_accuracy=history.test_accuracy)]


@dataclass
class VisualizeInputs:
    """What the figures and the report are drawn from; each field names the file it is read from."""

    model: nn.Module  # checkpoint.pt, eval mode
    config: TrainConfig
    dataset: Dataset  # the run's own data
    history: History
    parity: dict  # parity.json
    parity_outputs: dict[str, np.ndarray]  # parity_outputs.npz
    fold: dict  # fold.json
    onnx_models: tuple[onnx.ModelProto, onnx.ModelProto]  # model.onnx and model.folded.onnx
    runs: list[RunCurves]  # training_curves.json, or the checkpoint's own history
    bn_stats: BNStats | None = None  # bn_stats.json
    summary: dict | None = None  # summary.json


def read_inputs(out: str | Path, *, checkpoint: str | Path | None = None) -> VisualizeInputs:
    """Everything ``visualize`` draws, read from the files of a train-and-export run in ``out``."""
    out = Path(out)
    hint = f"run `bnexport train-and-export --out {out}` first"
    checkpoint = _require(Path(checkpoint) if checkpoint else out / ARTIFACTS.checkpoint, hint)
    for name in REQUIRED:
        _require(out / name, hint)
    run = reopen_checkpoint(checkpoint)
    history = History.from_json(run.payload["history"])
    with np.load(out / ARTIFACTS.parity_outputs) as archive:
        outputs = {name: archive[name] for name in archive.files}
    stats_json = _optional_json(out / ARTIFACTS.bn_stats)
    return VisualizeInputs(
        model=run.model, config=run.config, dataset=run.dataset, history=history,
        parity=read_json(out / ARTIFACTS.parity), parity_outputs=outputs, fold=read_json(out / ARTIFACTS.fold_report),
        onnx_models=(load_onnx(out / ARTIFACTS.onnx), load_onnx(out / ARTIFACTS.onnx_folded)),
        runs=training_runs(out, history, run.config), bn_stats=BNStats.from_json(stats_json) if stats_json else None,
        summary=_optional_json(out / ARTIFACTS.summary),
    )


def visualize(out: str | Path, *, checkpoint: str | Path | None = None, figure_format: str = DEFAULT_FIGURE_FORMAT,
              inputs: VisualizeInputs | None = None) -> VisualizeResult:
    """Write every figure into ``out/figures`` and ``out/report.html``; return what was written.

    ``inputs`` is what the run holds in memory; without it they are read from ``out``
    (``checkpoint`` names another checkpoint than ``out/checkpoint.pt``).
    """
    started = time.perf_counter()
    out = Path(out)
    if figure_format not in FIGURE_FORMATS:
        raise BnexportError(f"--format must be one of {', '.join(FIGURE_FORMATS)}, got {figure_format!r}")
    if inputs is None:
        inputs = read_inputs(out, checkpoint=checkpoint)
    elif checkpoint is not None:
        raise ValueError("visualize: pass inputs or a checkpoint to read them from, not both")
    model, config, dataset, history = inputs.model, inputs.config, inputs.dataset, inputs.history
    images = parity_batch(dataset, seed=config.seed, size=VIZ_BATCH_SIZE)
    parity = inputs.parity

    prepare_out_dir(out / ARTIFACTS.figures)  # one clear line if the folder cannot be written
    result = VisualizeResult(out)

    def add(stem: str, title: str, caption: str, draw) -> None:
        relative = f"{ARTIFACTS.figures}/{stem}.{figure_format}"
        draw(out / relative)
        result.figures.append(FigureFile(relative, title, caption))

    with torch.no_grad():
        layers = activation_figures.capture_bn_activations(model, images)
    first = layers[0] if layers else None
    add("bn_layer_histograms", "One BN layer's channels before and after, train and eval mode",
        "Each channel of the first BatchNorm layer on test images: the input (blue), the output normalised with the "
        "batch's statistics (train mode, orange) and with the running statistics (eval mode, as exported; green).",
        lambda path: bn_layer.plot_channel_histograms(first, path))
    add("bn_layer_channels", "One sample's channels before and after BN",
        "Every channel of one test image drawn as its own map, before and after the first BatchNorm (eval mode).",
        lambda path: bn_layer.plot_sample_channels(first, images[0].numpy(), path))
    result.health = bn_params.model_health(model)
    add("bn_parameters", "BN parameters per channel, with dead and float16-unsafe channels flagged",
        "Running mean and variance, γ, β and the fold scale γ/√(σ²+ε) of every channel. Red crosses: dead channels "
        "(γ≈0 or σ²≤ε); black squares: channels whose folded weights leave float16's range.",
        lambda path: bn_params.plot_bn_parameters(result.health, path))
    stats = inputs.bn_stats
    no_stats = ("This model has no BatchNorm layers: there are no running statistics." if not layers
                else f"{ARTIFACTS.bn_stats} not found: train-and-export records it while training.")
    add("bn_running_stats", "Running statistics tracking the batch statistics during training",
        "Per training step, the mean and variance of the batch entering the first BatchNorm, and the running "
        "estimate it keeps for eval mode.",
        lambda path: running_stats.plot_running_statistics(stats, path, reason=no_stats))
    add("activations", "Activations before and after every BN, and the train/eval gap",
        "Distribution of each BatchNorm's input and outputs on test images, and per channel the mean difference "
        "between the train-mode and eval-mode outputs.",
        lambda path: activation_figures.plot_activation_distributions(layers, path))
    runs = inputs.runs
    result.effects = training.training_effect(runs)
    add("training_curves", "Training with and without BatchNorm",
        "Loss per optimizer step (raw and smoothed) and test accuracy, for this run and its twin trained with "
        "BatchNorm switched; same seed, data order and hyperparameters.",
        lambda path: training.plot_training_curves(runs, path))
    add("graph_folding", "The ONNX graph before and after folding",
        f"{ARTIFACTS.onnx} with its BatchNormalization nodes in red, and {ARTIFACTS.onnx_folded} with the nodes that "
        "absorbed them in green.",
        lambda path: graph.plot_folding_graphs(*inputs.onnx_models, path, names=(ARTIFACTS.onnx, ARTIFACTS.onnx_folded)))
    comparisons = parity_figures.comparisons_from_outputs(parity, inputs.parity_outputs)
    add("parity", "Parity: every |Δ| against the threshold",
        f"For each comparison against {parity.get('reference', 'the reference')}, every output element's absolute "
        "difference on the parity batch, with the pass threshold in red.",
        lambda path: parity_figures.plot_parity(comparisons, path, reference=parity.get("reference", "reference")))

    write_report(
        out, figures=result.figures, health=result.health, effects=result.effects,
        config=config.to_json(), dataset=dataset.describe(), history=history, parity=parity,
        fold=inputs.fold, summary=inputs.summary,
        onnx_files=[out / ARTIFACTS.onnx, out / ARTIFACTS.onnx_folded],
    )
    result.seconds = time.perf_counter() - started
    return result


def update_manifest(out: str | Path, result: VisualizeResult) -> dict | None:
    """Refresh manifest.json after a standalone visualize: same entries, new figures and report."""
    from ..artifacts import write_manifest

    out = Path(out)
    manifest_path = out / ARTIFACTS.manifest
    if not manifest_path.is_file():
        return None
    descriptions = {entry["file"]: entry["description"] for entry in read_json(manifest_path).get("files", [])
                    if not entry["file"].startswith(f"{ARTIFACTS.figures}/")}
    descriptions[ARTIFACTS.report] = "one-page HTML report: config, accuracy, parity, folding, BN health, every figure"
    return write_manifest(out, {**descriptions, **result.descriptions()}, name=ARTIFACTS.manifest)
