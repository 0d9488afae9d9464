"""The token BatchNorm of LeViT in ONNX: a Linear, a Reshape or Flatten to 2-D, then the BN.

LeViT's ``LinearNorm`` runs a bias-less Linear on tokens and normalises them as
``bn(y.flatten(0, 1)).reshape_as(y)``. Both exporters write it as

    MatMul(x[B, N, Cin], W[Cin, C]) → Reshape or Flatten to [B·N, C] → BatchNormalization → Reshape to [B, N, C]

(with ``Add(b)`` after the MatMul when the Linear has a bias, and Gemm in place of the MatMul
when its input is already 2-D). Row-major reshaping keeps the last axis whole when it keeps its
length: element k of the flat buffer is feature k mod C before and column k mod C after, when
both the layer's output and the Reshape's output end in C. The BN normalises axis 1 of its
input, which on a 2-D tensor is that last axis, so this is Linear → BN on a 2-D tensor
(``maths``, "Through a Reshape"): W' = W · s by columns, and the shift t becomes a bias.

Where t goes:

- MatMul → Add(constant b, one value per feature): b' = b · s + t; Gemm: C' = C · s + t. The BN
  is removed and the Reshape writes its output.
- A bias-less MatMul whose input is 2-D becomes a Gemm with C = t, as MatMul → BN does.
- A bias-less MatMul on a 3-D (or unknown-rank) input: the BN node becomes Add(t), in its own
  place. Gemm needs a 2-D A, so the MatMul cannot take the bias itself, and moving the Reshape
  before it would rewrite a target shape that the exporter computes from Shape nodes when a
  dim is dynamic. An Add right after the MatMul would read like an exported Linear with bias,
  but it would have to sit before the Reshape in the node list, and the fold rewrites nodes in
  place, without inserting into the middle of the graph. In the BN's place the order is
  already right: the Add reads the Reshape's output [B·N, C] and adds t along its last axis,
  the BN's axis 1, so the result is exact, every tensor keeps its name and shape, and the node
  count is unchanged (one BN out, one Add in).

The reshape back to [B, N, C] is not needed for the fold to be exact: the BN's output keeps its
name, shape and values, so whatever reads it (a Reshape, an Add, a graph output) reads the same.

Guards, checked before anything is written:

- the Reshape's output is 2-D and ends in C (its constant target's last entry, with 0 and -1
  resolved, or the inferred shape), and a Flatten's axis is the last one or the dims from it on
  multiply to C, so that the features stay the last axis, whole and alone; otherwise, or when
  the rank is unknown, ``shape_mismatch``. A BN on a tensor of another rank normalises axis 1,
  which is not the features' axis, so it is kept even where the counts agree;
- the layer's, the Add's and the Reshape's outputs each feed only the next node
  (``multiple_consumers``; readers of only the shape do not count) and none is a graph output;
- a weight, bias or the Add's operand computed in the graph: ``not_constant`` (or
  ``overridable_input``); a bias that is not one value per feature: ``shape_mismatch``.
"""

from __future__ import annotations

import numpy as np
import onnx

from .onnx_graph import ONNX_DOMAINS, attribute, node_label, remove_by_identity, set_attribute
from .onnx_patterns import ABSORBED_PREFIX, FOLDABLE_DTYPES, Absorbed, GraphFolder, Kept, _note, _work_dtype
from .onnx_quantized import quantized_weight

LAYERS = ("MatMul", "Gemm")


