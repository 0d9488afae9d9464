"""The viz stage on models exported as given (no training): a stack of up to 200 BatchNorms, and DenseNet-121.

Each model goes through the real fold (fold_module, to_onnx, fold_onnx) and parity
(run_parity), then through ``visualize`` with a VisualizeInputs built here. The report is
checked against the model itself: its modules, its parameters, and eager torch's statistics.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bnexport.bench import BenchReport, Timing
from bnexport.config import ARTIFACTS
from bnexport.export.writers import to_onnx
from bnexport.fold import fold_module, fold_onnx
from bnexport.model import BN_TYPES
from bnexport.parity.compare import run_parity
from bnexport.parity.runners import eager_runner
from bnexport.viz import activations, bn_layer, bn_params
from bnexport.viz.graph import MAX_FIGURE_PX
from bnexport.viz.visualize import VisualizeInputs, visualize
from report_page import parse

DEPTHS = [12, pytest.param(200, marks=pytest.mark.slow)]  # exporting 200 blocks to ONNX alone takes ~15 s
TRAINING_FIGURES = ("bn_running_stats", "training_curves")
# summary.json's "bench", as bnexport.bench writes it: folding halves eager's time at batch 1, ONNX Runtime's by 1.25
BENCH = BenchReport(model="m", baseline="eager unfolded", threads=1, timings=[
    Timing("eager unfolded", 1, 2.0, 1.9, 10, 1.0), Timing("eager folded", 1, 1.0, 0.9, 10, 0.5),
    Timing("TorchScript folded", 1, 0.9, 0.8, 10, 0.45), Timing("ORT unfolded (default opt)", 1, 0.5, 0.4, 10, 0.25),
    Timing("ORT folded (default opt)", 1, 0.4, 0.3, 10, 0.2)]).to_json()


def bn_names(model: nn.Module) -> list[str]:
    """The oracle for the health table: every BN module that has running statistics."""
    return [name for name, m in model.named_modules() if isinstance(m, BN_TYPES) and m.running_mean is not None]


def export_inputs(model: nn.Module, example: torch.Tensor, figure_batch: torch.Tensor, *, synthetic: bool,
                  spec: str) -> VisualizeInputs:
    """What the export pipeline hands visualize: the real folds, the real ONNX export, parity on ``example``."""
    folded, torch_report = fold_module(model, check=False)
    before = to_onnx(model, example)
    after, onnx_report = fold_onnx(before, check=False)
    outputs = {}

    def keeping(name, runner):
        def run(batch):
            outputs[name] = runner(batch)
            return outputs[name]
        return run

    parity = run_parity(keeping("reference", eager_runner(model)), {"eager folded": keeping("eager folded",
                                                                                            eager_runner(folded))},
                        example.numpy(), reference_name="eager (BatchNorm kept)")
    fold = {"torch": torch_report.to_json(), "onnx": onnx_report.to_json()}
    summary = {
        "model": {"spec": spec, "class": f"{type(model).__module__}.{type(model).__name__}", "weights": None,
                  "random_weights": True, "parameters": sum(p.numel() for p in model.parameters()),
                  "inputs": {"x": list(example.shape)}},
        "batchnorm_layers": len(bn_names(model)), "batchnorm_folded": fold["onnx"]["folded"],
        "parity": "pass" if parity.passed else "fail", "file_sizes": {"model.onnx": 1234567},
        "stage_seconds": {"export": 1.0}, "versions": {"torch": torch.__version__}, "bench": BENCH,
    }
    shape = "×".join(map(str, figure_batch.shape))
    return VisualizeInputs(
        model=model, figure_inputs=(figure_batch,),
        figure_data=f"seeded synthetic input ({shape})" if synthetic else f"{len(figure_batch)} seeded images ({shape})",
        synthetic=synthetic, parity=parity.to_json(), parity_outputs=outputs, fold=fold, onnx_models=(before, after),
        summary=summary,
    )


# A stack of BatchNorms with known trouble -------------------------------------------------

def broken_blocks(depth: int) -> tuple[int, int, int]:
    """The blocks whose BN ``deep_stack`` breaks, one way each: (dead, float16 overflow, float16 underflow)."""
    return depth * 2 // 3, depth // 4, depth * 2 // 5


def deep_stack(depth: int, figure_batch: torch.Tensor) -> nn.Sequential:
    """``depth`` Conv → BN → ReLU blocks at 8×8, calibrated on ``figure_batch``, then broken in known places.

    Calibration (one train-mode pass, cumulative average) makes every BN's running statistics
    those of the batch, so an untouched layer does not drift. Then (``broken_blocks``): one
    block loses two channels (γ=0), one block's channel 0 folds past float16's max, one
    block's channel 0 folds a float16 weight to 0, and the last block's running mean moves 5σ.
    """
    dead, overflow, underflow = broken_blocks(depth)
    torch.manual_seed(0)
    blocks = [nn.Sequential(OrderedDict(conv=nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False),
                                        bn=nn.BatchNorm2d(8), relu=nn.ReLU())) for i in range(depth)]
    model = nn.Sequential(*blocks)
    for block in blocks:
        block.bn.momentum = None  # a cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(figure_batch)
    model.eval()
    with torch.no_grad():
        blocks[dead].bn.weight[[1, 3]] = 0.0
        blocks[overflow].bn.weight[0] = 1e6
        blocks[underflow].conv.weight[0, 0, 0, 0] = 1e-3  # float16 holds it; folded by s ≈ 2e-6 it rounds to 0
        blocks[underflow].bn.weight[0] = 2e-5  # above GAMMA_DEAD: alive
        blocks[underflow].bn.running_var[0] = 100.0
        last = blocks[-1].bn
        last.running_mean += 5 * torch.sqrt(last.running_var + last.eps)
    return model


@pytest.fixture(scope="module", params=DEPTHS)
def deep_run(request, tmp_path_factory):
    depth = request.param
    figure_batch = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = deep_stack(depth, figure_batch)
    inputs = export_inputs(model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), figure_batch,
                           synthetic=True, spec="tests:deep_stack")
    out = tmp_path_factory.mktemp(f"deep{depth}")
    result = visualize(out, inputs=inputs, figure_format="png")
    return depth, model, inputs, out, result


def folded_float16(model: nn.Module, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``block``'s folded conv weights (float64, by hand) and the same in float16."""
    conv, bn = model[block].conv, model[block].bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    folded = (conv.weight.double() * scale.view(-1, 1, 1, 1)).detach().numpy()
    with np.errstate(over="ignore"):
        return folded, folded.astype(np.float16)


