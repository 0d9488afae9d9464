"""The folding maths, written once for numpy arrays and torch tensors alike.

In eval mode BatchNorm is a per-channel affine map,

    BN(y) = γ · (y − μ) / √(σ² + ε) + β = s · y + t,   s = γ / √(σ² + ε),   t = β − μ · s.

Folding it into the linear layer before it, y = w ⊛ x + b, gives

    w' = w · γ / √(σ² + ε)            (scaled along each *output* channel)
    b' = (b − μ) · γ / √(σ² + ε) + β

Folding BN into the layer *after* it (BN → Conv, BN → Linear) is in
``fold_into_input_channels``.

The same two maps, applied where the BN is not next to one layer:

- **Through a Pad** (BN → Pad → Conv). Reflect, edge and wrap padding copy values, and a copy
  of s · x + t is s · (copy of x) + t, so the BN commutes with the Pad and folds into the Conv
  after it. A constant pad writes a value the BN never touched: not exact, kept.
- **After a Concat** of layers y_1 … y_k along channels. Layer i owns the channel range
  R_i = [o_i, o_i + C_i), so BN(concat(y_1 … y_k)) = concat(s[R_i] · y_i + t[R_i]): each layer
  folds its own slice, w_i' = w_i · s[R_i], b_i' = b_i · s[R_i] + t[R_i].
- **After an Add** of layers y_1 … y_k whose channels line up. BN(Σ y_i) = Σ s · y_i + t:
  every layer takes the scale, w_i' = w_i · s, b_i' = b_i · s, and exactly one takes the shift,
  b_1' = b_1 · s + t. Broadcasting over the batch or spatial axes keeps this exact, since s and t
  do not vary along them; broadcasting along the channel axis does not.
- **Through a Reshape** (Linear → flatten → BatchNorm1d → reshape, the token BN of LeViT). The
  Linear's features are its last axis; row-major flattening to (rows, C) keeps them as axis 1,
  the axis BN normalises, so it is Linear → BN on a 2-D tensor: w' = w · s, b' = b · s + t.
- **Into quantized weights** (DequantizeLinear(q, δ, z) → Conv → BN). The weight is
  w = (q − z) · δ, so w · s = (q − z) · (δ · s): the BN's scale moves into the dequantize
  scale, per output channel (a per-tensor δ becomes per-channel), and q is untouched. A
  channel with s < 0 is mirrored around z, so its scale stays positive as quantizers write
  it: (q − z) · δ · s = (q' − z) · δ · |s| with q' = 2z − q, exact in integers and kept only
  when q' stays within the dtype (int8 −128 with z = 0 does not). The shift goes into the
  bias as above.
- **Inside a function**: a model-local ONNX function's body is a graph like any other, so each
  fold above applies in it; where the weights are the function's inputs, each call site binds
  its own folded copy.

The functions below use only arithmetic, ``reshape`` and ``sum``, so the same code serves
torch tensors (module folding) and numpy arrays (ONNX initializers). Callers compute s and t
in float64 and cast back, which keeps the fold's own rounding far below the tolerance of a
float32 check.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor


def bn_scale_shift(gamma: Array, beta: Array, mean: Array, var: Array, eps: float) -> tuple[Array, Array]:
    """Return (s, t) with BN(y) = s · y + t per channel."""
    scale = gamma / (var + eps) ** 0.5
    return scale, beta - mean * scale


def invalid_statistics(var: Array, eps: float) -> str | None:
    """Why running variances cannot give a finite BN, or None when they can.

    σ² < 0 or NaN makes √(σ² + ε) NaN, and σ² + ε = 0 divides by zero: such a BN outputs
    NaN or ∞ already, so folding it would only hide a broken model.
    """
    var = var.reshape(-1)
    bad = [(var != var), var < 0, (var + eps) == 0]  # NaN is the one value not equal to itself
    for mask, what in zip(bad, ("NaN", "negative", f"zero with eps={eps:g}")):
        count = int(mask.sum())
        if count:
            return f"running variance has {count} {what} value{'s' if count > 1 else ''}"
    return None


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


def fold_into_input_channels(
    weight: Array, bias: Array | None, scale: Array, shift: Array, *, groups: int = 1
) -> tuple[Array, Array]:
    """Fold BN *before* a Conv (no zero padding) or Linear, whose weight is (C_out, C_in / groups, *kernel).

    The layer sees x̂ = s · x + t instead of x. Every output position of a Linear, or of a
    conv that pads no zeros, sums over all of its kernel taps, so

        w'[o, i, k] = w[o, i, k] · s[c(o, i)]
        b'[o]       = b[o] + Σ_{i,k} w[o, i, k] · t[c(o, i)]

    where c(o, i) = g · (C_in/groups) + i is the input channel that weight column i of output
    o's group g reads. A zero-padded border breaks this: the padded zeros are not shifted by t,
    so those positions would get a bias they never had.
    """
    c_out, c_in_per_group, *kernel = weight.shape
    per_output = scale.reshape(groups, 1, c_in_per_group)  # s[c(o, i)] for the outputs of each group
    shift_per_output = shift.reshape(groups, 1, c_in_per_group)
    blocks = weight.reshape(groups, c_out // groups, c_in_per_group, -1)
    folded_weight = (blocks * per_output[..., None]).reshape(weight.shape)
    added = (blocks.sum(-1) * shift_per_output).sum(-1).reshape(c_out)
    folded_bias = added if bias is None else bias + added
    return folded_weight, folded_bias
