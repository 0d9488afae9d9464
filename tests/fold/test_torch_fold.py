import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnexport.errors import BnexportError, CheckFailed
from bnexport.fold import fold_module
from bnexport.fold import torch_patterns
from bnexport.model import ModelSpec, SimpleCNN, count_batchnorm
from fold.models import EVERYTHING_INPUT, CountBatchNorm, Everything, randomize_bn, relative_error


def test_simplecnn_folds_and_matches():
    model = randomize_bn(SimpleCNN(ModelSpec()))
    folded, report = fold_module(model, example_input=torch.zeros(4, 1, 28, 28))
    assert count_batchnorm(folded) == 0 and count_batchnorm(model) == 1  # the input is untouched
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("bn1", "folded", "conv1")]
    assert report.parity.passed and report.parity.results[0].max_rel < 1e-6
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
    assert {r.batchnorm: r.reason_code for r in report.kept} == {"bn_relu": "zero_padding", "bn_batch": "training_mode"}
    assert count_batchnorm(folded) == 2
    assert report.parity.passed and report.parity.input_shape == list(EVERYTHING_INPUT)
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


def test_grouped_conv_transpose():
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), nn.BatchNorm2d(12)))
    folded, report = fold_module(model, example_input=torch.zeros(1, 8, 5, 5))
    assert report.records[0].status == "folded" and count_batchnorm(folded) == 0
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6


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
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "shape_mismatch")
    assert "the Linear has 4 output channels, the BN 3" in report.records[0].reason
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_shared_conv_keeps_both_bns():
    """One conv module cannot hold two different folds: both BNs stay, and the numbers are the original's."""
    model = randomize_bn(SharedConv())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, example_input=x)
    assert [(r.status, r.reason_code) for r in report.records] == [("kept", "multiple_consumers")] * 2
    assert "called at 2 sites" in report.records[0].reason
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


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
    x = torch.randn(2, 3, 4, 4)
    folded, report = fold_module(model, example_input=x)
    assert [(r.status, r.reason_code) for r in report.records] == [("kept", "multiple_consumers")] * 2
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


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
    real = torch_patterns.bn_scale_shift_of

    def broken(stats, *, name):
        scale, shift = real(stats, name=name)
        return (scale, shift + 0.5) if name == "bn_up" else (scale, shift)

    monkeypatch.setattr(torch_patterns, "bn_scale_shift_of", broken)
    with pytest.raises(CheckFailed, match="first diverging layer: up") as caught:
        fold_module(randomize_bn(Everything()), example_input=torch.zeros(EVERYTHING_INPUT))
    report = caught.value.report
    assert report.parity.passed is False
    assert report.divergence.layer == "up" and report.divergence.tensor == "bn_up"
    assert report.divergence.result.max_abs > 0.1


class TiedWeight(nn.Module):
    """A folded conv whose weight is also read directly elsewhere: the original must survive the copy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def assert_kept_unchanged(model, x, code: str) -> None:
    """The first BN is kept with ``code``, and the folded copy computes exactly what the model does."""
    folded, report = fold_module(model, example_input=x)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", code)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_weight_read_directly_keeps_the_bn():
    """The conv's weight is also read directly: folding would change that read, so the BN stays."""
    model = randomize_bn(TiedWeight())
    x = torch.randn(2, 2, 3, 3)
    assert_kept_unchanged(model, x, "multiple_consumers")


# BatchNorms of every class, and the copy being the user's own class ---------------------

def executed_batch_norms(module, *args, **kwargs) -> int:
    with torch.no_grad(), CountBatchNorm() as counter:
        module(*args, **kwargs)
    return counter.calls