def test_the_broken_layers_are_what_the_test_says(deep_run):
    depth, model, *_ = deep_run
    _, overflow, underflow = broken_blocks(depth)
    folded, half = folded_float16(model, overflow)
    assert np.isinf(half[0]).any() and np.isfinite(half[1:]).all()
    folded, half = folded_float16(model, underflow)
    original = model[underflow].conv.weight.detach().numpy().astype(np.float16)
    assert ((half[0] == 0) & (original[0] != 0)).any()
    assert not ((half[1:] == 0) & (original[1:] != 0)).any()


def test_health_table_has_one_row_per_bn_sorted_by_severity(deep_run):
    depth, model, inputs, out, result = deep_run
    dead, overflow, underflow = broken_blocks(depth)
    page = parse(out / ARTIFACTS.report)
    header, *rows = page.tables["health"]
    column = {name: index for index, name in enumerate(header)}
    names = [row[0] for row in rows]
    assert sorted(names) == sorted(bn_names(model)) and len(names) == depth
    # dead > float16 overflow > float16 underflow > drift > healthy, each broken layer at its place
    assert names[:3] == [f"{dead}.bn", f"{overflow}.bn", f"{underflow}.bn"]
    verdicts = [row[column["verdict"]] for row in rows]
    assert verdicts[:3] == ["dead", "fp16 overflow", "fp16 underflow"]
    assert rows[0][column["dead channels"]] == "2: 1, 3"
    order = {verdict: rank for rank, verdict in enumerate(bn_params.PROBLEMS + ("healthy",))}
    ranks = [order[verdict] for verdict in verdicts]
    assert ranks == sorted(ranks)
    drifting = [float(row[column["drift"]]) for row in rows if row[column["verdict"]] in ("drift", "healthy")]
    assert all(a >= b for a, b in zip(drifting, drifting[1:]))
    assert f"{depth - 1}.bn" in [row[0] for row in rows if row[column["verdict"]] == "drift"]
    # the layers up to the first broken one were calibrated on this very batch and see it unchanged: no drift
    assert all(verdicts[names.index(f"{block}.bn")] == "healthy" for block in range(overflow))


