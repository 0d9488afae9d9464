"""The folding maths, written once for numpy arrays and torch tensors alike.

In eval mode BatchNorm is a per-channel affine map,

    BN(y) = γ · (y − μ) / √(σ² + ε) + β = s · y + t,   s = γ / √(σ² + ε),   t = β − μ · s.

Folding it into the linear layer before it, y = w ⊛ x + b, gives

    w' = w · γ / √(σ² + ε)            (scaled along each *output* channel)
    b' = (b − μ) · γ / √(σ² + ε) + β

The functions below use only arithmetic and ``reshape``, so the same code serves torch
tensors (module folding) and numpy arrays (ONNX initializers). Callers pass float64 copies
and cast back, which keeps the fold's own rounding far below the tolerance of a float32
check.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor


def bn_scale_shift(gamma: Array, beta: Array, mean: Array, var: Array, eps: float) -> tuple[Array, Array]:
    """Return (s, t) with BN(y) = s · y + t per channel."""
    scale = gamma / (var + eps) ** 0.5
    return scale, beta - mean * scale


def _broadcast(vector: Array, ndim: int, axis: int) -> Array:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def fold_into_output_channels(weight: Array, bias: Array | None, scale: Array, shift: Array) -> tuple[Array, Array]:
    """Fold BN after a layer whose weight has output channels on axis 0 (Conv, Linear, Gemm transB=1).

    w' = w · s,  b' = b · s + t  ( = (b − μ) · s + β ).
    """
    folded_weight = weight * _broadcast(scale, len(weight.shape), 0)
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias


def fold_into_transposed_conv(
    weight: Array, bias: Array | None, scale: Array, shift: Array, *, groups: int = 1
) -> tuple[Array, Array]:
    """Fold BN after a ConvTranspose, whose weight is laid out (C_in, C_out / groups, *kernel).

    Output channel ``g · (C_out/groups) + j`` is column ``j`` of group ``g``'s block of rows,
    so the scale is applied per (group, column), not along a single axis.
    """
    c_in, c_out_per_group, *kernel = weight.shape
    blocks = weight.reshape(groups, c_in // groups, c_out_per_group, *kernel)
    per_block = scale.reshape(groups, 1, c_out_per_group, *([1] * len(kernel)))
    folded_weight = (blocks * per_block).reshape(c_in, c_out_per_group, *kernel)
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias
