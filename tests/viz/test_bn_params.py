"""BN health: dead channels, float16 range and running-stat drift, on layers built to fail each check."""

import numpy as np
import pytest
import torch
from torch import nn

from bnexport.model import ModelSpec, build_model
from bnexport.viz.bn_params import (GAMMA_DEAD, LayerHealth, by_severity, channels_to_show, conv_before_each_bn,
                                    detail_layers, layer_health, model_health, plot_bn_parameters, with_drift)
from bnexport.viz.common import PNG_DPI


def troubled_pair() -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Five channels: 0 healthy, 1 γ=0, 2 σ²=0, 3 folds past float16's max, 4 folds below its smallest step."""
    conv = nn.Conv2d(1, 5, 3)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        conv.weight.fill_(0.5)
        conv.weight[4].fill_(1e-3)
        conv.bias.zero_()
        bn.weight.copy_(torch.tensor([1.0, 0.0, 1.0, 1e3, 1e-4]))
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.copy_(torch.tensor([1.0, 1.0, 0.0, 2e-5, 1e3]))
    return conv, bn


def test_flags_each_kind_of_trouble():
    conv, bn = troubled_pair()
    health = layer_health("bn", bn, conv, conv_name="conv")
    assert health.dead_gamma == [1]
    assert health.dead_variance == [2]
    assert health.dead == [1, 2]
    # channel 3: s = 1e3 / sqrt(2e-5 + 1e-5) ≈ 1.8e5, and 0.5 · s ≈ 9.1e4 > 65504
    assert health.scale[3] == pytest.approx(1e3 / np.sqrt(3e-5))
    assert health.fp16_overflow == [3]
    # channel 4: s ≈ 1e-4 / sqrt(1e3) ≈ 3.2e-6, so 1e-3 · s ≈ 3.2e-9 rounds to 0 in float16
    assert health.fp16_underflow == [4]
    assert not health.healthy and health.folds_into == "conv"
    assert health.to_json()["channels"] == 5


def test_scale_is_gamma_over_root_var_plus_eps():
    conv, bn = troubled_pair()
    health = layer_health("bn", bn, conv)
    expected = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    np.testing.assert_allclose(health.scale, expected.numpy())
    assert GAMMA_DEAD < 1e-4  # channel 4's γ is small but alive


def test_without_a_conv_the_bn_itself_is_checked():
    _, bn = troubled_pair()
    health = layer_health("bn", bn)  # s ≈ 1.8e5 overflows on its own
    assert health.folds_into is None and 3 in health.fp16_overflow


def test_simplecnn_pairs_and_health():
    model = build_model(ModelSpec(), seed=0).eval()
    assert conv_before_each_bn(model) == {"bn1": "conv1"}
    [health] = model_health(model)
    assert health.name == "bn1" and health.channels == 16 and health.healthy
    assert model_health(build_model(ModelSpec(batch_norm=False), seed=0)) == []


def test_parameter_figure_flags_and_message(tmp_path):
    from PIL import Image

    conv, bn = troubled_pair()
    path = plot_bn_parameters([layer_health("bn", bn, conv)], tmp_path / "params.png")
    width, height = Image.open(path).size
    assert width >= 8 * PNG_DPI and height >= 8 * PNG_DPI
    empty = plot_bn_parameters([], tmp_path / "none.png")
    assert Image.open(empty).size[0] > 0


def test_weights_already_too_small_for_float16_are_not_blamed_on_the_fold():
    conv = nn.Conv2d(1, 1, 1)
    bn = nn.BatchNorm2d(1).eval()  # s = 1/√(1+ε): folding changes almost nothing
    with torch.no_grad():
        conv.weight.fill_(1e-9)  # 0 in float16 before any fold
    assert layer_health("bn", bn, conv).fp16_underflow == []


def layer_with(name: str, *, gamma: float = 1.0, shift: float = 0.0) -> LayerHealth:
    """A 4-channel BN (running mean 0, variance 1) whose channel 2 has γ=``gamma``, seen on a batch whose
    channel 3 sits ``shift`` running σ off (variance unchanged)."""
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight[2] = gamma
    mean = np.array([0.0, 0.0, 0.0, shift * np.sqrt(1 + bn.eps)])
    return with_drift(layer_health(name, bn), mean, np.ones(4))


def test_drift_severity_and_the_layers_drawn():
    health = [layer_with("first", shift=0.1), layer_with("drifts", shift=3.0), layer_with("dead", gamma=0.0),
              layer_with("calm", shift=0.5), layer_with("overflows", gamma=1e6), layer_with("last", shift=2.0)]
    drifts = health[1]
    assert drifts.mean_shift[3] == pytest.approx(3.0) and drifts.variance_ratio == pytest.approx([1.0] * 4)
    assert drifts.drift == pytest.approx(3.0) and drifts.drifting == [3] and drifts.verdict == "drift"
    assert health[0].healthy and health[0].drift == pytest.approx(0.1)
    assert health[2].verdict == "dead" and health[4].verdict == "fp16 overflow"  # s = 1e6 > 65504 on its own
    assert [h.name for h in by_severity(health)] == ["dead", "overflows", "drifts", "last", "calm", "first"]
    assert detail_layers(health) == {"first": "first BN", "dead": "#1 by severity", "overflows": "#2 by severity",
                                     "last": "last BN"}
    assert detail_layers(health[:2]) == {"first": "#2 by severity, first BN", "drifts": "#1 by severity, last BN"}
    assert channels_to_show(health[2], 2) == [0, 2] and channels_to_show(drifts, 3) == [0, 1, 3]


def test_a_halved_variance_drifts_by_one():
    bn = nn.BatchNorm2d(2).eval()
    layer = with_drift(layer_health("bn", bn), np.zeros(2), np.array([1.0, (1 + bn.eps) / 2 - bn.eps]))
    assert layer.variance_ratio[1] == pytest.approx(0.5) and layer.drift == pytest.approx(1.0)
