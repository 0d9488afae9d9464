"""report.html and the visualize command, through the real command; the report in a real browser."""

import shutil

import numpy as np
import onnx
import pytest
import torch

from bnexport.config import ARTIFACTS
from browser import chromium_page
from conftest import assert_one_line_error, read_json, run_cli
from report_page import parse

FIGURES = ["bn_layer_histograms", "bn_layer_channels", "bn_parameters", "bn_running_stats", "activations",
           "training_curves", "graph_folding", "parity"]


def test_train_and_export_writes_figures_and_report(tiny_run):
    for stem in FIGURES:
        assert (tiny_run / "figures" / f"{stem}.png").stat().st_size > 10_000, stem
    report = parse(tiny_run / ARTIFACTS.report)
    assert report.images == [f"figures/{stem}.png" for stem in FIGURES]
    parity = read_json(tiny_run / ARTIFACTS.parity)
    assert len(report.tables["parity"]) == 1 + len(parity["results"])
    assert [row[0] for row in report.tables["parity"][1:]] == [r["name"] for r in parity["results"]]
    assert all(row[-1] == "ok" for row in report.tables["parity"][1:])
    bn_node = next(n.name for n in onnx.load(str(tiny_run / "model.onnx")).graph.node if n.op_type == "BatchNormalization")
    assert report.tables["folding"] == [["graph", "BatchNorm", "ONNX node", "status", "folded into / reason kept"],
                                        ["torch", "bn1", "", "folded", "conv1 (BN after it)"],
                                        ["onnx", "bn1", bn_node, "folded", "conv1 (BN after it)"]]
    [header, health] = report.tables["health"]
    assert health[:3] == ["bn1", "16", "conv1"]
    # Drift, against eager torch: conv1's output on the figure batch against bn1's running statistics.
    # Eight steps of momentum 0.1 leave the running statistics far from the data, so bn1 drifts.
    shift, ratio = eager_drift(tiny_run)
    row = dict(zip(header, health))
    assert float(row["max δ"]) == pytest.approx(shift.max(), rel=6e-3)  # 3 significant digits
    low, high = map(float, row["v min – max"].split(" – "))
    assert (low, high) == (pytest.approx(ratio.min(), rel=6e-3), pytest.approx(ratio.max(), rel=6e-3))
    drift = max(shift.max(), np.abs(np.log2(ratio)).max())
    assert float(row["drift"]) == pytest.approx(drift, rel=6e-3)
    assert row["verdict"] == ("drift" if drift >= 1 else "healthy")
    effect = report.tables["effect"]
    assert [row[0] for row in effect[1:]] == ["with BatchNorm", "without BatchNorm"]
    curves = read_json(tiny_run / ARTIFACTS.training_curves)
    assert [run["batch_norm"] for run in curves["runs"]] == [True, False]
    first_epoch = {run["batch_norm"]: run["test_accuracy"][0] for run in curves["runs"]}
    assert effect[1][1] == f"{first_epoch[True]:.2%}" and effect[2][1] == f"{first_epoch[False]:.2%}"
    text = (tiny_run / ARTIFACTS.report).read_text()
    assert f"bnexport view {tiny_run / 'model.onnx'}" in text and f"{tiny_run / 'model.folded.onnx'}" in text
    assert "<script" not in text and "http://" not in text and "https://" not in text


def eager_drift(run) -> tuple[np.ndarray, np.ndarray]:
    """bn1's mean shift and variance ratio per channel, on the run's figure batch, in float64 eager torch."""
    from bnexport.data import parity_batch
    from bnexport.train.loop import reopen_checkpoint
    from bnexport.viz.visualize import VIZ_BATCH_SIZE

    reopened = reopen_checkpoint(run / ARTIFACTS.checkpoint)
    model = reopened.model.double()
    images = parity_batch(reopened.dataset, seed=reopened.config.seed, size=VIZ_BATCH_SIZE).double()
    with torch.no_grad():
        x = model.conv1(images)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    bn = model.bn1
    shift = (mean - bn.running_mean).abs() / torch.sqrt(bn.running_var + bn.eps)
    ratio = (var + bn.eps) / (bn.running_var + bn.eps)
    return shift.numpy(), ratio.numpy()


