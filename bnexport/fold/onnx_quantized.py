"""BN after a layer whose weight is quantized, in ONNX: DequantizeLinear(q, δ, z) → Conv → BN.

The maths is in ``maths`` ("Into quantized weights"): w = (q − z) · δ, so w · s = (q − z) · (δ · s),
and the BN's scale moves into the dequantize scale of each output channel while q stays. What
this module decides is how to write that so runtimes accept it and the numbers do not move:

- **Per channel, on the output axis.** The new scale is δ'_c = |δ_c · s_c| along the weight's
  output-channel axis (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 and 1 without, MatMul 1).
  A per-tensor δ becomes per-channel (``axis`` set, the zero point repeated per channel), which
  DequantizeLinear allows from opset 13; an opset-10 model keeps the BN (``shape_mismatch``),
  as does a weight quantized per channel along another axis, block-wise (``block_size``), or a
  grouped ConvTranspose, whose output channels are not one axis of its weight.
- **Negative s_c: flip the channel.** ONNX Runtime's DequantizeLinear multiplies by a negative
  scale as written, but quantizers write only positive scales and tools that read QDQ models
  assume them (a negative scale mirrors QuantizeLinear's rounding and clipping), so a negative
  product is written as q' = 2z − q with scale |δ_c · s_c|: (q' − z) = −(q − z) in integers,
  so the dequantized weight is exactly w · s. The zero point stays, so one zero point still
  serves every channel (ONNX Runtime's QLinearConv requires that of a per-channel weight), and
  a zero point z ≠ 0 folds too. q' must fit the dtype: int8 −128 with z = 0 has no +128, and
  uint8 with z = 0 has no negative values, so such a channel keeps the BN (``dtype``).
- **The bias.** The shift t goes into the layer's bias, b' = b · s + t. A float bias (or none)
  takes it as a float constant. A bias that is itself DequantizeLinear(int32 q_b, δ_b, 0), the
  QDQ format, must keep δ_b = δ_x · δ_w (input scale times weight scale) for runtimes that fuse
  the group into QLinearConv, which reads q_b and assumes that scale. So the bias is
  requantized with δ_b' = δ_x · δ_w' only where q_b' = b'/δ_b' is an integer to float32 rounding
  and fits q_b's dtype, which its zero point shares (a BN without shift, a bias scaled only);
  otherwise the dequantized bias is replaced by the float constant b' and its DequantizeLinear
  dropped. That is exact in ONNX
  semantics, and ONNX Runtime (1.32, optimisations on) still fuses DequantizeLinear → Conv →
  QuantizeLinear into one QLinearConv: it quantizes a float bias itself, with the scale
  δ_x · δ_w. Before the fold it could not fuse at all, the BN sitting between the Conv and its
  QuantizeLinear. Rounding q_b' here instead would be within δ_b'/2 of b', as a quantizer's
  own bias is, but it is not the model's number, and a fold never changes the model's numbers.
- **Read once.** The DequantizeLinear must feed only this layer (``multiple_consumers``
  otherwise); q, δ and z initializers shared with other nodes are copied, as every fold does.

Nothing here touches the activations' QuantizeLinear → DequantizeLinear pairs: they pass
through unchanged. A BN after a quantized activation (Conv → QuantizeLinear → DequantizeLinear
→ BN, what ``quantize_static`` writes when it quantizes a Conv's output) is not next to the Conv
in value, since the rounding sits between them, and is kept (``no_linear_neighbour``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .onnx_graph import ONNX_DOMAINS, attribute, node_label, set_attribute
from .onnx_patterns import ABSORBED_PREFIX, Absorbed, GraphFolder, Kept, _note


QUANTIZED_DTYPES = {"int8", "uint8", "int16", "uint16", "int32"}
SCALE_DTYPES = {"float16", "float32"}
FIRST_PER_CHANNEL_OPSET = 13  # DequantizeLinear's ``axis`` attribute
EXACT_INTEGER = 1e-6  # q_b' is an integer when within this fraction of itself (float32 rounding of the product)


def quantized_weight(folder: GraphFolder, layer: onnx.NodeProto) -> onnx.NodeProto | None:
    """The DequantizeLinear that computes ``layer``'s weight, or None (one dict lookup: no cost for float layers)."""
    if len(layer.input) < 2:
        return None
    producer = folder.index.producer.get(layer.input[1])
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ONNX_DOMAINS:
        return None
    return producer


def _output_axis(layer: onnx.NodeProto) -> int:
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "Gemm":
        return 0 if attribute(layer, "transB", 0) else 1
    return 1  # ConvTranspose (C_in, C_out / groups, ...), MatMul (K, N)


