"""Fold a BatchNormalization over several layers: after a Concat of layers, or after an Add (or Sum) of them.

Both are exact in eval mode (``maths`` has the derivation):

- Concat(y_1 … y_k, axis=channels) → BN: layer i owns the channels R_i = [o_i, o_i + C_i) and
  folds s[R_i] and t[R_i] as if the BN followed it alone (Inception-style blocks).
- Add(y_1, y_2) → BN, Sum(y_1 … y_k) → BN and chains Add(Add(y_1, y_2), y_3) → BN: every layer
  takes the scale s, and one of them, the first with a bias of its own, the shift t (pre-activation
  nets that add two branches and normalise the sum).

A layer is what ``GraphFolder.fold_after`` folds on its own: Conv, ConvTranspose, Gemm, a MatMul
on a 2-D tensor, each optionally followed by an Add of a per-channel constant. Every layer must
feed only the Concat or Add. Every check runs before the first write, so either every layer
folds or the graph is untouched and the BN kept.

An Add may broadcast over the batch and spatial axes: s and t are constant along them, so
s · (y_1 + y_2) + t = (s · y_1 + t) + s · y_2 however the terms are broadcast. Only the channel
axis must line up: every layer has the BN's channel count and the sum's rank, which the
weights say, so no shape inference is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .onnx_graph import ONNX_DOMAINS, attribute, node_label, set_attribute
from .onnx_patterns import (ABSORBED_PREFIX, FOLDABLE_DTYPES, Absorbed, GraphFolder, Kept, _note, _output_channels,
                            _work_dtype)
from .onnx_quantized import quantized_weight

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SUM_OPS = ("Add", "Sum")


@dataclass
class Branch:
    """One layer feeding the Concat or Add, and the constant Add after it, if any."""

    layer: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    channels: int
    rank: int  # of the layer's output
    add: onnx.NodeProto | None = None  # layer → Add(constant): the constant is the layer's bias
    add_position: int = 0  # which input of ``add`` is the constant
    constant: np.ndarray | None = None


@dataclass
class Write:
    node: onnx.NodeProto
    position: int
    value: np.ndarray
    dtype: np.dtype


def fold_concat_then_bn(folder: GraphFolder, bn: onnx.NodeProto, concat: onnx.NodeProto, scale: np.ndarray,
                        shift: np.ndarray) -> Kept | Absorbed:
    """Concat of layers along channels → BN: layer i folds the BN's channels of its own range."""
    axis = attribute(concat, "axis", 1)
    if axis >= 0 and axis != 1:
        return Kept("shape_mismatch", f"the Concat before it joins axis {axis}, not the channel axis the BN normalises")
    branches = _branches(folder, concat, list(concat.input))
    if isinstance(branches, Kept):
        return branches
    if axis < 0 and axis + branches[0].rank != 1:
        return Kept("shape_mismatch", f"the Concat before it joins axis {axis} of a rank-{branches[0].rank} tensor, "
                                      "not the channel axis the BN normalises")
    counts = [branch.channels for branch in branches]
    if sum(counts) != len(scale):
        return Kept("shape_mismatch", f"the Concat's layers have {' + '.join(map(str, counts))} output channels, "
                                      f"the BN {len(scale)}")
    writes: list[list[Write]] = []
    start = 0
    for branch in branches:
        owned = slice(start, start + branch.channels)
        planned = _scaled_branch(folder, branch, scale[owned], shift[owned])
        if isinstance(planned, Kept):
            return planned
        writes.append(planned)
        start += branch.channels
    _apply(folder, bn, concat, branches, writes)
    return Absorbed([branch.layer for branch in branches], through="Concat")


def fold_sum_then_bn(folder: GraphFolder, bn: onnx.NodeProto, add: onnx.NodeProto, scale: np.ndarray,
                     shift: np.ndarray) -> Kept | Absorbed:
    """Add or Sum of layers → BN: every layer takes the scale, one of them the shift as well."""
    terms = _terms(folder, add)
    if len(terms) < 2:
        return Kept("no_linear_neighbour", f"input comes from a {add.op_type} of fewer than two layers")
    branches = _branches(folder, add, terms)
    if isinstance(branches, Kept):
        return branches
    rank = branches[0].rank
    for branch in branches:
        if branch.channels != len(scale) or branch.rank != rank:
            return Kept("shape_mismatch",
                        f"the {add.op_type} adds {_channel_summary(branches)}, so the BN's {len(scale)} channels "
                        "do not line up with every term (it broadcasts along the channel axis or over different ranks)")
    takes_shift = next((i for i, branch in enumerate(branches) if branch.bias is not None or branch.add is not None), 0)
    writes: list[list[Write]] = []
    for i, branch in enumerate(branches):
        planned = _scaled_branch(folder, branch, scale, shift if i == takes_shift else None)
        if isinstance(planned, Kept):
            return planned
        writes.append(planned)
    _apply(folder, bn, add, branches, writes)
    return Absorbed([branch.layer for branch in branches], through=add.op_type)