def test_run_records_bn_statistics_and_lists_new_files(tiny_run):
    stats = read_json(tiny_run / ARTIFACTS.bn_stats)
    assert stats["steps"] == list(range(1, 17)) and stats["layers"][0]["name"] == "bn1"
    summary = read_json(tiny_run / ARTIFACTS.summary)
    assert {"compare", "visualize"} <= set(summary["stage_seconds"])
    files = {entry["file"] for entry in read_json(tiny_run / ARTIFACTS.manifest)["files"]}
    assert {ARTIFACTS.report, ARTIFACTS.bn_stats, ARTIFACTS.training_curves, ARTIFACTS.parity_outputs} <= files
    assert {f"figures/{stem}.png" for stem in FIGURES} <= files


def test_visualize_command_svg(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    shutil.rmtree(out / "figures")
    result = run_cli("visualize", "--out", out, "--format", "svg")
    assert result.returncode == 0, result.stderr
    assert sorted(p.stem for p in (out / "figures").iterdir()) == sorted(FIGURES)
    assert all(p.suffix == ".svg" for p in (out / "figures").iterdir())
    assert parse(out / ARTIFACTS.report).images == [f"figures/{stem}.svg" for stem in FIGURES]
    assert "report:" in result.stdout
    manifest = {e["file"] for e in read_json(out / ARTIFACTS.manifest)["files"]}
    assert f"figures/{FIGURES[0]}.svg" in manifest and f"figures/{FIGURES[0]}.png" not in manifest


@pytest.mark.parametrize("missing", ["checkpoint.pt", "model.onnx", "parity_outputs.npz"])
def test_visualize_names_the_missing_file(tiny_run, tmp_path, missing):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / missing).unlink()
    assert_one_line_error(run_cli("visualize", "--out", out), missing, "not found", "train-and-export")


def test_visualize_refuses_an_export_summary_without_inputs(tmp_path):
    (tmp_path / ARTIFACTS.summary).write_text('{"model": {"spec": "torchvision:resnet50"}, "batchnorm_layers": 53}')
    assert_one_line_error(run_cli("visualize", "--out", tmp_path), "summary.json", "no model spec or inputs")


def test_visualize_missing_checkpoint_flag(tmp_path):
    assert_one_line_error(run_cli("visualize", "--out", tmp_path, "--checkpoint", tmp_path / "nope.pt"), "nope.pt")


def test_model_without_batchnorm(tmp_path):
    result = run_cli("train-and-export", "--no-bn", "--skip-no-bn", "--epochs", "1", "--max-steps", "4",
                     "--quiet", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ARTIFACTS.bn_stats).exists()
    for stem in ("bn_layer_histograms", "bn_parameters", "bn_running_stats", "activations"):
        assert (tmp_path / "figures" / f"{stem}.png").is_file()
    report = parse(tmp_path / ARTIFACTS.report)
    assert len(report.images) == len(FIGURES)
    text = (tmp_path / ARTIFACTS.report).read_text()
    assert "This model has no BatchNorm layers" in text and "nothing to fold" in text
    assert [row[0] for row in report.tables["effect"][1:]] == ["without BatchNorm"]
    svg = run_cli("visualize", "--out", tmp_path, "--format", "svg")
    assert svg.returncode == 0, svg.stderr
    assert "no BatchNorm layers" in (tmp_path / "figures" / "bn_layer_histograms.svg").read_text()


@pytest.mark.browser
def test_report_renders_in_chromium(tiny_run):
    with chromium_page() as (page, console):
        page.goto((tiny_run / ARTIFACTS.report).resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.locator("img")
        assert images.count() == len(FIGURES)
        for index in range(images.count()):
            image = images.nth(index)
            assert image.evaluate("img => img.complete && img.naturalWidth > 0"), image.get_attribute("src")
        assert page.locator("table.parity tbody tr").count() >= 8
        assert page.title().startswith("bnexport report")
        assert page.get_by_text("Open the graphs in Netron").count() == 1
    assert [m for m in console if m[0] in ("error", "pageerror")] == []