def test_drift_matches_eager_statistics(deep_run):
    depth, model, inputs, out, result = deep_run
    health = {layer.name: layer for layer in result.health}
    captured = {}
    last = model[depth - 1]
    handle = last.bn.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].double()))
    with torch.no_grad():
        model(*inputs.figure_inputs)
    handle.remove()
    x, bn = captured["x"], last.bn
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    shift = ((mean - bn.running_mean.double()).abs() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
    ratio = ((var + bn.eps) / (bn.running_var.double() + bn.eps)).numpy()
    layer = health[f"{depth - 1}.bn"]
    np.testing.assert_allclose(layer.mean_shift, shift, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.variance_ratio, ratio, rtol=1e-4)
    assert layer.drift == pytest.approx(max(shift.max(), np.abs(np.log2(ratio)).max()), rel=1e-4)
    # block 0 was calibrated on this batch: its running variance is the unbiased one, n/(n−1) of the batch's
    values = len(inputs.figure_inputs[0]) * 8 * 8  # per channel: samples × height × width
    assert health["0.bn"].drift == pytest.approx(-np.log2((values - 1) / values), rel=0.05)


def test_figures_draw_only_the_picked_layers(deep_run):
    depth, model, inputs, out, result = deep_run
    dead, overflow, _ = broken_blocks(depth)
    assert set(result.detail) == {"0.bn", f"{dead}.bn", f"{overflow}.bn", f"{depth - 1}.bn"}
    stems = [figure.file.split("/")[1].rsplit(".", 1)[0] for figure in result.figures]
    assert stems == ["bn_health", "bn_layer_histograms", "bn_layer_channels", "bn_parameters", "activations",
                     "graph_folding", "parity"]
    assert not any(stem in stems for stem in TRAINING_FIGURES)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{stem}.png" for stem in stems)
    # the per-channel figures name exactly the picked layers: drawn again in SVG, whose text is searchable
    layers = activations.capture_bn_activations(model, inputs.figure_inputs, names=list(result.detail))
    for name, draw in (("h.svg", bn_layer.plot_channel_histograms), ("c.svg", lambda layers, path:
                        bn_layer.plot_sample_channels(layers, None, path)),
                       ("a.svg", activations.plot_activation_distributions)):
        text = draw(layers, out / name).read_text()
        assert set(re.findall(r"\b\d+\.bn\b", text)) == set(result.detail), name
    page = parse(out / ARTIFACTS.report)
    assert sorted(page.bold_cells) == sorted(result.detail)


def test_graph_figure_is_bounded(deep_run):
    depth, _, _, out, result = deep_run
    with Image.open(out / "figures" / "graph_folding.png") as image:
        width, height = image.size
    assert height <= MAX_FIGURE_PX and width <= MAX_FIGURE_PX
    [caption] = [figure.caption for figure in result.figures if "graph_folding" in figure.file]
    # 12 blocks draw whole (some 40 nodes a graph); 200 blocks only as BatchNorm neighbourhoods
    assert caption.startswith("Too big to draw whole") == (depth == 200)


def test_summary_on_top_details_below(deep_run):
    depth, model, inputs, out, result = deep_run
    page = parse(out / ARTIFACTS.report)
    text = (out / ARTIFACTS.report).read_text()
    assert page.order[:2] == ["h2:summary", "table:summary"]
    summary = dict(page.tables["summary"])
    for source, label in (("onnx", "BatchNorm in the model.folded.onnx (ONNX fold)"),
                          ("torch", "BatchNorm in the folded module (torch fold)")):
        records = inputs.fold[source]["records"]
        folded = sum(r["status"] == "folded" for r in records)
        assert summary[label] == f"{folded} of {len(records)} folded, {len(records) - folded} kept"
    assert summary["BatchNorm layers"] == str(depth)
    assert summary["what folding bought (bench)"] == ("eager, batch 1: 2 ms → 1 ms per call (2.00× faster); "
                                                      "ORT (default opt), batch 1: 0.5 ms → 0.4 ms per call (1.25× faster)")
    assert summary["training"].startswith("none")
    assert "synthetic" in summary["figures drawn on"] and "synthetic" in text.split("id='parity'")[0]
    assert "With and without BatchNorm" not in text
    assert "Library versions: torch" in page.details and "tests:deep_stack" in page.details
    assert "Library versions" not in text.split("<details>")[0]
    assert "<script" not in text


def test_stream_keeps_only_the_named_and_the_lowest(deep_run):
    depth, model, inputs, *_ = deep_run
    order = {name: index for index, name in enumerate(bn_names(model))}
    held = []

    def score(name, moments):
        held.append(name)
        return -order[name]  # the deepest layers score lowest

    streamed = activations.stream_bn_inputs(model, inputs.figure_inputs, keep=["0.bn"], keep_lowest=2, score=score)
    assert set(streamed.kept) == {"0.bn", f"{depth - 2}.bn", f"{depth - 1}.bn"}
    assert len(streamed.moments) == depth and len(held) == depth


# Small edge cases: no BatchNorm at all, and BatchNorm1d seeing one sample -----------------

def test_model_without_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    batch = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = visualize(tmp_path, inputs=export_inputs(model, batch, batch, synthetic=True, spec="tests:no_bn"),
                       figure_format="svg")
    assert result.health == [] and result.detail == {}
    assert "no BatchNorm layers" in (tmp_path / "figures" / "bn_layer_histograms.svg").read_text()
    text = (tmp_path / ARTIFACTS.report).read_text()
    assert "This model has no BatchNorm layers" in text and "nothing to fold" in text


def test_batchnorm1d_on_one_sample(tmp_path):
    """One value per channel: train mode has no batch statistics, so the drift is of that one sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).eval()
    sample = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    result = visualize(tmp_path, inputs=export_inputs(model, sample, sample, synthetic=True, spec="tests:mlp"),
                       figure_format="svg")
    [layer] = result.health
    with torch.no_grad():
        x = model[0](sample)[0].double()
    bn = model[1]
    expected = (x - bn.running_mean.double()).abs() / torch.sqrt(bn.running_var.double() + bn.eps)
    np.testing.assert_allclose(layer.mean_shift, expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(layer.variance_ratio, bn.eps / (bn.running_var.double() + bn.eps).numpy(), rtol=1e-5)
    assert "not image channels" in (tmp_path / "figures" / "bn_layer_channels.svg").read_text()


# DenseNet-121: BatchNorms after a Concat stay ----------------------------------------------

@pytest.mark.slow
def test_densenet121(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.densenet121().eval()
    figure_batch = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    inputs = export_inputs(model, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), figure_batch,
                           synthetic=False, spec="torchvision:densenet121")
    result = visualize(tmp_path, inputs=inputs, figure_format="png")
    page = parse(tmp_path / ARTIFACTS.report)
    header, *rows = page.tables["health"]
    assert sorted(row[0] for row in rows) == sorted(bn_names(model)) and len(rows) == 121
    verdicts = [row[header.index("verdict")] for row in rows]
    order = {verdict: rank for rank, verdict in enumerate(bn_params.PROBLEMS + ("healthy",))}
    assert [order[v] for v in verdicts] == sorted(order[v] for v in verdicts)
    assert 1 <= len(result.detail) <= bn_params.DETAIL_LAYERS
    summary = dict(page.tables["summary"])
    onnx = inputs.fold["onnx"]
    assert 0 < onnx["kept"] < 121  # the BatchNorms after a Concat stay
    assert summary["BatchNorm in the model.folded.onnx (ONNX fold)"] == \
        f"{onnx['folded']} of {onnx['batchnorm_total']} folded, {onnx['kept']} kept"
    text = (tmp_path / ARTIFACTS.report).read_text()
    assert "synthetic" not in text
    with Image.open(tmp_path / "figures" / "graph_folding.png") as image:
        assert max(image.size) <= MAX_FIGURE_PX
