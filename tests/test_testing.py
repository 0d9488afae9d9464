"""``bnexport.testing.assert_parity``: passes on a faithful artifact, fails on a wrong one, with a useful message."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bnexport.testing import assert_parity

# the TorchScript-based exporter is what this test wants: small, fast and deterministic
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():  # statistics far from the defaults, so a wrong fold shows
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def export(model: nn.Module, path) -> None:
    torch.onnx.export(model, (torch.randn(1, 3, 6, 6),), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})


def test_faithful_onnx_passes_and_reports_the_real_error(tmp_path):
    model = small_model()
    export(model, tmp_path / "m.onnx")
    report = assert_parity(model, tmp_path / "m.onnx", input_shape=(2, 3, 6, 6))
    assert report.passed and len(report.results) == 1
    assert 0 < report.results[0].max_abs < 1e-4  # a real float32 difference, not a model compared with itself


def test_wrong_onnx_fails_with_the_table(tmp_path):
    model = small_model()
    export(model, tmp_path / "m.onnx")
    broken = onnx.load(tmp_path / "m.onnx")
    weight = next(t for t in broken.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(broken, tmp_path / "broken.onnx")
    with pytest.raises(AssertionError) as failed:
        assert_parity(model, tmp_path / "broken.onnx", input_shape=(2, 3, 6, 6))
    message = str(failed.value)
    assert "broken.onnx differs from the eager model" in message
    assert "FAIL" in message.upper() and "max" in message


def test_wrong_module_names_the_diverging_layer_and_restores_modes():
    model = small_model()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[1].running_mean += 0.5  # the BN is where the two part
    model.train()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match=r"first diverging layer: 1\b"):
        assert_parity(model, wrong, inputs=x)
    assert model.training and not wrong.training  # each back in its own mode


def test_inputs_by_position_and_dtype_tolerance(tmp_path):
    model = small_model().double()
    x = np.random.default_rng(2).standard_normal((3, 3, 6, 6))
    report = assert_parity(model, copy.deepcopy(model), inputs=(x,))
    assert report.results[0].max_abs == 0.0 and report.inputs[0]["dtype"] == "float64"


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(TypeError, match="one of inputs and input_shape"):
        assert_parity(small_model(), small_model())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        assert_parity("model.onnx", small_model(), input_shape=(1, 3, 6, 6))


def test_the_fixture_is_registered(bnexport_parity):
    assert bnexport_parity is assert_parity