def fold_quantized_then_bn(folder: GraphFolder, bn: onnx.NodeProto, layer: onnx.NodeProto,
                           dequantize: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray, *,
                           add: onnx.NodeProto | None = None, add_position: int | None = None,
                           add_constant: np.ndarray | None = None) -> "Kept | onnx.NodeProto":
    """Fold BN into a layer whose weight is DequantizeLinear(q, δ, z) [→ Add(constant)] → BN; return the layer or why not.

    Every guard runs before the first write, so a kept BN leaves the graph as it was.
    """

    index = folder.index
    op = layer.op_type
    if op == "ConvTranspose" and attribute(layer, "group", 1) != 1:
        return Kept("shape_mismatch", "a grouped ConvTranspose's output channels are (group, column) pairs, "
                                      "which no single dequantize axis holds")
    if op == "MatMul" and index.rank(bn.input[0]) != 2:
        return Kept("shape_mismatch", "BN normalises axis 1, but the MatMul's output channels are its last axis "
                                      "(input is not 2-D)")
    weight_name = layer.input[1]
    if weight_name in index.graph_outputs or index.value_use_count(weight_name) != 1:
        return Kept("multiple_consumers", f"the {op}'s dequantized weight feeds more than the {op}")
    parts = _dequantize_parts(folder, dequantize)
    if isinstance(parts, Kept):
        return parts
    q, delta, zero = parts
    axis = _output_axis(layer)
    if q.ndim <= axis or q.shape[axis] != len(scale):
        channels = q.shape[axis] if q.ndim > axis else "no"
        return Kept("shape_mismatch", f"the {op} has {channels} output channels, the BN {len(scale)}")
    per_channel = delta.size > 1
    if per_channel and int(attribute(dequantize, "axis", 1)) % q.ndim != axis:
        return Kept("shape_mismatch", f"the weight is quantized per channel along axis {attribute(dequantize, 'axis', 1)}, "
                                      f"not the {op}'s output channels (axis {axis})")
    if not per_channel and folder.context.opset < FIRST_PER_CHANNEL_OPSET:
        return Kept("shape_mismatch", f"DequantizeLinear at opset {folder.context.opset} has one scale per tensor, and "
                                      "the BN needs one per output channel (opset 13 or later)")
    channels = len(scale)
    delta_c = np.broadcast_to(delta.astype(np.float64).reshape(-1), (channels,))
    zero_c = np.broadcast_to(zero.astype(np.int64).reshape(-1), (channels,))
    product = delta_c * scale
    new_delta = np.abs(product).astype(delta.dtype)
    if not np.all(np.isfinite(new_delta)):
        return Kept("dtype", f"a new dequantize scale overflows {delta.dtype}")
    new_q = _flipped(q, zero_c, product < 0, axis)
    if isinstance(new_q, Kept):
        return new_q
    bias = _bias_plan(folder, layer, dequantize, add_constant is not None, scale, shift, new_delta, channels)
    if isinstance(bias, Kept):
        return bias
    if add is not None:
        constant_rank = 2 if op in ("Gemm", "MatMul") else q.ndim
        padded = (1,) * (constant_rank - add_constant.ndim) + add_constant.shape
        if add_constant.ndim > constant_rank or padded[1] not in (1, channels) or \
                any(d != 1 for i, d in enumerate(padded) if i != 1) or add_constant.dtype.kind != "f":
            return Kept("shape_mismatch", f"the Add's constant has shape {list(add_constant.shape)} and dtype "
                                          f"{add_constant.dtype}, not one float per output channel")

    # every guard passed: write
    if new_q is not q:
        folder.store(dequantize, 0, new_q, dtype=q.dtype)
    folder.store(dequantize, 1, new_delta, dtype=delta.dtype)
    if not per_channel:
        if len(dequantize.input) > 2 and dequantize.input[2]:
            folder.store(dequantize, 2, np.ascontiguousarray(zero_c), dtype=zero.dtype)
        set_attribute(dequantize, "axis", axis)
    bias(folder)
    if add is not None:
        per_channel_constant = np.broadcast_to(add_constant.astype(np.float64).reshape(-1), (channels,))
        folder.store(add, add_position, (per_channel_constant * scale + shift).reshape(
            (channels,) + (1,) * (constant_rank - 2)), dtype=add_constant.dtype)
    folder.remove_bn(bn, absorbed_by=add if add is not None else layer, after=True)
    if add is not None:
        _note(layer, f"{ABSORBED_PREFIX} '{node_label(bn)}' (weight)")
    return Absorbed([layer], into_scale=True)


