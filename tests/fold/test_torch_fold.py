import pytest
import torch
from torch import nn

from bnexport.errors import BnexportError
from bnexport.fold import fold_module
from bnexport.model import ModelSpec, SimpleCNN, count_batchnorm


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, as a trained net would have."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def test_simplecnn_folds_and_matches():
    model = randomize_bn(SimpleCNN(ModelSpec()))
    folded, report = fold_module(model, example_input=torch.zeros(4, 1, 28, 28))
    assert count_batchnorm(folded) == 0 and count_batchnorm(model) == 1  # the input is untouched
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("bn1", "folded", "conv1")]
    assert report.parity["passed"] and report.parity["results"][0]["max_rel"] < 1e-6
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


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
