import math

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnexport.errors import BnexportError, CheckFailed
from bnexport.fold import fold_module
from bnexport.fold import torch_fold
from bnexport.model import ModelSpec, SimpleCNN, count_batchnorm
from fold.models import EVERYTHING_INPUT, Everything, randomize_bn, relative_error


def test_simplecnn_folds_and_matches():
    model = randomize_bn(SimpleCNN(ModelSpec()))
    folded, report = fold_module(model, example_input=torch.zeros(4, 1, 28, 28))
    assert count_batchnorm(folded) == 0 and count_batchnorm(model) == 1  # the input is untouched
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("bn1", "folded", "conv1")]
    assert report.parity["passed"] and report.parity["results"][0]["max_rel"] < 1e-6
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_pattern_in_one_module():
    model = randomize_bn(Everything())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    folded, report = fold_module(model, example_input=torch.zeros(EVERYTHING_INPUT))
    # the input is untouched, and shares no module or tensor with the result
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert dict(model.named_modules()) == modules_before and model.bn_a.training is False
    assert not {id(m) for m in model.modules()} & {id(m) for m in folded.modules()}
    assert not {id(p) for p in model.parameters()} & {id(p) for p in folded.parameters()}
    folded.train()
    assert not model.training and not model.bn_relu.training
    folded.eval()
    decisions = [(r.batchnorm, r.status, r.folded_into, r.position) for r in report.records]
    assert decisions == [
        ("bn_in", "folded", "conv_a", "before"), ("bn_a", "folded", "conv_a", "after"),
        ("bn_up", "folded", "up", "after"), ("bn_relu", "kept", None, None), ("bn_batch", "kept", None, None),
        ("bn_fc", "folded", "fc", "after"), ("bn_head", "folded", "fc", "after"),
    ]
    reasons = {r.batchnorm: r.reason for r in report.kept}
    assert "zero padding" in reasons["bn_relu"] and "track_running_stats=False" in reasons["bn_batch"]
    assert count_batchnorm(folded) == 2
    assert report.parity["passed"] and report.parity["input_shape"] == list(EVERYTHING_INPUT)
    x = torch.randn(5, *EVERYTHING_INPUT[1:]) * 3
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("layer, bn_cls", [
    (nn.Conv2d(3, 6, 3, stride=2, dilation=2, groups=3), nn.BatchNorm2d),
    (nn.Conv1d(4, 8, 5, bias=False), nn.BatchNorm1d),
    (nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d),
    (nn.Linear(7, 5), nn.BatchNorm1d),
])
def test_fold_equals_torch_fusion_oracle(layer, bn_cls):
    """The folded layer's weights are torch.nn.utils.fusion's, computed independently."""
    model = randomize_bn(nn.Sequential(layer, bn_cls(output_size := (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels))))
    in_features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    shape = (2, in_features) if isinstance(layer, nn.Linear) else (2, in_features, *([9] * (layer.weight.dim() - 2)))
    folded, report = fold_module(model, example_input=torch.zeros(shape))
    oracle = (fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval)(model[0], model[1])
    ours = getattr(folded, report.records[0].folded_into)
    assert ours.weight.shape == oracle.weight.shape and ours.bias.shape == (output_size,)
    torch.testing.assert_close(ours.weight, oracle.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.bias, oracle.bias, rtol=1e-6, atol=1e-6)


def test_grouped_conv_transpose_where_torch_fusion_fails():
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), nn.BatchNorm2d(12)))
    folded, report = fold_module(model, example_input=torch.zeros(1, 8, 5, 5))
    assert report.records[0].status == "folded" and count_batchnorm(folded) == 0
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    with pytest.raises(RuntimeError):  # pytorch#180995: fusion scales the wrong axis for groups > 1
        fuse_conv_bn_eval(model[0], model[1], transpose=True)(x)


class BnBeforeLayers(nn.Module):
    def __init__(self, padding: int, padding_mode: str = "zeros"):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, groups=1)
        self.bn_flat = nn.BatchNorm1d(4 * 36)
        self.fc = nn.Linear(4 * 36, 2)

    def forward(self, x):
        return self.fc(self.bn_flat(torch.flatten(self.conv(self.bn(x)), 1)))