class ScaledBN(nn.BatchNorm2d):
    """A subclass with its own forward: BN, then a scale and an activation with parameters."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x):
        return self.act(super().forward(x) * 2)


class BnAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, as user code writes it: F.batch_norm on its own buffers, then dropout and activation."""

    def __init__(self, channels, p=0.0):
        super().__init__(channels)
        self.drop = nn.Dropout(p)
        self.act = nn.Hardswish()

    def forward(self, x):
        assert x.ndim == 4
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class Net(nn.Module):
    """Convs followed by BNs of several classes, with a method and an attribute of its own."""

    def __init__(self, norm_layers):
        super().__init__()
        self.features = nn.Sequential(*[m for i, norm in enumerate(norm_layers)
                                        for m in (nn.Conv2d(3 if i == 0 else 4, 4, 3, bias=i % 2 == 0), norm(4))])
        self.head = nn.Linear(4, 2)
        self.label = "mine"

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def describe(self) -> str:
        return f"{self.label}: {len(self.features)} layers"


def _frozen(channels):
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(channels)


def _sync(channels):
    return nn.SyncBatchNorm(channels)


@pytest.mark.parametrize("norm", [ScaledBN, BnAct, _frozen, _sync], ids=["subclass", "bn-act", "frozen", "sync"])
def test_every_batchnorm_class_folds(norm):
    model = randomize_bn(Net([norm, norm]))
    if norm is _frozen:  # FrozenBatchNorm2d holds its statistics as plain buffers
        g = torch.Generator().manual_seed(3)
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.copy_(torch.randn(4, generator=g))
                m.running_var.copy_(torch.rand(4, generator=g) + 0.5)
                m.weight.copy_(torch.rand(4, generator=g) + 0.5)
                m.bias.copy_(torch.randn(4, generator=g))
    x = torch.randn(2, 3, 9, 9)
    folded, report = fold_module(model, example_input=x)
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [
        ("features.1", "folded", "features.0"), ("features.3", "folded", "features.2")]
    assert report.parity.passed
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    assert executed_batch_norms(folded, x) == 0 and (norm is _frozen or executed_batch_norms(model, x) == 2)
    # the user's class, its method and attribute; the activation and its parameters stay where they were
    assert type(folded) is Net and folded.describe() == "mine: 4 layers"
    removed = {k for k in model.state_dict() if k.startswith(("features.1.", "features.3."))
               and not k.startswith(("features.1.act.", "features.3.act."))}
    gained = {"features.2.bias"}  # the bias-less conv gained one
    assert set(folded.state_dict()) == (set(model.state_dict()) - removed) | gained


def test_timm_batchnorm_act_folds_and_keeps_its_activation():
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU),
                                       nn.Conv2d(6, 6, 1), timm_layers.BatchNormAct2d(6, apply_act=False)))
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, example_input=x)
    assert [r.status for r in report.records] == ["folded", "folded"]
    assert isinstance(folded[1].act, nn.SiLU) and not isinstance(folded[1], nn.modules.batchnorm._BatchNorm)
    assert isinstance(folded[3], nn.Identity)  # no activation, no dropout: nothing left
    assert executed_batch_norms(folded, x) == 0
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    # its frozen twin computes x · s + t by hand, then the activation
    frozen = nn.Sequential(nn.Conv2d(3, 6, 3), timm_layers.FrozenBatchNormAct2d(6, act_layer=nn.ReLU)).eval()
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            getattr(frozen[1], name).copy_(getattr(model[1], name))
    folded, report = fold_module(frozen, example_input=x)
    assert report.records[0].status == "folded" and isinstance(folded[1].act, nn.ReLU)
    with torch.no_grad():
        assert relative_error(frozen(x), folded(x)) < 1e-6