def _terms(folder: GraphFolder, add: onnx.NodeProto) -> list[str]:
    """The tensors an Add or Sum adds, reading through inner Adds and Sums that only this sum reads."""
    index = folder.index
    terms = []
    for name in add.input:
        inner = index.producer.get(name)
        if inner is not None and inner.op_type in SUM_OPS and inner.domain in ONNX_DOMAINS and \
                name not in index.graph_outputs and index.value_use_count(name) == 1 and \
                all(index.constant(n) is None and not index.is_overridable(n) for n in inner.input):
            terms += _terms(folder, inner)
        else:
            terms.append(name)
    return terms


def _branches(folder: GraphFolder, joiner: onnx.NodeProto, names: list[str]) -> list[Branch] | Kept:
    """Every input of the Concat or sum as a foldable layer, or why one is not."""
    what = joiner.op_type
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        return Kept("multiple_consumers", f"the {what} before it reads '{twice}' more than once")
    branches = []
    for name in names:
        branch = _branch(folder, what, name)
        if isinstance(branch, Kept):
            return branch
        branches.append(branch)
    return branches


def _branch(folder: GraphFolder, what: str, name: str) -> Branch | Kept:
    index = folder.index
    producer = index.producer.get(name)
    if producer is None:
        source = ("a constant" if index.constant(name) is not None
                  else "a graph input" if index.defines(name) else "an enclosing graph")
        return Kept("no_linear_neighbour", f"the {what}'s input '{name}' is {source}, not a Conv, ConvTranspose, "
                                           "Gemm or MatMul")
    in_onnx = producer.domain in ONNX_DOMAINS
    if not in_onnx or producer.op_type not in (*LAYER_OPS, "Add"):
        return Kept("no_linear_neighbour", f"the {what}'s input '{name}' comes from {producer.op_type}, "
                                           "not a Conv, ConvTranspose, Gemm or MatMul")
    problem = _single_use(index, producer, what)
    if problem is not None:
        return problem
    if producer.op_type != "Add":
        return _layer_branch(folder, producer, what)
    # layer → Add(per-channel constant): the constant is the layer's bias
    for position in (0, 1):
        layer = index.producer.get(producer.input[position])
        constant_name = producer.input[1 - position]
        if layer is None or layer.op_type not in LAYER_OPS or layer.domain not in ONNX_DOMAINS:
            continue
        if index.is_overridable(constant_name):
            return Kept("overridable_input", "an Add's constant is also a graph input, which a caller may override")
        constant = index.constant(constant_name)
        if constant is None:
            continue
        problem = _single_use(index, layer, "Add")
        if problem is not None:
            return problem
        branch = _layer_branch(folder, layer, what)
        if isinstance(branch, Kept):
            return branch
        problem = _constant_problem(branch, constant)
        if problem is not None:
            return problem
        branch.add, branch.add_position, branch.constant = producer, 1 - position, constant
        return branch
    return Kept("no_linear_neighbour", f"the {what}'s input '{name}' comes from an Add that is not a Conv, "
                                       "ConvTranspose, Gemm or MatMul plus a constant")


def _single_use(index, node: onnx.NodeProto, reader: str) -> Kept | None:
    if node.output[0] in index.graph_outputs:
        return Kept("graph_output", f"the output of {node.op_type} '{node_label(node)}' is a graph output")
    if index.value_use_count(node.output[0]) > 1:
        return Kept("multiple_consumers", f"the output of {node.op_type} '{node_label(node)}' feeds more than the "
                                          f"{reader}")
    return None


