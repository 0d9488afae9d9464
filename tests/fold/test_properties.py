"""Property tests: random layer configurations and BN statistics must fold exactly, or be kept.

The "ci" profile in conftest.py derandomizes hypothesis, so every run draws the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bnexport.config import DEFAULT_TOLERANCE
from bnexport.fold import fold_module, fold_onnx
from fold.models import export_torchscript_onnx, ort_run, relative_error

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass
class Case:
    kind: str  # conv | transposed | linear
    bn_first: bool
    dims: int  # spatial dims; 0 for linear
    groups: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    dilation: int
    padding: int
    bias: bool
    affine: bool
    seed: int
    var_exponent: float  # running variance = 10 ** var_exponent · U(0.5, 1.5)
    gamma_scale: float

    def build(self) -> nn.Module:
        if self.kind == "linear":
            layer = nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        else:
            cls = CONV[self.dims] if self.kind == "conv" else TRANSPOSED[self.dims]
            layer = cls(self.in_channels, self.out_channels, self.kernel, stride=self.stride, dilation=self.dilation,
                        padding=self.padding, groups=self.groups, bias=self.bias)
        bn = BN[self.dims](self.in_channels if self.bn_first else self.out_channels, affine=self.affine)
        model = nn.Sequential(bn, layer) if self.bn_first else nn.Sequential(layer, bn)
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 2)
            bn.running_var.copy_((torch.rand(bn.num_features, generator=g) + 0.5) * 10 ** self.var_exponent)
            if self.affine:
                bn.weight.copy_(torch.randn(bn.num_features, generator=g) * self.gamma_scale)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        return model.eval()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2, self.in_channels) if self.kind == "linear" else (2, self.in_channels, *([7] * self.dims))

    @property
    def foldable(self) -> bool:
        """What bnexport must decide: exact folds are made, the inexact ones kept."""
        if not self.bn_first:
            return True
        if self.kind == "transposed":
            return False  # border outputs sum fewer taps
        return self.kind == "linear" or self.padding == 0  # zero padding is not shifted


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["conv", "transposed", "linear"]))
    groups = 1 if kind == "linear" else draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    depthwise = kind != "linear" and draw(st.booleans())
    if depthwise:  # depthwise: one group per input channel
        groups = in_channels
        out_channels = in_channels * draw(st.integers(1, 2))
    return Case(
        kind=kind,
        bn_first=draw(st.booleans()),
        dims=0 if kind == "linear" else draw(st.integers(1, 3)),
        groups=groups, in_channels=in_channels, out_channels=out_channels,
        kernel=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), dilation=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 1)), bias=draw(st.booleans()), affine=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        var_exponent=draw(st.sampled_from([-8.0, -4.0, 0.0, 2.0])),  # tiny variances included
        gamma_scale=draw(st.sampled_from([0.1, 1.0, 100.0])),  # large γ included
    )


def _inputs(case: Case) -> np.ndarray:
    return np.random.default_rng(case.seed).standard_normal(case.input_shape).astype(np.float32)


def _bound(reference: np.ndarray) -> float:
    """The parity module's own criterion, as a relative error."""
    scale = float(np.abs(reference).max())
    return (DEFAULT_TOLERANCE.atol + DEFAULT_TOLERANCE.rtol * scale) / max(scale, 1e-30)


@given(cases())
def test_module_fold_is_exact_or_kept(case: Case):
    model = case.build()
    folded, report = fold_module(model, example_input=torch.zeros(case.input_shape))  # check=True raises on a miss
    assert [r.status for r in report.records] == ["folded" if case.foldable else "kept"]
    assert type(folded) is nn.Sequential  # the user's own class, not an fx.GraphModule
    bn_index, layer_index = (0, 1) if case.bn_first else (1, 0)
    bn_keys = {k for k in model.state_dict() if k.startswith(f"{bn_index}.")}
    if case.foldable:
        assert report.parity.passed
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        # state-dict keys change only where the BN was removed, plus the bias a bias-less layer gains
        assert set(folded.state_dict()) == (set(model.state_dict()) - bn_keys) | {f"{layer_index}.bias"}
    else:
        assert set(folded.state_dict()) == set(model.state_dict())
    x = _inputs(case)
    with torch.no_grad():
        expected, got = model(torch.from_numpy(x)).numpy(), folded(torch.from_numpy(x)).numpy()
    assert relative_error(expected, got) <= _bound(expected)


@given(cases())
def test_onnx_fold_is_exact_or_kept(case: Case):
    model = case.build()
    original = export_torchscript_onnx(model, torch.zeros(case.input_shape))
    folded, report = fold_onnx(original)
    assert [r.status for r in report.records] == ["folded" if case.foldable else "kept"], report.table()
    x = _inputs(case)
    expected = ort_run(original, x)
    got = ort_run(folded, x)
    assert relative_error(expected, got) <= _bound(expected)
    with torch.no_grad():  # and the folded graph still computes what the torch module does
        reference = model(torch.from_numpy(x)).numpy()
    assert relative_error(reference, got) <= 2 * _bound(reference)