class FunctionalBN(nn.Module):
    """F.batch_norm on the module's own buffers, after a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        for name, value in (("mean", torch.randn(5)), ("var", torch.rand(5) + 0.5), ("gamma", torch.rand(5) + 0.5),
                            ("beta", torch.randn(5))):
            self.register_buffer(name, value)

    def forward(self, x):
        return torch.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3))

    def channels(self) -> int:
        return self.conv.out_channels


def test_functional_batch_norm_on_buffers_folds():
    torch.manual_seed(0)
    model = nn.Sequential(FunctionalBN(), nn.Flatten()).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_module(model, example_input=x)
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("F.batch_norm(0.mean)", "folded", "0.conv")]
    assert executed_batch_norms(model, x) == 1 and executed_batch_norms(folded, x) == 0
    assert isinstance(folded[0], FunctionalBN) and folded[0].channels() == 5
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    oracle = fuse_conv_bn_eval(model[0].conv, _as_bn(model[0]))
    torch.testing.assert_close(folded[0].conv.weight, oracle.weight, rtol=1e-6, atol=1e-7)


def _as_bn(module: FunctionalBN) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(5, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(module.mean), bn.running_var.copy_(module.var)
        bn.weight.copy_(module.gamma), bn.bias.copy_(module.beta)
    return bn


class DataDependent(nn.Module):
    """A forward fx cannot trace (a branch on a tensor's value) around traceable blocks."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # called by the untraceable forward itself: its neighbour is unknown

    def forward(self, x):
        y = self.block(x) if x.sum() > 0 else self.other(x)
        return self.bn(self.conv(y))


def test_data_dependent_control_flow_folds_inside():
    model = randomize_bn(DataDependent())
    x = torch.randn(2, 3, 6, 6).abs()
    folded, report = fold_module(model, example_input=x)
    decisions = {r.batchnorm: (r.status, r.folded_into, r.reason_code) for r in report.records}
    assert decisions == {"block.1": ("folded", "block.0", None), "other.1": ("folded", "other.0", None),
                         "bn": ("kept", None, "untraceable")}
    assert "the model (DataDependent)" in report.kept[0].reason and "control flow" in report.kept[0].reason
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
        assert relative_error(model(-x), folded(-x)) < 1e-6  # the other branch


def test_untraceable_parent_calling_a_traced_child_layer_directly():
    """A conv inside a traced block that the untraceable parent also calls: folding it would change that call."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            if x.sum() > 0:
                return self.block(x) + self.block[0](x)
            return x

    model = randomize_bn(Parent())
    x = torch.rand(1, 3, 4, 4)
    assert_kept_unchanged(model, x, "multiple_consumers")


def test_dropout_in_train_mode_stays_in_train_mode():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BnAct(4, p=0.5), nn.Flatten(), nn.Dropout(0.3)))
    model[1].drop.train()
    model[3].train()
    folded, report = fold_module(model, example_input=torch.zeros(2, 3, 5, 5))  # the check reseeds dropout per run
    assert report.parity.passed and report.records[0].status == "folded"
    assert folded[1].drop.training and folded[3].training and not folded[0].training
    assert model[1].drop.training and not model[1].training


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))

    def forward(self, image, vector, scale: float = 1.0):
        return self.a(image).mean((2, 3)) * scale, self.b(vector)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_tuple_and_dict_example_inputs(form):
    model = randomize_bn(TwoInputs())
    image, vector = torch.zeros(2, 3, 5, 5), torch.zeros(3, 6)
    inputs = (image, vector) if form == "tuple" else {"image": image, "vector": vector, "scale": 2.0}
    folded, report = fold_module(model, example_inputs=inputs)
    assert [r.status for r in report.records] == ["folded", "folded"]  # Linear → BN1d needs the shapes
    assert [r.name for r in report.parity.results] == ["folded output 0", "folded output 1"]
    assert report.parity.input_shape == [[2, 3, 5, 5], [3, 6]]
    x, v = torch.randn(2, 3, 5, 5), torch.randn(3, 6)
    with torch.no_grad():
        for expected, got in zip(model(x, v), folded(x, v)):
            assert relative_error(expected, got) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_check_follows_the_dtype(dtype):
    from bnexport.config import tolerance_for

    model = randomize_bn(Net([nn.BatchNorm2d, nn.BatchNorm2d])).to(dtype)
    folded, report = fold_module(model, input_shape=(2, 3, 9, 9))
    name = str(dtype).removeprefix("torch.")
    assert report.parity.passed and report.parity.results[0].rtol == tolerance_for(name).rtol
    assert folded.features[0].weight.dtype == dtype and folded.features[2].bias.dtype == dtype
    if dtype == torch.float64:  # float64 maths, one rounding: equal to the oracle's float64 fusion
        oracle = fuse_conv_bn_eval(model.features[0], model.features[1])
        torch.testing.assert_close(folded.features[0].weight, oracle.weight, rtol=1e-14, atol=1e-15)


def test_a_bad_example_names_the_module_it_failed_in():
    model = randomize_bn(TwoInputs())
    with pytest.raises(BnexportError, match=r"'b\.0' \(Linear\) raised"):
        fold_module(model, example_inputs=(torch.zeros(2, 3, 5, 5), torch.zeros(3, 7)))


def test_untraceable_batchnorm_subclass_is_kept_and_named():
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), Odd(4)))
    folded, report = fold_module(model, example_input=torch.zeros(1, 3, 4, 4))
    record = report.records[0]
    assert (record.batchnorm, record.status, record.reason_code) == ("1", "kept", "untraceable")
    assert "Odd" in record.reason and "control flow" in record.reason


def test_modulelist_under_an_untraceable_forward_names_the_caller():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)])
            self.tail = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x) if x.mean() > -10 else x
            return self.tail(x)

    model = randomize_bn(Looped())
    x = torch.randn(1, 3, 4, 4)
    folded, report = fold_module(model, example_input=x)
    decisions = {r.batchnorm: (r.status, r.reason_code) for r in report.records}
    assert decisions == {"tail.1": ("folded", None), "blocks.1": ("kept", "untraceable")}
    assert "the model (Looped)" in report.records[1].reason
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6


def test_every_kept_record_has_a_known_reason_code():
    from bnexport.fold import REASON_CODES

    cases = [(Everything(), torch.zeros(EVERYTHING_INPUT)), (DataDependent(), torch.ones(1, 3, 4, 4)),
             (SharedConv(), torch.zeros(1, 3, 4, 4))]
    for model, x in cases:
        model = randomize_bn(model)
        _, report = fold_module(model, example_input=x, check=False)
        assert report.kept and all(r.reason_code in REASON_CODES and r.reason for r in report.kept)


def test_identity_and_eval_dropout_between_bn_and_layer():
    """As in an ONNX export, an eval-mode Dropout or an Identity between BN and layer does not stop the fold."""
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.Identity(), nn.BatchNorm1d(5), nn.Dropout(0.2), nn.Linear(5, 3),
                                       nn.BatchNorm1d(3), nn.Dropout(0.5)))
    x = torch.zeros(4, 6)
    folded, report = fold_module(model, example_input=x)
    assert [(r.batchnorm, r.folded_into, r.position) for r in report.folded] == [("2", "0", "after"), ("5", "4", "after")]
    model[3].train()  # a training Dropout is not the identity: BN → Dropout → Linear is not a fold
    model[0].bias.requires_grad_(False)
    _, report = fold_module(nn.Sequential(model[2], model[3], model[4]), example_input=torch.zeros(4, 5), check=False)
    assert report.records[0].status == "kept"


class LinearNorm(nn.Module):
    """LeViT's Linear → flatten(0, 1) → BatchNorm1d → reshape back."""

    def __init__(self, features):
        super().__init__()
        self.linear = nn.Linear(6, features, bias=False)
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_linear_reshape_batchnorm_folds():
    model = randomize_bn(LinearNorm(5))
    x = torch.zeros(2, 7, 6)
    folded, report = fold_module(model, example_input=x)
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("bn", "folded", "linear")]
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    _, report = fold_module(model, check=False)  # without shapes the BN's rank is unknown: kept
    assert report.records[0].reason_code == "shape_mismatch"


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: the stored weight is normalised at each call, so scaling it changes nothing."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class DynamicPadConv(nn.Conv2d):
    """Pads by an amount computed from the input's size: fx cannot trace it, but its caller still traces."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


def test_layer_subclass_with_its_own_forward_is_not_folded_into_and_does_not_block_its_caller():
    model = randomize_bn(nn.Sequential(StandardisedConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       DynamicPadConv(4, 5, 3), nn.BatchNorm2d(5), nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6)))
    x = torch.randn(2, 3, 9, 9)
    folded, report = fold_module(model, example_inputs=(x,))
    by_name = {r.batchnorm: r for r in report.records}
    assert (by_name["1"].status, by_name["1"].reason_code) == ("kept", "unsupported_layer")
    assert (by_name["4"].status, by_name["4"].reason_code) == ("kept", "unsupported_layer")  # and zero padding after it
    assert by_name["6"].status == "folded"  # the Sequential traces although DynamicPadConv's forward does not
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6


def test_timm_same_padding_conv_folds_the_bn_after_it_and_keeps_the_one_before():
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(nn.Sequential(timm_layers.Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4),
                                       timm_layers.Conv2dSame(4, 5, 3)))
    x = torch.randn(1, 3, 11, 11)
    folded, report = fold_module(model, example_inputs=(x,))
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("1", "folded", "0")]
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-6
    # BN → Conv2dSame alone: the dynamic zero padding makes the fold before it inexact
    _, report = fold_module(randomize_bn(nn.Sequential(nn.BatchNorm2d(3), timm_layers.Conv2dSame(3, 4, 3))),
                            example_inputs=(x,))
    assert report.records[0].reason_code == "zero_padding"


class Cancelling(nn.Module):
    """Two nearly equal branches subtracted: the output is 1e-5 of each branch, so float32 rounding of
    the branches (and of their folded weights) is about 1e-2 of the output, far past any float32 tolerance."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv_b.weight.copy_(self.conv_a.weight * (1 + 1e-5))
            self.conv_b.bias.copy_(self.conv_a.bias)

    def forward(self, x):
        x = 1000 * x  # outputs well above the check's atol
        return self.bn_a(self.conv_a(x)) - self.bn_b(self.conv_b(x))


