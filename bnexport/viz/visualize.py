"""The viz stage: write every figure and report.html from a run's model, data and results.

``visualize(out)`` reads what ``train-and-export`` wrote into ``out`` (the checkpoint, both
ONNX files, fold.json, parity.json and parity_outputs.npz; bn_stats.json, training_curves.json
and summary.json when present). A pipeline, which holds all of it in memory already, passes
a ``VisualizeInputs`` instead and nothing is read back. Each figure is a pure function in
``bnexport/viz``; this module only gathers the inputs, calls them and names the files.

It scales from one BatchNorm to hundreds: one forward pass streams every BN input's
per-channel moments (for the drift column of the health table), and a second keeps whole
tensors for the few layers the per-channel figures draw (``bn_params.detail_layers``).
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
from ..config import ARTIFACTS, DEFAULT_FIGURE_FORMAT, DEFAULT_SEED, FIGURE_FORMATS, FIGURE_SAMPLES, TrainConfig
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
SIZED_FILES = (ARTIFACTS.checkpoint, ARTIFACTS.torchscript, ARTIFACTS.torchscript_folded, ARTIFACTS.exported_program,
               ARTIFACTS.onnx, ARTIFACTS.onnx_folded)  # the report's file sizes, when summary.json has none


@dataclass
class FigureFile:
    file: str  # relative to the output folder, as report.html links it
    title: str
    caption: str


@dataclass
class VisualizeResult:
    out: Path
    figures: list[FigureFile] = field(default_factory=list)
    health: list[bn_params.LayerHealth] = field(default_factory=list)  # module order
    detail: dict[str, str] = field(default_factory=dict)  # the layers drawn channel by channel → why
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
    """What the figures and the report are drawn from; each field names the file it is read from.

    Every run has the fields down to ``summary``. A train-and-export run also has its training
    (``config`` and below), and only then does the report draw the training figures.
    """

    model: nn.Module  # eval mode
    # A batch of positional model inputs pushed through the model for the activation figures.
    figure_inputs: tuple[torch.Tensor, ...]
    # Where figure_inputs came from, one phrase: "seeded synthetic input (1×3×224×224)", "bundled MNIST test split".
    figure_data: str
    synthetic: bool  # True: the report says the figures come from synthetic input
    parity: dict  # parity.json
    parity_outputs: dict[str, np.ndarray]  # parity_outputs.npz
    fold: dict  # fold.json: {"torch": FoldReport.to_json(), "onnx": ...}
    onnx_models: tuple[onnx.ModelProto, onnx.ModelProto]  # model.onnx and model.folded.onnx
    summary: dict | None = None  # summary.json
    config: TrainConfig | None = None  # train-and-export only, from here on down
    dataset: Dataset | None = None
    history: History | None = None
    runs: list[RunCurves] = field(default_factory=list)  # training_curves.json, or the checkpoint's own history
    bn_stats: BNStats | None = None  # bn_stats.json

    @property
    def trained(self) -> bool:
        return self.history is not None

    @classmethod
    def from_training(cls, *, model: nn.Module, config: TrainConfig, dataset: Dataset, history: History,
                      **results) -> VisualizeInputs:
        """A train-and-export run: the figures are drawn on its seeded test batch; ``results`` are the other fields."""
        images = parity_batch(dataset, seed=config.seed, size=VIZ_BATCH_SIZE)
        shape = "×".join(map(str, images.shape))
        return cls(model=model, figure_inputs=(images,),
                   figure_data=f"{len(images)} seeded images of the {dataset.name} test split ({shape})",
                   synthetic=dataset.name == "synthetic", config=config, dataset=dataset, history=history, **results)


def read_inputs(out: str | Path, *, checkpoint: str | Path | None = None) -> VisualizeInputs:
    """Everything ``visualize`` draws, read from the files of a train-and-export run in ``out``.

    The checkpoint is what makes it a train-and-export run: it holds the model, its config and
    its data. An `export` run has none, and is refused by name: reading one back needs the
    model rebuilt from its summary.json, and ``read_results`` reads the files both runs share.
    """
    out = Path(out)
    hint = f"run `bnexport train-and-export --out {out}` or `bnexport export MODEL --out {out}` first"
    if checkpoint is None and not (out / ARTIFACTS.checkpoint).is_file() and _written_by_export(out):
        return read_export_inputs(out)
    checkpoint = _require(Path(checkpoint) if checkpoint else out / ARTIFACTS.checkpoint, hint)
    results = read_results(out, hint=hint)
    run = reopen_checkpoint(checkpoint)
    history = History.from_json(run.payload["history"])
    stats_json = _optional_json(out / ARTIFACTS.bn_stats)
    return VisualizeInputs.from_training(
        model=run.model, config=run.config, dataset=run.dataset, history=history,
        runs=training_runs(out, history, run.config), bn_stats=BNStats.from_json(stats_json) if stats_json else None,
        **results,
    )


def read_export_inputs(out: str | Path) -> VisualizeInputs:
    """What ``visualize`` draws for an `export` run: its model rebuilt from the spec, weights and seed
    in summary.json (refused when the weights file is no longer the one exported), and the same
    figure samples read again."""
    from ..artifacts import sha256_file
    from ..data import load_figure_data
    from ..model_spec import load_model, spec_from

    out = Path(out)
    summary = read_json(out / ARTIFACTS.summary)
    described, inputs = summary.get("model") or {}, summary.get("inputs") or {}
    if not described.get("spec") or not inputs:
        raise BnexportError(f"{out / ARTIFACTS.summary}: no model spec or inputs; it is not from `bnexport export`")
    folder = described.get("folder")  # where export ran: its relative paths are relative to it

    def there(path: str | None) -> str | None:
        return str(Path(folder) / path) if folder and path and not Path(path).is_absolute() else path

    weights = there(described.get("weights"))
    if weights and described.get("weights_sha256") and Path(weights).is_file() \
            and sha256_file(weights) != described["weights_sha256"]:
        raise BnexportError(f"{weights}: changed since `bnexport export` wrote {out}; export again")
    loaded = load_model(spec_from(folder, described["spec"]), weights=weights,
                        seed=described.get("seed", DEFAULT_SEED))
    shapes = {name: tuple(shape) for name, shape in inputs.items()}
    source = summary.get("figure_source") or {}
    figures = load_figure_data(shapes, data=there(source.get("data")), dataset=source.get("dataset"),
                               seed=source.get("seed", loaded.seed), size=source.get("size", FIGURE_SAMPLES),
                               data_root=there(source.get("data_root", "data")))
    results = read_results(out, hint=f"run `bnexport export {described['spec']} --out {out}` again")
    return VisualizeInputs(model=loaded.module, figure_inputs=figures.inputs, figure_data=figures.description,
                           synthetic=figures.synthetic, **results)


def _written_by_export(out: Path) -> bool:
    """An `export` run's summary.json describes the model it was given; train-and-export's has no "model"."""
    path = out / ARTIFACTS.summary
    return path.is_file() and isinstance(read_json(path).get("model"), dict)


def read_results(out: str | Path, *, hint: str) -> dict:
    """The files every run writes, as VisualizeInputs fields: parity, parity_outputs, fold, onnx_models, summary."""
    out = Path(out)
    for name in REQUIRED:
        _require(out / name, hint)
    with np.load(out / ARTIFACTS.parity_outputs) as archive:
        outputs = {name: archive[name] for name in archive.files}
    return dict(
        parity=read_json(out / ARTIFACTS.parity), parity_outputs=outputs, fold=read_json(out / ARTIFACTS.fold_report),
        onnx_models=(load_onnx(out / ARTIFACTS.onnx), load_onnx(out / ARTIFACTS.onnx_folded)),
        summary=_optional_json(out / ARTIFACTS.summary),
    )


def _file_sizes(out: Path, summary: dict | None) -> dict[str, int]:
    given = (summary or {}).get("file_sizes")
    if given:
        return dict(given)
    return {name: (out / name).stat().st_size for name in SIZED_FILES if (out / name).is_file()}


def _sample_image(figure_inputs: tuple[torch.Tensor, ...]) -> np.ndarray | None:
    first = figure_inputs[0] if figure_inputs else None
    if not isinstance(first, torch.Tensor) or first.ndim < 2 or not first.is_floating_point():
        return None
    return first[0].detach().float().numpy()


def _measure(model: nn.Module, batch: tuple[torch.Tensor, ...]
             ) -> tuple[list[bn_params.LayerHealth], dict[str, str], list[activation_figures.LayerActivations]]:
    """Health with drift for every BN layer, the layers to draw in detail, and their activations.

    One forward pass: each layer's moments are taken as it runs, and its input is kept whole
    only while it is the first or last BN layer or among the DETAIL_LAYERS most severe so far,
    which is every layer ``detail_layers`` can pick.
    """
    health = bn_params.model_health(model)
    known = {layer.name: (index, layer) for index, layer in enumerate(health)}

    def score(name: str, moments: activation_figures.InputMoments) -> tuple:
        if name not in known:  # no running statistics: not in the health table, never drawn in detail
            return (len(bn_params.PROBLEMS) + 1,), len(known)
        index, layer = known[name]
        return bn_params.severity(bn_params.with_drift(layer, moments.mean, moments.var)), index

    ends = [health[0].name, health[-1].name] if health else []
    streamed = activation_figures.stream_bn_inputs(model, batch, keep=ends, keep_lowest=bn_params.DETAIL_LAYERS,
                                                   score=score)
    health = bn_params.add_drift(health, streamed.moments)
    detail = bn_params.detail_layers(health)
    return health, detail, activation_figures.layer_activations(model, streamed.kept, list(detail))


def visualize(out: str | Path, *, checkpoint: str | Path | None = None, figure_format: str = DEFAULT_FIGURE_FORMAT,
              inputs: VisualizeInputs | None = None, published: str | Path | None = None) -> VisualizeResult:
    """Write every figure into ``out/figures`` and ``out/report.html``; return what was written.

    ``published`` is the folder the files end up in when ``out`` is a staging folder (`export`):
    the report's commands name that one.

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
    model, batch, parity = inputs.model, tuple(inputs.figure_inputs), inputs.parity
    on_data = f"on {inputs.figure_data}" + (" (synthetic input: not real data)" if inputs.synthetic else "")

    prepare_out_dir(out / ARTIFACTS.figures)  # one clear line if the folder cannot be written
    result = VisualizeResult(out)

    def add(stem: str, title: str, caption: str, draw) -> None:
        relative = f"{ARTIFACTS.figures}/{stem}.{figure_format}"
        draw(out / relative)
        result.figures.append(FigureFile(relative, title, caption))

    result.health, result.detail, layers = _measure(model, batch)
    by_name = {layer.name: layer for layer in result.health}
    limit = bn_layer.channel_limit(len(layers))
    for layer in layers:
        layer.why = result.detail[layer.name]
        layer.shown_channels = bn_params.channels_to_show(by_name[layer.name], limit)
    many = len(result.health) > len(layers)
    which = (f"the {len(layers)} BatchNorm layers picked from {len(result.health)} (the two most severe in the health "
             f"table, the first and the last: {', '.join(layer.name for layer in layers)})" if many
             else "each BatchNorm layer" if len(layers) > 1 else "the first BatchNorm layer")

    if len(result.health) > 1:
        add("bn_health", "BatchNorm health, layer by layer",
            f"Every BatchNorm layer in module order: the range of its fold scale |γ/√(σ²+ε)| over its channels, its "
            f"running-stat drift {on_data} (see the health table for the definition; dashed: the flag threshold), and "
            "its dead and float16-unsafe channels. Shaded in red: the layers drawn channel by channel below.",
            lambda path: bn_params.plot_health_overview(result.health, path, detail=result.detail))
    add("bn_layer_histograms", "BN layers' channels before and after, train and eval mode" if len(layers) > 1
        else "One BN layer's channels before and after, train and eval mode",
        f"Each channel of {which} {on_data}: the input (blue), the output normalised with the batch's statistics "
        "(train mode, orange) and with the running statistics (eval mode, as exported; green). Flagged channels "
        "(dead, float16, drifting) are drawn first.",
        lambda path: bn_layer.plot_channel_histograms(layers or None, path))
    add("bn_layer_channels", "One sample's channels before and after BN",
        f"Every channel drawn of one input sample, as its own map, before and after {which} (eval mode), {on_data}.",
        lambda path: bn_layer.plot_sample_channels(layers or None, _sample_image(batch), path))
    drawn_health = [by_name[layer.name] for layer in layers] if many else result.health
    add("bn_parameters", "BN parameters per channel, with dead and float16-unsafe channels flagged",
        f"Running mean and variance, γ, β and the fold scale γ/√(σ²+ε) of every channel of "
        f"{which if many else 'every BatchNorm layer'}. Red crosses: dead channels "
        "(γ≈0 or σ²≤ε); black squares: channels whose folded weights leave float16's range.",
        lambda path: bn_params.plot_bn_parameters(drawn_health, path))
    if inputs.trained:
        stats = inputs.bn_stats
        no_stats = ("This model has no BatchNorm layers: there are no running statistics." if not layers
                    else f"{ARTIFACTS.bn_stats} not found: train-and-export records it while training.")
        add("bn_running_stats", "Running statistics tracking the batch statistics during training",
            "Per training step, the mean and variance of the batch entering the first BatchNorm, and the running "
            "estimate it keeps for eval mode.",
            lambda path: running_stats.plot_running_statistics(stats, path, reason=no_stats))
    add("activations", "Activations before and after BN, and the train/eval gap",
        f"Distribution of the input and outputs of {which} {on_data}, and per channel the mean difference "
        "between the train-mode and eval-mode outputs.",
        lambda path: activation_figures.plot_activation_distributions(layers, path))
    if inputs.trained:
        runs = inputs.runs
        result.effects = training.training_effect(runs)
        add("training_curves", "Training with and without BatchNorm",
            "Loss per optimizer step (raw and smoothed) and test accuracy, for this run and its twin trained with "
            "BatchNorm switched; same seed, data order and hyperparameters.",
            lambda path: training.plot_training_curves(runs, path))
    names = (ARTIFACTS.onnx, ARTIFACTS.onnx_folded)
    drawings = [graph.graph_drawing(onnx_model) for onnx_model in inputs.onnx_models]
    whole = graph.fits_whole(drawings)
    add("graph_folding", "The ONNX graph before and after folding",
        f"{names[0]} with its BatchNormalization nodes in red, and {names[1]} with the nodes that absorbed them in "
        "green." if whole else
        f"Too big to draw whole: each BatchNormalization of {names[0]}, with the node that feeds it and the nodes it "
        f"feeds, and what took its place in {names[1]}, grouped by pattern with a count each; below, the count of "
        "every op in both graphs.",
        lambda path: graph.plot_folding_figure(*inputs.onnx_models, path, names=names, drawings=drawings))
    comparisons = parity_figures.comparisons_from_outputs(parity, inputs.parity_outputs)
    add("parity", "Parity: every |Δ| against the threshold",
        f"For each comparison against {parity.get('reference', 'the reference')}, every output element's absolute "
        "difference on the parity batch, with the pass threshold in red.",
        lambda path: parity_figures.plot_parity(comparisons, path, reference=parity.get("reference", "reference")))

    training_part = None
    if inputs.trained:
        training_part = dict(config=inputs.config.to_json() if inputs.config else {},
                             dataset=inputs.dataset.describe() if inputs.dataset else None, history=inputs.history)
    write_report(
        out, figures=result.figures, health=result.health, detail=result.detail, effects=result.effects,
        parity=parity, fold=inputs.fold, summary=inputs.summary, training=training_part,
        figure_data=inputs.figure_data, synthetic=inputs.synthetic, file_sizes=_file_sizes(out, inputs.summary),
        parameters=sum(p.numel() for p in model.parameters()), model_class=type(model).__name__,
        onnx_files=[Path(published or out) / ARTIFACTS.onnx, Path(published or out) / ARTIFACTS.onnx_folded],
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