def _dequantize_parts(folder: GraphFolder, dequantize: onnx.NodeProto):
    """(q, δ, z) of a DequantizeLinear, z an array of zeros when absent; or why they do not fold."""

    index = folder.index
    names = list(dequantize.input) + [""] * (3 - len(dequantize.input))
    if any(index.is_overridable(name) for name in names if name):
        return Kept("overridable_input", "the weight's DequantizeLinear reads a graph input, which a caller may override")
    q, delta = index.constant(names[0]), index.constant(names[1])
    zero = index.constant(names[2]) if names[2] else None
    if q is None or delta is None or (names[2] and zero is None):
        return Kept("not_constant", "the quantized weight, its scale or its zero point is computed in the graph")
    if attribute(dequantize, "block_size", 0):
        return Kept("shape_mismatch", "the weight is quantized block-wise (block_size), not per channel")
    if q.dtype.name not in QUANTIZED_DTYPES:
        return Kept("dtype", f"the quantized weight has dtype {q.dtype}, which this fold does not rewrite")
    if delta.dtype.name not in SCALE_DTYPES:
        return Kept("dtype", f"the dequantize scale has dtype {delta.dtype}")
    if zero is None:
        zero = np.zeros(delta.shape, dtype=q.dtype)
    if delta.ndim > 1 or zero.shape != delta.shape:
        return Kept("shape_mismatch", f"the dequantize scale has shape {list(delta.shape)}, zero point "
                                      f"{list(zero.shape)}: neither one value nor one per channel")
    return q, delta, zero


def _flipped(q: np.ndarray, zero_c: np.ndarray, negative: np.ndarray, axis: int) -> np.ndarray:
    """q with q' = 2z − q on the channels whose scale turns negative; ``q`` itself when none does."""

    if not negative.any():
        return q
    shape = [1] * q.ndim
    shape[axis] = -1
    wide = q.astype(np.int64)
    mirrored = 2 * zero_c.reshape(shape) - wide
    flipped = np.where(negative.reshape(shape), mirrored, wide)
    limits = np.iinfo(q.dtype)
    outside = (flipped < limits.min) | (flipped > limits.max)
    if outside.any():
        channel = int(np.nonzero(outside.any(axis=tuple(i for i in range(q.ndim) if i != axis)))[0][0])
        return Kept("dtype", f"output channel {channel} has a negative BN scale, so its quantized weights would be "
                             f"mirrored (q' = 2z − q) to keep the dequantize scale positive, and that leaves the "
                             f"{q.dtype} range [{limits.min}, {limits.max}]")
    return flipped.astype(q.dtype)


def _bias_plan(folder: GraphFolder, layer, dequantize, through_add: bool, scale, shift, new_delta, channels):
    """What to write as the layer's bias, as a function of the folder (run after every guard); or why not.

    Through an Add the Add's constant takes the shift, and the layer's own bias only the scale.
    """

    index = folder.index
    op = layer.op_type
    bias_name = layer.input[2] if len(layer.input) > 2 else ""
    float_dtype = _float_dtype(dequantize, new_delta.dtype)
    added = np.zeros(channels) if through_add else shift
    if op == "MatMul":
        if through_add:
            return lambda f: None
        return lambda f: f._matmul_to_gemm(layer, added, dtype=float_dtype)
    if not bias_name:
        if through_add:
            return lambda f: None
        return lambda f: _store_float_bias(f, layer, added, float_dtype)
    producer = index.producer.get(bias_name)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in ONNX_DOMAINS \
            and op != "Gemm":
        return _dequantized_bias_plan(folder, layer, producer, scale, added, new_delta, channels)
    if index.is_overridable(bias_name):
        return Kept("overridable_input", f"the {op}'s bias is also a graph input, which a caller may override")
    bias = index.constant(bias_name)
    if bias is None:
        return Kept("not_constant", f"the {op}'s bias is not a constant")
    if bias.dtype.kind != "f":
        return Kept("dtype", f"the {op}'s bias has dtype {bias.dtype}")
    if op == "Gemm":
        effective = folder._gemm_bias(layer, bias, channels)
        if isinstance(effective, Kept):
            return effective

        def write_gemm(f):
            f.store(layer, 2, effective * scale + added, dtype=bias.dtype)
            set_attribute(layer, "beta", 1.0)
        return write_gemm
    if bias.size != channels:
        return Kept("shape_mismatch", f"the {op}'s bias has {bias.size} values, the BN {channels}")
    return lambda f: f.store(layer, 2, bias.astype(np.float64).reshape(-1) * scale + added, dtype=bias.dtype)