def _cancelling() -> nn.Module:
    model = randomize_bn(Cancelling())
    model.bn_b.load_state_dict(model.bn_a.state_dict())
    return model


def test_a_model_that_amplifies_rounding_passes_when_the_float64_fold_is_exact():
    model, x = _cancelling(), torch.randn(2, 3, 8, 8)
    folded, report = fold_module(model, example_inputs=(x,))
    assert len(report.folded) == 2
    (rounding,) = report.parity.within_own_rounding
    assert report.parity.passed and not report.parity.results[0].passed  # missed the float32 tolerance
    # the independent oracle: the model and the folded copy in float64
    with torch.no_grad():
        exact = model.double()(x.double())
        folded64 = fold_module(model, example_inputs=(x.double(),), check=False)[0](x.double())
    assert relative_error(exact, folded64) < 1e-9
    assert rounding["unfolded_vs_float64"] > 1e-4 and "amplifies rounding" in report.notes[0]


def test_a_wrong_fold_of_a_model_that_amplifies_rounding_still_fails(monkeypatch):
    real = torch_patterns.bn_scale_shift_of

    def broken(stats, *, name):
        scale, shift = real(stats, name=name)
        return (scale, shift + 1e-3) if name == "bn_a" else (scale, shift)

    monkeypatch.setattr(torch_patterns, "bn_scale_shift_of", broken)
    with pytest.raises(CheckFailed):
        fold_module(_cancelling(), example_inputs=(torch.randn(2, 3, 8, 8),))
