"""The folding graph figure on bnexport's own exports: SimpleCNN and ResNet-18."""

import pytest
import torch
from PIL import Image

from bnexport.export import writers as export
from bnexport.fold import fold_onnx
from bnexport.model import ModelSpec, build_model
from bnexport.viz.common import PNG_DPI
from bnexport.viz.graph import ABSORBED, BN, IO, absorbed_batchnorms, graph_drawing, plot_folding_graphs


@pytest.fixture(scope="module")
def simplecnn_graphs():
    model = build_model(ModelSpec(), seed=0).eval()
    before = export.to_onnx(model, torch.rand(2, 1, 28, 28))
    after, report = fold_onnx(before, check=False)
    return before, after, report


def test_simplecnn_drawing(simplecnn_graphs):
    before, after, _ = simplecnn_graphs
    drawn_before, drawn_after = graph_drawing(before), graph_drawing(after)
    assert drawn_before.count(BN) == 1 and drawn_before.count(ABSORBED) == 0
    assert drawn_after.count(BN) == 0 and drawn_after.count(ABSORBED) == 1
    assert drawn_before.count(IO) == 2
    # input, Conv, BN, Relu, MaxPool, Reshape, Gemm, output: one chain; flatten's shape nodes hidden
    assert [n.label.split()[0] for n in sorted(drawn_before.nodes.values(), key=lambda n: n.layer)] == \
        ["input", "Conv", "BatchNormalization", "Relu", "MaxPool", "Reshape", "Gemm", "output"]
    assert drawn_before.width == 1 and drawn_before.hidden_shape_nodes > 0
    [absorber] = [n for n in drawn_after.nodes.values() if n.role == ABSORBED]
    assert absorber.label == "Conv 16×1×3×3 ⊕ BN"
    bn_name = next(n.name for n in before.graph.node if n.op_type == "BatchNormalization")
    assert absorber.absorbed == [bn_name]
    conv = next(n for n in after.graph.node if n.op_type == "Conv")
    assert absorbed_batchnorms(conv) == [bn_name]


def test_simplecnn_figure(simplecnn_graphs, tmp_path):
    before, after, _ = simplecnn_graphs
    path, drawings = plot_folding_graphs(before, after, tmp_path / "graph.png")
    with Image.open(path) as image:
        assert image.size[0] >= 11 * PNG_DPI and image.size[1] >= 3 * PNG_DPI
    assert [d.count(BN) for d in drawings] == [1, 0]


def test_resnet18_stays_readable(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class Images(torch.nn.Module):  # the exporter names the input after forward's argument
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)

        def forward(self, images):
            return self.net(images)

    torch.manual_seed(0)
    before = export.to_onnx(Images().eval(), torch.rand(1, 3, 32, 32))
    after, report = fold_onnx(before, check=False)
    path, (drawn_before, drawn_after) = plot_folding_graphs(before, after, tmp_path / "resnet.png")
    assert drawn_before.count(BN) == 20
    assert drawn_after.count(ABSORBED) == len(report.folded)
    assert drawn_after.count(BN) == 20 - len(report.folded)
    assert drawn_before.width == 2  # the downsampling shortcut runs beside the main branch, nothing wider
    assert 60 <= drawn_before.layers <= 70
    with Image.open(path) as image:
        width, height = image.size
    # one row per layer at ≥ 0.3 inch: every 7-point label has room
    assert height >= drawn_before.layers * 0.3 * PNG_DPI and width >= 11 * PNG_DPI