def fold_layer_reshape_bn(folder: GraphFolder, bn: onnx.NodeProto, reshape: onnx.NodeProto,
                          scale: np.ndarray, shift: np.ndarray) -> Kept | Absorbed:
    """MatMul / Gemm → (Add(bias)) → Reshape or Flatten to 2-D → BN: fold the BN into the layer."""
    index = folder.index
    channels = len(scale)
    found = _layer_and_bias(folder, reshape)
    if isinstance(found, Kept):
        return found
    layer, add, bias_position = found
    for node in (layer, add):
        if node is None:
            continue
        if node.output[0] in index.graph_outputs:
            return Kept("graph_output", f"the {node.op_type}'s output, before the {reshape.op_type}, is a graph output")
        if index.value_use_count(node.output[0]) > 1:
            return Kept("multiple_consumers", f"the {node.op_type}'s output, before the {reshape.op_type}, "
                                              "feeds more than the BN")
    weights = _layer_weights(folder, layer, channels)
    if isinstance(weights, Kept):
        return weights
    weight, gemm_bias = weights
    bias = None
    if add is not None:
        bias = index.constant(add.input[bias_position])
        if bias.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the Add's constant has dtype {bias.dtype}")
        if bias.ndim > 1 or bias.size not in (1, channels):
            return Kept("shape_mismatch", f"the Add's constant has shape {list(bias.shape)}, "
                                          f"not one value per feature of the {layer.op_type}")
    problem = _features_stay_last(folder, reshape, channels)
    if problem is not None:
        return problem

    work = _work_dtype(weight.dtype)
    if layer.op_type == "MatMul":
        folder.store(layer, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], dtype=weight.dtype)
        layer_bias = None
    else:
        new_weight, layer_bias = folder._scaled_layer(layer, weight, gemm_bias, scale)
        folder.store(layer, 1, new_weight, dtype=weight.dtype)
    if add is not None:
        folded_bias = np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) * scale + shift
        folder.store(add, bias_position, folded_bias, dtype=bias.dtype)
        if layer_bias is not None and gemm_bias is not None:  # a Gemm with C and an Add: C takes s, the Add t
            folder.store(layer, 2, layer_bias, dtype=weight.dtype)
            set_attribute(layer, "beta", 1.0)
        _remove_through(folder, bn, reshape, layer)
    elif layer.op_type == "Gemm":
        folder.store(layer, 2, layer_bias + shift, dtype=weight.dtype)
        set_attribute(layer, "beta", 1.0)
        _remove_through(folder, bn, reshape, layer)
    elif index.rank(layer.input[0]) == 2:
        folder._matmul_to_gemm(layer, shift, dtype=weight.dtype)
        _remove_through(folder, bn, reshape, layer)
    else:
        _bn_becomes_shift(folder, bn, layer, shift, dtype=weight.dtype)
    return Absorbed([layer], through=reshape.op_type)


def _layer_and_bias(folder: GraphFolder, reshape: onnx.NodeProto
                    ) -> tuple[onnx.NodeProto, onnx.NodeProto | None, int | None] | Kept:
    """(layer, bias Add or None, position of the Add's constant) behind the Reshape, or why there is none."""
    index = folder.index
    source = index.producer.get(reshape.input[0])
    if source is not None and source.domain in ONNX_DOMAINS and source.op_type in LAYERS:
        return source, None, None
    if source is not None and source.domain in ONNX_DOMAINS and source.op_type == "Add":
        for position in (0, 1):
            layer = index.producer.get(source.input[position])
            if layer is None or layer.op_type not in LAYERS or layer.domain not in ONNX_DOMAINS:
                continue
            constant_name = source.input[1 - position]
            if index.is_overridable(constant_name):
                return Kept("overridable_input", "the Add's constant is also a graph input, which a caller may override")
            if index.constant(constant_name) is None:
                return Kept("not_constant", f"the {layer.op_type} is followed by an Add of a computed tensor, not a bias")
            return layer, source, 1 - position
    what = "a graph input" if source is None else source.op_type
    return Kept("no_linear_neighbour", f"input comes through a {reshape.op_type} from {what}, not from MatMul or Gemm")


def _layer_weights(folder: GraphFolder, layer: onnx.NodeProto, channels: int
                   ) -> tuple[np.ndarray, np.ndarray | None] | Kept:
    """The layer's weight (and a Gemm's C), checked to have ``channels`` output features."""
    index = folder.index
    if quantized_weight(folder, layer) is not None:  # its constants are q, δ and z, not the weight itself
        return Kept("not_constant", f"the {layer.op_type}'s weight is dequantized (DequantizeLinear), which folds "
                                    "into a layer right before the BN, not through a Reshape")
    if layer.op_type == "Gemm":
        constants = folder._weight_and_bias(layer)
        if isinstance(constants, Kept):
            return constants
        weight, bias = constants
        features = weight.shape[0] if attribute(layer, "transB", 0) else weight.shape[-1]
        if features == channels:
            effective = folder._gemm_bias(layer, bias, channels)
            if isinstance(effective, Kept):
                return effective
    else:
        name = layer.input[1]
        weight, bias = index.constant(name), None
        if weight is None or index.constant(layer.input[0]) is not None:
            if index.is_overridable(name):
                return Kept("overridable_input", "the MatMul's weight is also a graph input, which a caller may override")
            return Kept("not_constant", "the MatMul's weight is not a constant")
        if weight.ndim != 2:
            return Kept("shape_mismatch", f"the MatMul's weight has shape {list(weight.shape)}, not a 2-D matrix")
        if weight.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the MatMul's weight has dtype {weight.dtype}")
        features = weight.shape[1]
    if features != channels:
        return Kept("shape_mismatch", f"the {layer.op_type} has {features} output features, the BN {channels}")
    return weight, bias