def _float_dtype(dequantize: onnx.NodeProto, scale_dtype: np.dtype) -> np.dtype:
    output_dtype = attribute(dequantize, "output_dtype", 0)  # opset 23; otherwise the scale's dtype
    return helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else scale_dtype


def _store_float_bias(folder: GraphFolder, layer: onnx.NodeProto, value: np.ndarray, dtype: np.dtype) -> None:
    folder.store(layer, 2, value, dtype=dtype)
    if layer.op_type == "Gemm":
        set_attribute(layer, "beta", 1.0)


def _dequantized_bias_plan(folder, layer, bias_dq, scale, added, new_delta, channels):
    """A bias DequantizeLinear(int32 q_b, δ_b, 0): requantized where exact, else a float constant (see the module)."""

    index = folder.index
    names = list(bias_dq.input) + [""] * (3 - len(bias_dq.input))
    if any(index.is_overridable(name) for name in names if name):
        return Kept("overridable_input", "the bias's DequantizeLinear reads a graph input, which a caller may override")
    q_b, delta_b = index.constant(names[0]), index.constant(names[1])
    zero_b = index.constant(names[2]) if names[2] else np.zeros(1, dtype=np.int32)
    if q_b is None or delta_b is None or zero_b is None:
        return Kept("not_constant", "the bias's quantized value, scale or zero point is computed in the graph")
    if q_b.ndim != 1 or q_b.size != channels or delta_b.size not in (1, channels) or zero_b.size not in (1, channels) \
            or delta_b.dtype.kind != "f" or q_b.dtype.kind not in "iu" or attribute(bias_dq, "block_size", 0):
        return Kept("shape_mismatch", f"the bias's DequantizeLinear has {q_b.dtype} values of shape {list(q_b.shape)} and "
                                      f"a scale of shape {list(delta_b.shape)}, not one per output channel")
    delta_b_c = np.broadcast_to(delta_b.astype(np.float64).reshape(-1), (channels,))
    zero_b_c = np.broadcast_to(zero_b.astype(np.float64).reshape(-1), (channels,))
    value = (q_b.astype(np.float64) - zero_b_c) * delta_b_c * scale + added  # b · s + t
    input_scale = _input_scale(folder, layer)
    new_delta_b = (input_scale * new_delta.astype(np.float32) if input_scale is not None
                   else (delta_b_c * np.abs(scale)).astype(np.float32)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        new_q_b = value / new_delta_b.astype(np.float64)
    rounded = np.round(new_q_b)
    limits = np.iinfo(q_b.dtype)  # q_b keeps its dtype, which its zero point shares (int32 in the QDQ format)
    exact = bool(np.all(np.isfinite(new_q_b)) and np.all(np.abs(new_q_b - rounded) <= EXACT_INTEGER * np.maximum(1, np.abs(rounded)))
                 and np.all((rounded >= limits.min) & (rounded <= limits.max)) and not np.any(zero_b_c))
    sole_reader = index.value_use_count(bias_dq.output[0]) == 1 and bias_dq.output[0] not in index.graph_outputs
    float_dtype = _float_dtype(bias_dq, delta_b.dtype)

    def requantize(f):
        f.store(bias_dq, 0, rounded, dtype=q_b.dtype)
        f.store(bias_dq, 1, new_delta_b, dtype=delta_b.dtype)
        if names[2]:
            f.store(bias_dq, 2, np.zeros(channels), dtype=zero_b.dtype)
        set_attribute(bias_dq, "axis", 0)

    def to_float(f):
        f.store(layer, 2, value, dtype=float_dtype)
        if sole_reader:  # the bias's DequantizeLinear now feeds nothing: drop it, and with it what only it read
            f.index.producer.pop(bias_dq.output[0], None)
            for name in bias_dq.input:
                if name:
                    _remove_reader(f.index.readers.get(name, []), bias_dq)
            f.removed[id(bias_dq)] = bias_dq

    if exact and sole_reader and folder.context.opset >= FIRST_PER_CHANNEL_OPSET:
        return requantize
    return to_float


def _input_scale(folder, layer) -> np.ndarray | None:
    """δ_x of the layer's input when it is DequantizeLinear's output with one constant float32 scale, else None."""
    producer = folder.index.producer.get(layer.input[0])
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ONNX_DOMAINS:
        return None
    value = folder.index.constant(producer.input[1])
    return None if value is None or value.size != 1 else np.float32(value.reshape(-1)[0])


def _remove_reader(readers: list[onnx.NodeProto], node: onnx.NodeProto) -> None:
    for position, candidate in enumerate(readers):
        if candidate is node:
            del readers[position]
            return
