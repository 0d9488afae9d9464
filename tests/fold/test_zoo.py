"""The torchvision classification zoo, weights=None with randomized BN statistics.

Every BN directly after a conv or linear layer must fold; densenet's BN → ReLU → Conv stay.
Errors are relative to the output's scale: random-weight nets have huge outputs. A few small
models run by default; the rest are marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bnexport.fold import fold_module, fold_onnx
from fold.models import EXPORTERS, count_bn_nodes, ort_run, randomize_bn, relative_error

INPUT = (1, 3, 64, 64)
# vgg's adaptive pool to 7×7 exports (TorchScript exporter) only from a multiple of 7
INPUTS = {"vgg11_bn": (1, 3, 224, 224), "vgg16_bn": (1, 3, 224, 224)}
REL_TOL = 1e-5


def tiny_densenet() -> nn.Module:
    """densenet121's structure (BN → ReLU → Conv in every layer) at a size CI can afford."""
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)


# name: (builder, BatchNorm total, BatchNorm that must fold)
ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 20, 20),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 34, 34),
    "tiny_densenet": (tiny_densenet, 11, 5),  # norm0 + one norm2 per dense layer
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), 53, 53),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(weights=None), 53, 53),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 52, 52),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(weights=None), 46, 46),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), 49, 49),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(weights=None), 53, 53),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), 121, 59),
    "shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(weights=None), 56, 56),
    "mnasnet1_0": (lambda: torchvision.models.mnasnet1_0(weights=None), 52, 52),
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False), 57, 57),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(weights=None), 8, 8),
    "vgg16_bn": (lambda: torchvision.models.vgg16_bn(weights=None), 13, 13),
}
FAST = ["resnet18", "mobilenet_v3_small", "tiny_densenet"]
SLOW = [name for name in ZOO if name not in FAST]


def zoo_params(names, *, exporters=None):
    marks = lambda name: [] if name in FAST else [pytest.mark.slow]  # noqa: E731
    if exporters is None:
        return [pytest.param(name, id=name, marks=marks(name)) for name in names]
    return [pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks(name)) for name in names for exporter in exporters]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    builder, _, _ = ZOO[name]
    return randomize_bn(builder(), seed=1)


def _input(name: str, seed: int = 5) -> torch.Tensor:
    shape = INPUTS.get(name, INPUT)
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("name", zoo_params(list(ZOO)))
def test_module_fold(name):
    model = build(name)
    _, total, foldable = ZOO[name]
    folded, report = fold_module(model, example_input=_input(name))
    assert (len(report.records), len(report.folded)) == (total, foldable), report.table()
    for record in report.kept:  # the only BNs kept are densenet's, after a concatenation and before a ReLU
        assert record.reason_code == "no_linear_neighbour", record
        assert "of the concatenation before it comes from" in record.reason, record
    x = _input(name)
    with torch.no_grad():
        assert relative_error(model(x).numpy(), folded(x).numpy()) < REL_TOL


@pytest.mark.parametrize("name, exporter", zoo_params(FAST, exporters=["torchscript"]) + zoo_params(["resnet18"], exporters=["dynamo"])
                         + zoo_params(SLOW, exporters=["torchscript", "dynamo"])
                         + zoo_params(["tiny_densenet"], exporters=["dynamo"])
                         + [pytest.param("mobilenet_v3_small", "dynamo", marks=pytest.mark.slow)])
def test_onnx_fold(name, exporter):
    model = build(name)
    _, total, foldable = ZOO[name]
    original = EXPORTERS[exporter](model, _input(name))
    assert count_bn_nodes(original) == total
    folded, report = fold_onnx(original)
    assert len(report.folded) == foldable, report.table()
    assert count_bn_nodes(folded) == total - foldable
    producers = {o: n.op_type for n in folded.graph.node for o in n.output}
    left = [producers.get(n.input[0]) for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert not {"Conv", "ConvTranspose", "Gemm", "MatMul"} & set(left)  # nothing foldable left behind
    x = _input(name).numpy()
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < REL_TOL