@pytest.mark.parametrize("padding, padding_mode, folded_names", [
    (0, "zeros", ["bn", "bn_flat"]),
    (1, "reflect", ["bn", "bn_flat"]),  # the padded border copies normalised values: exact
    (1, "zeros", ["bn_flat"]),  # zeros stay zeros after the fold: inexact, kept
])
def test_bn_before_conv_and_linear(padding, padding_mode, folded_names):
    size = 8 - 2 + 2 * padding
    model = BnBeforeLayers(padding, padding_mode)
    model.bn_flat = nn.BatchNorm1d(4 * size * size)
    model.fc = nn.Linear(4 * size * size, 2)
    model = randomize_bn(model)
    folded, report = fold_module(model, example_input=torch.zeros(1, 3, 8, 8))
    assert [r.batchnorm for r in report.folded] == folded_names
    assert all(r.position == "before" for r in report.folded)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5
    if "bn" not in folded_names:
        assert "zero padding" in report.kept[0].reason


def test_linear_needs_shapes_to_fold():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)))
    _, report = fold_module(model, check=False)
    assert report.records[0].status == "kept" and "example_input" in report.records[0].reason
    # BatchNorm1d on 3-D input normalises axis 1, the Linear's features are the last axis: never folded
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3)))
    folded, report = fold_module(model, example_input=torch.zeros(2, 3, 4))
    assert report.records[0].status == "kept"
    assert "3-D" in report.records[0].reason or "output channels" in report.records[0].reason


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_shared_conv_gets_one_fold_per_site():
    model = randomize_bn(SharedConv())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, check=False)
    assert [r.status for r in report.records] == ["folded", "folded"]
    assert len({r.folded_into for r in report.records}) == 2
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # the case torch.fx's own fuse gets wrong, which is why this test exists
    from torch.fx.experimental.optimization import fuse
    with torch.no_grad():
        assert (fuse(model)(x) - model(x)).abs().max() > 1e-2


class SharedConvAfterBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(self.bn_a(x)) - self.conv(self.bn_b(x))


def test_shared_conv_after_two_bns():
    model = randomize_bn(SharedConvAfterBn())
    folded, report = fold_module(model, example_input=torch.zeros(1, 3, 4, 4))
    assert [(r.status, r.position) for r in report.records] == [("folded", "before"), ("folded", "before")]
    assert len({r.folded_into for r in report.records}) == 2 and count_batchnorm(folded) == 0
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


class ConvFeedsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_two_users_is_kept_with_a_reason():
    model = randomize_bn(ConvFeedsTwo())
    folded, report = fold_module(model, check=False)
    assert report.records[0].status == "kept" and "feeds more than the BN" in report.records[0].reason
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_bn_without_running_stats_is_kept():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    _, report = fold_module(model, check=False)
    assert report.records[0].status == "kept" and "track_running_stats=False" in report.records[0].reason


def test_training_mode_is_refused():
    with pytest.raises(BnexportError, match="training mode"):
        fold_module(SimpleCNN().train(), check=False)


@pytest.mark.parametrize("var, eps, cause", [(-0.5, 1e-5, "negative"), (math.nan, 1e-5, "NaN"), (0.0, 0.0, "zero with eps=0")])
def test_invalid_statistics_are_refused_by_name(var, eps, cause):
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, eps=eps)))
    with torch.no_grad():
        model[1].running_var[1] = var
    with pytest.raises(BnexportError, match=f"BatchNorm '1': running variance has 1 {cause}"):
        fold_module(model, check=False)


def test_no_batchnorm_folds_to_itself():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    folded, report = fold_module(model, example_input=torch.zeros(1, 1, 5, 5))
    assert report.records == [] and report.parity is None
    x = torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_a_wrong_fold_is_caught_and_the_layer_named(monkeypatch):
    """A deliberately broken fold of one layer: the check fails and the drill-down names that layer."""
    real = torch_fold.fold_layer_bn

    def broken(layer, bn, *, bn_name=""):
        folded = real(layer, bn, bn_name=bn_name)
        if bn_name == "bn_up":
            with torch.no_grad():
                folded.bias.add_(0.5)
        return folded

    monkeypatch.setattr(torch_fold, "fold_layer_bn", broken)
    with pytest.raises(CheckFailed, match="first diverging layer: up") as caught:
        fold_module(randomize_bn(Everything()), example_input=torch.zeros(EVERYTHING_INPUT))
    report = caught.value.report
    assert report.parity["passed"] is False
    assert report.divergence["layer"] == "up" and report.divergence["tensor"] == "bn_up"
    assert report.divergence["result"]["max_abs"] > 0.1


class TiedWeight(nn.Module):
    """A folded conv whose weight is also read directly elsewhere: the original must survive the copy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def test_weight_read_directly_survives_the_fold():
    model = randomize_bn(TiedWeight())
    folded, report = fold_module(model, example_input=torch.zeros(1, 2, 3, 3))
    assert report.records[0].status == "folded"
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
