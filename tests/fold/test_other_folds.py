"""bnexport's ONNX fold against two independent implementations of the same maths, both test extras:
onnxoptimizer's C++ ``fuse_bn_into_conv`` pass, and onnxsim, which runs that pass and then folds the
constants it leaves behind. Both fold only Conv → BN, so the models here are conv nets; an eps of
1e-3 makes a fold that drops or misplaces eps differ by about 1e-3, far outside the tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxoptimizer
import onnxsim
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bnexport.fold import fold_onnx
from bnexport.model import ModelSpec, SimpleCNN
from fold.models import count_bn_nodes, export_torchscript_onnx, ort_run, randomize_bn, relative_error

# name: (builder, input shape, BatchNorms)
MODELS = {
    "simplecnn": (lambda: SimpleCNN(ModelSpec()), (1, 1, 28, 28), 1),
    "strided-grouped-biasless": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, dilation=2), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8, eps=1e-3)), (1, 3, 16, 16), 2),
}
# float32 maths done in another order: a few units of rounding, relative to the largest value
REL_TOL = 1e-5


def exported(name: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """The model's ONNX (every BN kept, weights as initializers) and a seeded input for it."""
    build, shape, batchnorms = MODELS[name]
    torch.manual_seed(0)
    model = export_torchscript_onnx(randomize_bn(build(), seed=3), torch.zeros(shape))
    assert count_bn_nodes(model) == batchnorms
    return model, np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def conv_parameters(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each Conv in graph order, read from the initializers."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(values[node.input[1]], values[node.input[2]]) for node in model.graph.node if node.op_type == "Conv"]


@pytest.mark.parametrize("name", list(MODELS))
def test_same_outputs_as_onnxoptimizer(name):
    original, x = exported(name)
    ours, _ = fold_onnx(original, check=False)  # checked here, not by bnexport's own parity check
    theirs = onnxoptimizer.optimize(original, ["fuse_bn_into_conv"])
    assert count_bn_nodes(ours) == count_bn_nodes(theirs) == 0
    assert relative_error(ort_run(theirs, x), ort_run(ours, x)) < REL_TOL
    assert relative_error(ort_run(original, x), ort_run(ours, x)) < REL_TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_same_folded_weights_as_onnxsim(name):
    original, _ = exported(name)
    ours, _ = fold_onnx(original, check=False)
    theirs, check_ok = onnxsim.simplify(original)
    assert check_ok and count_bn_nodes(theirs) == 0
    ours_convs, their_convs = conv_parameters(ours), conv_parameters(theirs)
    assert len(ours_convs) == len(their_convs) == MODELS[name][2]
    for (weight, bias), (their_weight, their_bias) in zip(ours_convs, their_convs):
        assert weight.shape == their_weight.shape and bias.shape == their_bias.shape
        assert relative_error(their_weight, weight) < REL_TOL
        assert relative_error(their_bias, bias) < REL_TOL