def _layer_branch(folder: GraphFolder, layer: onnx.NodeProto, what: str) -> Branch | Kept:
    index = folder.index
    if quantized_weight(folder, layer) is not None:  # its constants are q, δ and z, not the weight itself
        return Kept("not_constant", f"the weight of {layer.op_type} '{node_label(layer)}' is dequantized "
                                    "(DequantizeLinear), which folds into a layer alone, not one of several")
    if layer.op_type == "MatMul":
        weight = index.constant(layer.input[1])
        if weight is None or weight.ndim != 2 or index.constant(layer.input[0]) is not None:
            return Kept("not_constant", f"the weight of MatMul '{node_label(layer)}' is not a constant 2-D matrix")
        if weight.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the weight of MatMul '{node_label(layer)}' has dtype {weight.dtype}")
        if index.rank(layer.output[0]) != 2:
            return Kept("shape_mismatch", f"MatMul '{node_label(layer)}' before the {what} has its output channels on "
                                          "its last axis, and BN normalises axis 1 (output is not known to be 2-D)")
        return Branch(layer, weight, None, weight.shape[1], 2)
    constants = folder._weight_and_bias(layer)
    if isinstance(constants, Kept):
        return constants
    weight, bias = constants
    rank = 2 if layer.op_type == "Gemm" else weight.ndim
    return Branch(layer, weight, bias, _output_channels(layer, weight), rank)


def _constant_problem(branch: Branch, constant: np.ndarray) -> Kept | None:
    """Why the Add's constant after a layer is not one value per output channel, or None."""
    if constant.dtype.name not in FOLDABLE_DTYPES:
        return Kept("dtype", f"the Add's constant has dtype {constant.dtype}")
    if branch.layer.op_type == "MatMul":  # channels on the last axis
        fits = constant.ndim <= 1 and constant.size in (1, branch.channels)
    else:
        padded = (1,) * (branch.rank - constant.ndim) + constant.shape
        fits = constant.ndim <= branch.rank and padded[1] in (1, branch.channels) and \
            all(d == 1 for i, d in enumerate(padded) if i != 1)
    if not fits:
        return Kept("shape_mismatch", f"the Add after '{node_label(branch.layer)}' has a constant of shape "
                                      f"{list(constant.shape)}, not one value per output channel")
    return None


def _scaled_branch(folder: GraphFolder, branch: Branch, scale: np.ndarray,
                   shift: np.ndarray | None) -> list[Write] | Kept:
    """The values one layer (and its Add) gets: weight and bias scaled by s, plus t when ``shift`` is given."""
    layer, weight, bias = branch.layer, branch.weight, branch.bias
    added = np.zeros(len(scale)) if shift is None else shift
    if layer.op_type == "MatMul":
        work = _work_dtype(weight.dtype)
        writes = [Write(layer, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], weight.dtype)]
    else:
        new_weight, new_bias = folder._scaled_layer(layer, weight, bias, scale)
        if isinstance(new_weight, Kept):
            return new_weight
        writes = [Write(layer, 1, new_weight, weight.dtype)]
        if bias is not None or (shift is not None and branch.add is None):
            writes.append(Write(layer, 2, new_bias + (added if branch.add is None else 0), weight.dtype))
    if branch.add is not None:
        per_channel = np.broadcast_to(branch.constant.astype(np.float64).reshape(-1), (branch.channels,))
        shape = (branch.channels,) if layer.op_type == "MatMul" else (branch.channels,) + (1,) * (branch.rank - 2)
        writes.append(Write(branch.add, branch.add_position, (per_channel * scale + added).reshape(shape),
                            branch.constant.dtype))
    elif layer.op_type == "MatMul" and shift is not None:  # no bias of its own: it becomes a Gemm whose C is t
        writes.append(Write(layer, 2, shift, weight.dtype))
    return writes


def _apply(folder: GraphFolder, bn: onnx.NodeProto, joiner: onnx.NodeProto, branches: list[Branch],
           writes: list[list[Write]]) -> None:
    """Write every branch's values, then take the BN out: the Concat or Add now writes the BN's output."""
    for branch, planned in zip(branches, writes):
        layer = branch.layer
        for write in planned:
            if write.node is layer and write.position == 2:
                if layer.op_type == "MatMul":
                    layer.op_type = "Gemm"  # MatMul(A, B) on a 2-D A is Gemm(A, B, C)
                elif layer.op_type == "Gemm":
                    set_attribute(layer, "beta", 1.0)  # β is in the stored C now
            folder.store(write.node, write.position, write.value, dtype=write.dtype)
    folder.remove_bn(bn, absorbed_by=joiner, after=True)
    for branch in branches:
        _note(branch.layer, f"{ABSORBED_PREFIX} '{node_label(bn)}' (through a {joiner.op_type})")


def _channel_summary(branches: list[Branch]) -> str:
    return ", ".join(f"{branch.channels} channels of rank {branch.rank}" for branch in branches)