def _features_stay_last(folder: GraphFolder, reshape: onnx.NodeProto, channels: int) -> Kept | None:
    """None when the Reshape's or Flatten's output is 2-D and its last axis is the layer's features, whole."""
    index = folder.index
    source_shape = index.static_shape(reshape.input[0])
    if reshape.op_type == "Flatten":  # [d0 ⋯ d(a-1), da ⋯ d(r-1)]: the last axis is da ⋯ d(r-1)
        axis = attribute(reshape, "axis", 1)
        rank = len(source_shape) if source_shape is not None else None
        if rank is not None and axis < 0:
            axis += rank
        if axis == -1 or (rank is not None and axis == rank - 1):
            return None
        trailing = source_shape[axis:] if rank is not None else [None]
        if None in trailing:
            return Kept("shape_mismatch", f"the Flatten (axis={attribute(reshape, 'axis', 1)}) has an input of unknown "
                                          "shape, so its last axis may not be the layer's features")
        if int(np.prod(trailing)) != channels:
            return Kept("shape_mismatch", f"the Flatten (axis={attribute(reshape, 'axis', 1)}) of a {rank}-D tensor "
                                          "mixes the features with other axes")
        return None
    if len(reshape.input) > 1:
        if index.is_overridable(reshape.input[1]):
            return Kept("overridable_input", "the Reshape's shape is also a graph input, which a caller may override")
        target = index.constant(reshape.input[1])
    else:  # Reshape-1 holds its target in an attribute
        target = attribute(reshape, "shape", None)
    target = None if target is None else [int(d) for d in np.asarray(target).reshape(-1)]
    out_shape = index.static_shape(reshape.output[0])
    rank = len(target) if target is not None else (len(out_shape) if out_shape is not None else None)
    if rank != 2:
        return Kept("shape_mismatch", f"the BN normalises axis 1 of a {rank or 'unknown'}-D tensor, the layer's "
                                      "features are its last axis: they are the same axis only in 2-D")
    last = None
    if target is not None and target[-1] > 0:
        last = target[-1]
    elif target is not None and target[-1] == 0 and not attribute(reshape, "allowzero", 0):
        last = source_shape[1] if source_shape is not None and len(source_shape) > 1 else None  # 0 copies input dim 1
    if last is None and out_shape is not None:
        last = out_shape[-1]
    if last is None:
        return Kept("shape_mismatch", "the Reshape's last dim is unknown, so the BN's channels may not be "
                                      "the layer's features")
    if last != channels:
        return Kept("shape_mismatch", f"the Reshape's output has {last} columns, the layer {channels} features: "
                                      "it mixes the features with other axes")
    return None


def _remove_through(folder: GraphFolder, bn: onnx.NodeProto, reshape: onnx.NodeProto, layer: onnx.NodeProto) -> None:
    """Remove the BN: the Reshape writes its output; the layer, not the Reshape, says it absorbed the BN."""
    note = reshape.doc_string
    folder.remove_bn(bn, absorbed_by=reshape, after=True)
    reshape.doc_string = note
    _note(layer, f"{ABSORBED_PREFIX} '{node_label(bn)}' (through a {reshape.op_type})")


def _bn_becomes_shift(folder: GraphFolder, bn: onnx.NodeProto, layer: onnx.NodeProto, shift: np.ndarray, *,
                      dtype: np.dtype) -> None:
    """Turn the BN node into Add(its input, t) in place: same output, same position in the node list."""
    index = folder.index
    label = node_label(bn)
    for name in bn.input[1:]:
        if name:
            remove_by_identity(index.readers.get(name, []), bn)
    data = bn.input[0]
    del bn.input[:]
    del bn.attribute[:]
    bn.op_type = "Add"
    bn.input.extend([data, ""])
    bn.name = folder.context.fresh_name(f"{node_label(layer)}_bias")
    bn.doc_string = f"bnexport: the shift of BatchNormalization '{label}', whose scale went into '{node_label(layer)}'"
    if folder.context.opset < 7:  # Add-1 and Add-6 broadcast only when told to
        set_attribute(bn, "broadcast", 1)
    folder.store(bn, 1, shift, dtype=dtype)
    _note(layer, f"{ABSORBED_PREFIX} '{label}' (its shift is the Add '{bn.name}')")
