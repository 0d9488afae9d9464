"""The fold maths against torch.nn.utils.fusion, the independent oracle."""

import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from bnexport.fold.maths import bn_scale_shift, fold_into_output_channels, fold_into_transposed_conv


def random_bn(channels: int, generator: torch.Generator):
    return (torch.rand(channels, generator=generator, dtype=torch.float64) * 2 + 0.1,  # γ
            torch.randn(channels, generator=generator, dtype=torch.float64),  # β
            torch.randn(channels, generator=generator, dtype=torch.float64),  # μ
            torch.rand(channels, generator=generator, dtype=torch.float64) + 1e-3)  # σ²


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("weight_shape", [(8, 3, 3, 3), (4, 2, 5), (6, 1, 3, 3, 3), (10, 7)])
def test_matches_torch_fusion(weight_shape, with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(weight_shape, generator=g, dtype=torch.float64)
    bias = torch.randn(weight_shape[0], generator=g, dtype=torch.float64) if with_bias else None
    gamma, beta, mean, var = random_bn(weight_shape[0], g)
    eps = 1e-5
    expected_w, expected_b = fuse_conv_bn_weights(weight, bias, mean, var, eps, gamma, beta)
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    w, b = fold_into_output_channels(weight, bias, scale, shift)
    torch.testing.assert_close(w, expected_w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, expected_b.detach(), rtol=1e-12, atol=1e-12)
    # the same code on numpy arrays gives the same numbers
    nw, nb = fold_into_output_channels(weight.numpy(), None if bias is None else bias.numpy(),
                                       *bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), eps))
    np.testing.assert_allclose(nw, w.numpy(), rtol=1e-14)
    np.testing.assert_allclose(nb, b.numpy(), rtol=1e-14)


def test_docstring_formula():
    w, b = torch.tensor([[2.0]]), torch.tensor([1.0])
    gamma, beta, mean, var, eps = torch.tensor([3.0]), torch.tensor([0.5]), torch.tensor([4.0]), torch.tensor([8.0]), 1.0
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    fw, fb = fold_into_output_channels(w, b, scale, shift)
    assert float(fw) == pytest.approx(2 * 3 / 3)  # w·γ/√(σ²+ε) = 2·3/√9
    assert float(fb) == pytest.approx((1 - 4) * 3 / 3 + 0.5)  # (b−μ)·γ/√(σ²+ε)+β


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_transposed_conv_fold_equals_bn_after_it(groups, dims):
    g = torch.Generator().manual_seed(groups * 10 + dims)
    conv_cls = [torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d][dims - 1]
    bn_cls = [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d][dims - 1]
    conv = conv_cls(8, 12, 3, groups=groups, stride=2).double().eval()
    bn = bn_cls(12).double().eval()
    gamma, beta, mean, var = random_bn(12, g)
    with torch.no_grad():
        bn.weight.copy_(gamma), bn.bias.copy_(beta), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    w, b = fold_into_transposed_conv(conv.weight.detach(), conv.bias.detach(),
                                     *bn_scale_shift(gamma, beta, mean, var, bn.eps), groups=groups)
    x = torch.randn(2, 8, *([5] * dims), generator=g, dtype=torch.float64)
    functional = [torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                  torch.nn.functional.conv_transpose3d][dims - 1]
    with torch.no_grad():
        expected = bn(conv(x))
        got = functional(x, w, b, stride=2, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
