"""Fold BatchNormalization into a neighbouring linear node of an ONNX graph: the patterns.

Patterns, each exact in eval mode:

- Conv / ConvTranspose / Gemm → BN, Conv / ConvTranspose / Gemm → Add(per-channel constant) → BN,
  and MatMul → Add(constant) → BN on a 2-D tensor: the BN scales the layer's output channels
  (``maths.fold_into_output_channels``, ``maths.fold_into_transposed_conv``); the Add's
  constant c becomes c · s + t.
- BN → Conv with zero pads, BN → Gemm, BN → MatMul → Add(constant) on a 2-D tensor: the BN
  is folded into the layer after it (``maths.fold_into_input_channels``).
- BN → Pad(reflect, edge or wrap, spatial axes only) → Conv with zero pads: these modes copy
  normalised values, and a copy of x·s + t is the copy of x scaled and shifted, so the BN
  commutes with the Pad and folds into the Conv as above. The Pad then reads the BN's input.
  Constant padding writes a value the BN never shifted, so it is kept (``zero_padding``).

The patterns over several nodes live in their own modules, called from ``fold_after``:
``onnx_split`` (BN after a Concat, Add or Sum of layers), ``onnx_reshape`` (LeViT's token BN:
MatMul or Gemm → Reshape or Flatten → BN) and ``onnx_quantized`` (a layer whose weight is a
DequantizeLinear). ``maths`` derives each of them.

Every graph is folded: the main graph, and the bodies of If, Loop and Scan at any depth,
whose weights may live in an enclosing graph (``onnx_graph`` says what counts as a constant).
BatchNorms inside model-local functions fold at their call sites (``onnx_functions``).

The graph is rewritten on a copy: the layer takes the folded weight and bias, the BN node
is removed, and initializers and constant subgraphs that only the fold stopped reading are
dropped; a tensor that any node, subgraph or graph output still reads is never dropped or
renamed. Node names are kept, so the folded graph reads the same in Netron, and each layer
records in its ``doc_string`` which BatchNormalization it absorbed. A weight read by several
nodes is copied for the node being folded, so every call site keeps its own numbers. When no
BatchNorm folds, the result is an untouched copy of the input.

The per-channel s and t are computed in float64. Weights are scaled in their own dtype when
it is float32 (the product of a float32 weight and s rounded to float32 is within one unit in
the last place of the float64 product, and it halves the fold's time on large models), and in
float64 otherwise, then cast once to the layer's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from ..errors import BnexportError, first_line
from .maths import (bn_scale_shift, fold_into_input_channels, fold_into_output_channels, fold_into_transposed_conv,
                    invalid_statistics)
from .onnx_graph import (CONSTANT_OPS, ONNX_DOMAINS, GraphIndex, all_names, attribute, copy_without_initializers,
                         defined_names, graph_reads, implicit_inputs, node_label, opset_version, remove_by_identity,
                         set_attribute, subgraphs)
from .fold_report import FOLDED, KEPT, FoldRecord, FoldReport
from .onnx_names import ModuleNamer
from .onnx_functions import fold_functions, functions_hold_batchnorm

ABSORBED_PREFIX = "bnexport: absorbed BatchNormalization"

# the ops whose output a BN can fold back through: a layer itself, or what joins or reshapes layers' outputs
PRODUCERS_FOLDED_AFTER = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sum", "Concat", "Reshape", "Flatten")

# the dtypes a fold writes: computed in float64 and rounded once (float32 weights: within one ulp of that)
FOLDABLE_DTYPES = {"float16", "bfloat16", "float32", "float64"}


class Kept(NamedTuple):
    """Why a pattern did not fold: a key of ``REASON_CODES`` and the sentence for the report."""

    code: str
    reason: str


class Absorbed(NamedTuple):
    """Where a BN went: the layer(s) that took it, in input order, and the op between them and the BN, if any."""

    layers: list[onnx.NodeProto]
    through: str | None = None  # "Pad", "Concat", "Add", "Reshape", ...
    into_scale: bool = False  # the BN's scale went into the layer's DequantizeLinear scale, not its weight


class FoldContext:
    """What every graph of one model shares while it is folded."""

    def __init__(self, model: onnx.ModelProto, *, fold_overridable: bool):
        self.ir_version = model.ir_version
        self.opset = opset_version(model)
        self.fold_overridable = fold_overridable
        self.taken = all_names(model)  # new names must shadow nothing, in any graph
        self.root: GraphFolder | None = None

    def fresh_name(self, base: str) -> str:
        name, counter = base, 0
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.taken.add(name)
        return name


def bn_parameters(index: GraphIndex, bn: onnx.NodeProto, *, opset: int) -> tuple[np.ndarray, np.ndarray] | Kept:
    """(s, t) in float64 for a foldable BN, or why it is kept.

    Reads every version's attributes: ``training_mode`` (opset 14+), ``spatial`` (opset 6 to 8:
    spatial=0 normalises each element with its own statistics), ``is_test`` (opset 6 and
    before: 0, the default, means batch statistics) and ``consumed_inputs`` (opset 1: which
    inputs training updates in place, so it matters only when ``is_test`` is 0).
    Raises ``BnexportError`` for statistics that make the BN itself NaN or infinite.
    """
    if attribute(bn, "training_mode", 0):
        return Kept("training_mode", "training_mode=1: uses batch statistics")
    if opset < 7 and not attribute(bn, "is_test", 0):
        consumed = attribute(bn, "consumed_inputs", None)
        note = " and updates its running statistics in place (consumed_inputs)" if consumed and any(consumed) else ""
        return Kept("training_mode", f"is_test=0 (opset {opset}): uses batch statistics{note}")
    if not attribute(bn, "spatial", 1):
        return Kept("spatial0", "spatial=0: normalises each element with its own statistics, not each channel")
    if any(bn.output[1:]):
        return Kept("training_mode", "outputs running statistics (training graph)")
    names = list(bn.input[1:5])
    values = [index.constant(name) for name in names]
    if len(names) < 4 or any(v is None for v in values):
        roles = ("scale", "bias", "mean", "variance")
        missing = [role for role, v in zip(roles, values) if v is None] or list(roles[len(names):])
        if any(index.is_overridable(name) for name in names):
            overridable = [role for role, name in zip(roles, names) if index.is_overridable(name)]
            return Kept("overridable_input", f"{', '.join(overridable)} also a graph input, which a caller may override "
                                             "(fold_overridable treats it as a constant)")
        return Kept("not_constant", f"{', '.join(missing)} not a constant (computed in the graph, e.g. batch statistics)")
    if any(v.dtype.kind not in "fV" for v in values):
        return Kept("dtype", f"parameters of dtype {values[0].dtype} are not floating point")
    shapes = {v.shape for v in values}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return Kept("shape_mismatch", f"scale, bias, mean and variance have shapes {[list(v.shape) for v in values]}, "
                                      "not one value per channel each")
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    eps = float(attribute(bn, "epsilon", 1e-5))
    problem = invalid_statistics(var, eps)
    if problem:
        raise BnexportError(f"BatchNormalization '{node_label(bn)}': {problem}; "
                            "refusing to fold a BN that outputs NaN or inf")
    return bn_scale_shift(gamma, beta, mean, var, eps)


def _output_channels(layer: onnx.NodeProto, weight: np.ndarray) -> int:
    if layer.op_type == "ConvTranspose":
        return weight.shape[1] * attribute(layer, "group", 1)
    if layer.op_type == "Gemm":
        return weight.shape[0] if attribute(layer, "transB", 0) else weight.shape[-1]
    return weight.shape[0]


def _work_dtype(dtype: np.dtype) -> type:
    """float32 weights are scaled in float32 (within one ulp of float64, twice as fast); every other dtype in float64."""
    return np.float32 if dtype == np.float32 else np.float64


def _combine(after: Kept, before: Kept) -> Kept:
    """One code for a BN neither pattern folds: the more specific of the two."""
    code = before.code if after.code == "no_linear_neighbour" else after.code
    return Kept(code, f"{after.reason}; {before.reason}")


class GraphFolder:
    """The rewrite of one graph (the main graph or a subgraph): its index and the nodes removed so far."""

    def __init__(self, model: onnx.ModelProto, *, graph: onnx.GraphProto | None = None, parent: "GraphFolder | None" = None,
                 context: FoldContext | None = None, initializers: dict[str, onnx.TensorProto] | None = None,
                 fold_overridable: bool = False):
        self.model = model
        self.parent = parent
        self.context = context or FoldContext(model, fold_overridable=fold_overridable)
        if self.context.root is None:
            self.context.root = self
            self.context.taken.update(initializers or ())  # the copy being folded holds no initializers yet
        self.graph = model.graph if graph is None else graph
        self.index = GraphIndex(model, initializers, graph=self.graph, parent=parent.index if parent else None,
                                fold_overridable=self.context.fold_overridable)
        # id → node; holding the node keeps its protobuf wrapper, and so its id, alive until finish()
        self.removed: dict[int, onnx.NodeProto] = {}
        self.used_before = graph_reads(self.graph)
        self.names = ModuleNamer(self.graph)  # the torch module paths of the report, where the exporter recorded them
        self.known_before = defined_names(self.graph) | set(self.index.initializers)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    # writing results -------------------------------------------------------------------

    def store(self, node: onnx.NodeProto, position: int, value: np.ndarray, *, dtype: np.dtype) -> None:
        """Give ``node`` input ``position`` the constant ``value``: in place when only it reads it, else a copy."""
        index = self.index
        name = node.input[position] if position < len(node.input) else ""
        array = np.ascontiguousarray(value, dtype=dtype)
        # readers of only its shape or type (Shape, CastLike) do not count: a fold keeps both
        if name and index.is_initializer(name) and index.value_use_count(name) == 1 and \
                _same_shape(index, name, array) and name not in index.caller_inputs:  # an input keeps its default
            self._write(self, name, array)
            return
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if position == 2 and weight_name.endswith("weight") and not index.is_initializer(name):
            base = f"{weight_name[:-len('weight')]}bias"  # a bias-less conv's new bias: "conv.weight" → "conv.bias"
        else:
            base = f"{name or node.output[0]}_bnfolded"
        new_name = self.context.fresh_name(base)
        # IR < 4 lists every initializer as a graph input, which a subgraph cannot have: those live in the main graph
        holder = self.context.root if self.context.ir_version < 4 else self
        self._write(holder, new_name, array)
        index.replace_input(node, position, new_name)

    @staticmethod
    def _write(holder: "GraphFolder", name: str, array: np.ndarray) -> None:
        """Write ``array`` as initializer ``name`` of ``holder``'s graph, now: its bytes are copied once, into the result."""
        tensor = holder.index.written.get(name)
        if tensor is None:
            # a subgraph's own tensor is part of the copy and is rewritten in place; the main graph's belong to the source
            own = None if holder.is_root else holder.index.initializers.get(name)
            tensor = own if own is not None else holder.graph.initializer.add()
            holder.index.written[name] = tensor
        _overwrite(tensor, name, array)

    def remove_bn(self, bn: onnx.NodeProto, *, absorbed_by: onnx.NodeProto, after: bool,
                  through: onnx.NodeProto | None = None) -> None:
        """Take the BN out of the graph; its output is now produced by ``absorbed_by`` (after) or
        its input read by ``absorbed_by`` (before), or by ``through``, the Pad between them."""
        index = self.index
        if after:  # layer → BN: the layer writes the BN's output name
            old_output = absorbed_by.output[0]
            for reader in index.metadata_readers(old_output):
                index.replace_input(reader, list(reader.input).index(old_output), bn.output[0])
            absorbed_by.output[0] = bn.output[0]
            index.producer[bn.output[0]] = absorbed_by
            index.producer.pop(old_output, None)
        else:  # BN → layer: the layer reads the BN's input
            data_reader = through if through is not None else absorbed_by
            position = list(data_reader.input).index(bn.output[0])
            index.replace_input(data_reader, position, bn.input[0])
            for reader in index.metadata_readers(bn.output[0]):
                index.replace_input(reader, list(reader.input).index(bn.output[0]), bn.input[0])
            index.producer.pop(bn.output[0], None)
        for name in bn.input:
            if name:
                remove_by_identity(index.readers.get(name, []), bn)
        _note(absorbed_by, f"{ABSORBED_PREFIX} '{node_label(bn)}'" + (" (through a Pad)" if through is not None else ""))
        self.removed[id(bn)] = bn

    # the patterns -------------------------------------------------------------------------

    def fold_after(self, bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> Kept | Absorbed | onnx.NodeProto:
        """Fold into the layer that produces the BN's input; return that layer or why not."""
        index = self.index
        layer = index.producer.get(bn.input[0])
        if layer is None or layer.op_type not in PRODUCERS_FOLDED_AFTER or layer.domain not in ONNX_DOMAINS:
            source = layer.op_type if layer else ("a graph input" if index.defines(bn.input[0]) else "an enclosing graph")
            return Kept("no_linear_neighbour", f"input comes from {source}, not Conv, ConvTranspose, Gemm or MatMul")
        if layer.output[0] in index.graph_outputs:
            return Kept("graph_output", f"the {layer.op_type}'s output is a graph output")
        if index.value_use_count(layer.output[0]) > 1:
            return Kept("multiple_consumers", f"the {layer.op_type}'s output feeds more than the BN")
        if layer.op_type == "Add":
            return self._fold_add_then_bn(bn, layer, scale, shift)
        if layer.op_type in ("Concat", "Sum"):  # BN over several layers
            from .onnx_split import fold_concat_then_bn, fold_sum_then_bn
            return (fold_concat_then_bn if layer.op_type == "Concat" else fold_sum_then_bn)(self, bn, layer, scale, shift)
        from .onnx_quantized import fold_quantized_then_bn, quantized_weight  # imports this module

        dequantize = quantized_weight(self, layer)
        if dequantize is not None:
            return fold_quantized_then_bn(self, bn, layer, dequantize, scale, shift)
        if layer.op_type == "MatMul":
            return self._fold_matmul_then_bn(bn, layer, scale, shift)
        if layer.op_type in ("Reshape", "Flatten"):
            from .onnx_reshape import fold_layer_reshape_bn  # imports this module
            return fold_layer_reshape_bn(self, bn, layer, scale, shift)
        constants = self._weight_and_bias(layer)
        if isinstance(constants, Kept):
            return constants
        weight, bias = constants
        if _output_channels(layer, weight) != len(scale):
            return Kept("shape_mismatch", f"the {layer.op_type} has {_output_channels(layer, weight)} output channels, "
                                          f"the BN {len(scale)}")
        new_weight, new_bias = self._scaled_layer(layer, weight, bias, scale)
        if isinstance(new_weight, Kept):
            return new_weight
        self.store(layer, 1, new_weight, dtype=weight.dtype)
        self.store(layer, 2, new_bias + shift, dtype=weight.dtype)
        if layer.op_type == "Gemm":
            set_attribute(layer, "beta", 1.0)
        self.remove_bn(bn, absorbed_by=layer, after=True)
        return layer

    def _scaled_layer(self, layer, weight, bias, scale) -> tuple[np.ndarray, np.ndarray] | tuple[Kept, None]:
        """The layer's weight and bias with every output channel scaled by s (w · s, b · s); no shift yet."""
        work = _work_dtype(weight.dtype)
        scale_w = scale.astype(work)
        if layer.op_type == "Conv":
            new_weight, _ = fold_into_output_channels(weight.astype(work, copy=False), None, scale_w, scale)
            return new_weight, np.zeros(len(scale)) if bias is None else bias.astype(np.float64) * scale
        if layer.op_type == "ConvTranspose":
            new_weight, _ = fold_into_transposed_conv(weight.astype(work, copy=False), None, scale_w, scale,
                                                      groups=attribute(layer, "group", 1))
            return new_weight, np.zeros(len(scale)) if bias is None else bias.astype(np.float64) * scale
        # Gemm: Y = α·A·op(B) + β·C, output channels are op(B)'s columns
        effective_bias = self._gemm_bias(layer, bias, len(scale))
        if isinstance(effective_bias, Kept):
            return effective_bias, None
        trans_b = attribute(layer, "transB", 0)
        new_weight = weight.astype(work, copy=False) * (scale_w[:, None] if trans_b else scale_w[None, :])
        return new_weight, effective_bias * scale

    def _gemm_bias(self, gemm: onnx.NodeProto, bias: np.ndarray | None, channels: int) -> np.ndarray | Kept:
        """β·C as a float64 vector over the output channels, or why C does not broadcast as one."""
        if bias is None:
            return np.zeros(channels)
        if bias.size not in (1, channels) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return Kept("shape_mismatch", f"the Gemm's C has shape {list(bias.shape)}, not one value per output channel")
        return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) * float(attribute(gemm, "beta", 1.0))

    def _fold_add_then_bn(self, bn, add, scale, shift) -> Kept | Absorbed | onnx.NodeProto:
        """Layer → Add(per-channel constant) → BN: the layer's weight and bias take s, the Add's constant c · s + t."""
        index = self.index
        for position in (0, 1):
            layer = index.producer.get(add.input[position])
            if layer is None or layer.op_type not in ("MatMul", "Conv", "ConvTranspose", "Gemm"):
                continue
            constant_name = add.input[1 - position]
            if index.is_overridable(constant_name):
                return Kept("overridable_input", "the Add's constant is also a graph input, which a caller may override")
            bias = index.constant(constant_name)
            if bias is None:
                continue
            if index.value_use_count(layer.output[0]) > 1:
                return Kept("multiple_consumers", f"the {layer.op_type}'s output feeds more than the Add")
            from .onnx_quantized import fold_quantized_then_bn, quantized_weight  # imports this module

            dequantize = quantized_weight(self, layer)
            if dequantize is not None:
                return fold_quantized_then_bn(self, bn, layer, dequantize, scale, shift, add=add,
                                              add_position=1 - position, add_constant=bias)
            if layer.op_type == "MatMul":
                return self._fold_matmul_add_then_bn(bn, add, layer, 1 - position, bias, scale, shift)
            return self._fold_layer_add_then_bn(bn, add, layer, 1 - position, bias, scale, shift)
        if all(index.constant(name) is None for name in add.input):  # an Add of layers: BN over several layers
            from .onnx_split import fold_sum_then_bn
            return fold_sum_then_bn(self, bn, add, scale, shift)
        return Kept("no_linear_neighbour",
                    "input comes from an Add that is not a Conv, ConvTranspose, Gemm or MatMul plus a constant")

    def _fold_layer_add_then_bn(self, bn, add, layer, bias_position, constant, scale, shift) -> Kept | onnx.NodeProto:
        constants = self._weight_and_bias(layer)
        if isinstance(constants, Kept):
            return constants
        weight, bias = constants
        channels = _output_channels(layer, weight)
        if channels != len(scale):
            return Kept("shape_mismatch", f"the {layer.op_type} has {channels} output channels, the BN {len(scale)}")
        rank = 2 if layer.op_type == "Gemm" else weight.ndim  # the layer's output rank
        padded = (1,) * (rank - constant.ndim) + constant.shape
        if constant.ndim > rank or padded[1] not in (1, channels) or any(d != 1 for i, d in enumerate(padded) if i != 1):
            return Kept("shape_mismatch", f"the Add's constant has shape {list(constant.shape)}, "
                                          "not one value per output channel")
        if constant.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the Add's constant has dtype {constant.dtype}")
        new_weight, new_bias = self._scaled_layer(layer, weight, bias, scale)
        if isinstance(new_weight, Kept):
            return new_weight
        per_channel = np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,))
        self.store(layer, 1, new_weight, dtype=weight.dtype)
        if bias is not None:
            self.store(layer, 2, new_bias, dtype=weight.dtype)
            if layer.op_type == "Gemm":
                set_attribute(layer, "beta", 1.0)
        self.store(add, bias_position, (per_channel * scale + shift).reshape((channels,) + (1,) * (rank - 2)),
                   dtype=constant.dtype)
        self.remove_bn(bn, absorbed_by=add, after=True)
        _note(layer, f"{ABSORBED_PREFIX} '{node_label(bn)}' (weight)")
        return layer

    def _fold_matmul_add_then_bn(self, bn, add, matmul, bias_position, bias, scale, shift) -> Kept | onnx.NodeProto:
        index = self.index
        weight = index.constant(matmul.input[1])
        if weight is None or weight.ndim != 2 or index.constant(matmul.input[0]) is not None:
            return Kept("not_constant", "the MatMul's weight is not a constant 2-D matrix")
        if index.rank(bn.input[0]) != 2:
            return Kept("shape_mismatch", "BN normalises axis 1, but the MatMul's output channels are its last axis "
                                          "(input is not 2-D)")
        if bias.size not in (1, len(scale)) or bias.ndim > 1 or weight.shape[1] != len(scale):
            return Kept("shape_mismatch", f"the Add's constant has shape {list(bias.shape)}, "
                                          "not one value per output channel")
        work = _work_dtype(weight.dtype)
        self.store(matmul, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], dtype=weight.dtype)
        self.store(add, bias_position, bias.astype(np.float64) * scale + shift, dtype=bias.dtype)
        self.remove_bn(bn, absorbed_by=add, after=True)
        _note(matmul, f"{ABSORBED_PREFIX} '{node_label(bn)}' (weight)")
        return matmul

    def _fold_matmul_then_bn(self, bn, matmul, scale, shift) -> Kept | onnx.NodeProto:
        """A bias-less MatMul on 2-D input becomes a Gemm whose C takes the BN's shift."""
        index = self.index
        weight = index.constant(matmul.input[1])
        if weight is None or weight.ndim != 2 or index.constant(matmul.input[0]) is not None:
            return Kept("not_constant", "the MatMul's weight is not a constant 2-D matrix")
        if weight.shape[1] != len(scale):
            return Kept("shape_mismatch", f"the MatMul has {weight.shape[1]} output channels, the BN {len(scale)}")
        if index.rank(bn.input[0]) != 2:
            return Kept("shape_mismatch", "BN normalises axis 1, but the MatMul's output channels are its last axis "
                                          "(input is not 2-D)")
        work = _work_dtype(weight.dtype)
        self.store(matmul, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], dtype=weight.dtype)
        self._matmul_to_gemm(matmul, shift, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=matmul, after=True)
        return matmul

    def _matmul_to_gemm(self, matmul: onnx.NodeProto, bias: np.ndarray, *, dtype) -> None:
        """MatMul(A, B) with 2-D A is Gemm(A, B, C=bias): same name, same inputs, and a bias."""
        matmul.op_type = "Gemm"
        self.store(matmul, 2, bias, dtype=dtype)

    def fold_before(self, bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> Kept | Absorbed | onnx.NodeProto:
        """Fold into the one layer that reads the BN's output; return that layer or why not."""
        index = self.index
        metadata = index.metadata_readers(bn.output[0])
        readers = [r for r in index.readers.get(bn.output[0], []) if not any(r is m for m in metadata)]
        if bn.output[0] in index.graph_outputs:
            return Kept("graph_output", "its output is a graph output")
        if len(readers) != 1:
            if readers:
                return Kept("multiple_consumers", "its output feeds several nodes")
            return Kept("no_linear_neighbour", "its output is unused")
        layer = readers[0]
        if layer.op_type == "Pad" and layer.domain in ONNX_DOMAINS and layer.input[0] == bn.output[0]:
            return self._fold_bn_then_pad_conv(bn, layer, scale, shift)
        if layer.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or layer.domain not in ONNX_DOMAINS:
            return Kept("no_linear_neighbour", f"its output goes to {layer.op_type}, not Conv, Gemm or MatMul")
        if bn.output[0] not in layer.input or list(layer.input).index(bn.output[0]) != 0:
            role = "second operand" if layer.op_type == "MatMul" else "weight or bias"
            return Kept("no_linear_neighbour", f"it feeds the {layer.op_type}'s {role}, not its data input")
        if layer.op_type == "Conv":
            return self._fold_bn_then_conv(bn, layer, scale, shift)
        if layer.op_type == "Gemm":
            return self._fold_bn_then_gemm(bn, layer, scale, shift)
        if layer.op_type == "MatMul":
            return self._fold_bn_then_matmul(bn, layer, scale, shift)
        return Kept("unsupported_layer",
                    "it precedes a ConvTranspose, whose border outputs sum fewer taps, so the shift is not uniform")

    def _weight_and_bias(self, layer: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | Kept:
        """The layer's weight and optional bias as arrays, or the reason they are not constants."""
        weight_name = layer.input[1] if len(layer.input) > 1 else ""
        bias_name = layer.input[2] if len(layer.input) > 2 else ""
        weight = self.index.constant(weight_name)
        bias = self.index.constant(bias_name) if bias_name else None
        if weight is None or (bias_name and bias is None):
            if any(self.index.is_overridable(name) for name in (weight_name, bias_name)):
                return Kept("overridable_input", f"the {layer.op_type}'s weight or bias is also a graph input, "
                                                 "which a caller may override")
            return Kept("not_constant", f"the {layer.op_type}'s weight or bias is not a constant")
        if weight.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the {layer.op_type}'s weight has dtype {weight.dtype}")
        return weight, bias

    def _fold_bn_then_pad_conv(self, bn, pad, scale, shift) -> Kept | Absorbed:
        """BN → Pad → Conv: the Pad must copy values (reflect, edge, wrap) along spatial axes only."""
        index = self.index
        mode = attribute(pad, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant":
            return Kept("zero_padding", "it precedes a constant Pad before a Conv: the padded border is not shifted, "
                                        "so the fold is inexact")
        if mode not in ("reflect", "edge", "wrap"):
            return Kept("unsupported_layer", f"it precedes a Pad of mode '{mode}', which this fold does not know")
        amounts = self._pad_amounts(pad)
        if isinstance(amounts, Kept):
            return amounts
        if pad.output[0] in index.graph_outputs:
            return Kept("graph_output", "the Pad after it is a graph output")
        metadata = index.metadata_readers(pad.output[0])  # the Pad's output keeps its shape and type
        readers = [r for r in index.readers.get(pad.output[0], []) if not any(r is m for m in metadata)]
        if len(readers) != 1:
            return Kept("multiple_consumers" if readers else "no_linear_neighbour",
                        "the Pad after it feeds several nodes" if readers else "the Pad after it is unused")
        conv = readers[0]
        if conv.op_type != "Conv" or conv.domain not in ONNX_DOMAINS or list(conv.input).index(pad.output[0]) != 0:
            return Kept("no_linear_neighbour", f"it goes through a Pad to {conv.op_type}, not to a Conv's data input")
        weight_name = conv.input[1] if len(conv.input) > 1 else ""
        weight = index.constant(weight_name)
        rank = weight.ndim if weight is not None else index.rank(bn.output[0])
        if rank is None:
            return Kept("shape_mismatch", "the rank of the padded tensor is unknown")
        begins, ends = amounts
        axes = self._pad_axes(pad, rank, len(begins))
        if isinstance(axes, Kept):
            return axes
        if any(axis in (0, 1) and (b or e) for axis, b, e in zip(axes, begins, ends)):
            return Kept("shape_mismatch", "the Pad after it pads the batch or channel axis, so channels do not line up")
        return self._fold_bn_then_conv(bn, conv, scale, shift, through=pad)

    def _pad_amounts(self, pad: onnx.NodeProto) -> tuple[list[int], list[int]] | Kept:
        """(begins, ends) of a Pad: the ``pads`` (or Pad-1's ``paddings``) attribute, or a constant input (Pad-11+)."""
        index = self.index
        if len(pad.input) > 1 and pad.input[1]:
            if index.is_overridable(pad.input[1]):
                return Kept("overridable_input", "the Pad's amounts are also a graph input, which a caller may override")
            value = index.constant(pad.input[1])
            if value is None:
                return Kept("not_constant", "the Pad's amounts after it are not a constant")
            pads = [int(v) for v in value.reshape(-1)]
        else:
            pads = attribute(pad, "pads", None)
            pads = list(attribute(pad, "paddings", []) if pads is None else pads)
        half = len(pads) // 2
        return pads[:half], pads[half:]

    def _pad_axes(self, pad: onnx.NodeProto, rank: int, count: int) -> list[int] | Kept:
        """The axes the Pad's amounts apply to: its ``axes`` input (Pad-18+), else every axis in order."""
        if len(pad.input) < 4 or not pad.input[3]:
            return list(range(count))
        if self.index.is_overridable(pad.input[3]):
            return Kept("overridable_input", "the Pad's axes are also a graph input, which a caller may override")
        axes = self.index.constant(pad.input[3])
        if axes is None:
            return Kept("not_constant", "the Pad's axes after it are not a constant")
        return [int(a) % rank for a in axes.reshape(-1)]

    def _fold_bn_then_conv(self, bn, conv, scale, shift, *, through=None) -> Kept | Absorbed | onnx.NodeProto:
        pads = attribute(conv, "pads", [])
        auto_pad = attribute(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return Kept("zero_padding",
                        "it precedes a Conv with zero padding: the padded border is not shifted, so the fold is inexact")
        constants = self._weight_and_bias(conv)
        if isinstance(constants, Kept):
            return constants
        weight, bias = constants
        groups = attribute(conv, "group", 1)
        if weight.shape[1] * groups != len(scale):
            return Kept("shape_mismatch", f"the Conv reads {weight.shape[1] * groups} channels, the BN has {len(scale)}")
        work = _work_dtype(weight.dtype)
        new_weight, _ = fold_into_input_channels(weight.astype(work, copy=False), None, scale.astype(work), shift,
                                                 groups=groups)
        _, added = fold_into_input_channels(weight.astype(np.float64), None, scale, shift, groups=groups)
        new_bias = added if bias is None else bias.astype(np.float64) + added
        self.store(conv, 1, new_weight, dtype=weight.dtype)
        self.store(conv, 2, new_bias, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=conv, after=False, through=through)
        return conv if through is None else Absorbed([conv], through=through.op_type)

    def _fold_bn_then_gemm(self, bn, gemm, scale, shift) -> Kept | onnx.NodeProto:
        if attribute(gemm, "transA", 0):
            return Kept("shape_mismatch", "it precedes a Gemm with transA=1, which reads the BN's channels as rows")
        constants = self._weight_and_bias(gemm)
        if isinstance(constants, Kept):
            return constants
        weight, bias = constants
        trans_b = attribute(gemm, "transB", 0)
        as_linear = weight if trans_b else weight.T  # (out, in), the layout fold_into_input_channels takes
        if as_linear.shape[1] != len(scale):
            return Kept("shape_mismatch", f"the Gemm reads {as_linear.shape[1]} channels, the BN has {len(scale)}")
        effective_bias = self._gemm_bias(gemm, bias, as_linear.shape[0])
        if isinstance(effective_bias, Kept):
            return effective_bias
        work = _work_dtype(weight.dtype)
        new_linear, _ = fold_into_input_channels(as_linear.astype(work, copy=False), None, scale.astype(work), shift)
        _, added = fold_into_input_channels(as_linear.astype(np.float64), None, scale, shift)
        alpha = float(attribute(gemm, "alpha", 1.0))
        self.store(gemm, 1, new_linear if trans_b else new_linear.T, dtype=weight.dtype)
        self.store(gemm, 2, effective_bias + alpha * added, dtype=weight.dtype)
        set_attribute(gemm, "beta", 1.0)
        self.remove_bn(bn, absorbed_by=gemm, after=False)
        return gemm

    def _fold_bn_then_matmul(self, bn, matmul, scale, shift) -> Kept | onnx.NodeProto:
        index = self.index
        weight = index.constant(matmul.input[1])
        if weight is None or weight.ndim != 2:
            return Kept("not_constant", "the MatMul's weight is not a constant 2-D matrix")
        if weight.dtype.name not in FOLDABLE_DTYPES:
            return Kept("dtype", f"the MatMul's weight has dtype {weight.dtype}")
        if index.rank(bn.input[0]) != 2:
            return Kept("shape_mismatch", "BN normalises axis 1, but the MatMul reads the last axis (input is not 2-D)")
        if weight.shape[0] != len(scale):
            return Kept("shape_mismatch", f"the MatMul has {weight.shape[0]} input channels, the BN {len(scale)}")
        work = _work_dtype(weight.dtype)
        new_weight = weight.astype(work, copy=False) * scale.astype(work)[:, None]
        added = shift @ weight.astype(np.float64)
        readers = index.readers.get(matmul.output[0], [])
        sole_reader = readers[0] if len(readers) == 1 and index.use_count(matmul.output[0]) == 1 else None
        add = sole_reader if sole_reader is not None and sole_reader.op_type == "Add" else None
        position = 1 - list(add.input).index(matmul.output[0]) if add is not None else None
        bias = index.constant(add.input[position]) if add is not None else None
        if bias is not None and bias.ndim <= 1 and bias.size in (1, weight.shape[1]) and bias.dtype.name in FOLDABLE_DTYPES:
            self.store(matmul, 1, new_weight, dtype=weight.dtype)
            self.store(add, position, np.broadcast_to(bias.astype(np.float64), added.shape) + added, dtype=bias.dtype)
        else:  # no bias Add of its own: the MatMul becomes a Gemm whose C takes the shift
            self.store(matmul, 1, new_weight, dtype=weight.dtype)
            self._matmul_to_gemm(matmul, added, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=matmul, after=False)
        return matmul

    # the driver -----------------------------------------------------------------------

    def fold_one(self, bn: onnx.NodeProto) -> FoldRecord:
        label = node_label(bn)
        try:
            return self._fold_one(bn, label)
        except BnexportError:
            raise
        except (ValueError, IndexError, TypeError, ArithmeticError) as err:  # a shape the checks above did not foresee
            raise BnexportError(f"BatchNormalization '{label}': cannot be folded ({first_line(err)})") from None

    def _fold_one(self, bn: onnx.NodeProto, label: str) -> FoldRecord:
        module = self.names.path(bn)
        if len(bn.input) < 5 or not bn.input[0]:
            return FoldRecord(label, KEPT, reason="it has fewer than five inputs", reason_code="shape_mismatch",
                              module=module)
        parameters = bn_parameters(self.index, bn, opset=self.context.opset)
        if isinstance(parameters, Kept):
            return FoldRecord(label, KEPT, reason=parameters.reason, reason_code=parameters.code, module=module)
        scale, shift = parameters
        after = self.fold_after(bn, scale, shift)
        if not isinstance(after, Kept):
            return self._folded(label, module, after, position="after")
        before = self.fold_before(bn, scale, shift)
        if not isinstance(before, Kept):
            return self._folded(label, module, before, position="before")
        kept = _combine(after, before)
        return FoldRecord(label, KEPT, reason=kept.reason, reason_code=kept.code, module=module)

    def _folded(self, label: str, module: str | None, absorbed: "Absorbed | onnx.NodeProto", *, position: str) -> FoldRecord:
        if not isinstance(absorbed, Absorbed):
            absorbed = Absorbed([absorbed])
        first = absorbed.layers[0]
        record = FoldRecord(label, FOLDED, folded_into=node_label(first), position=position, module=module,
                            folded_into_module=self.names.path(first), through=absorbed.through,
                            into_scale=absorbed.into_scale)
        if len(absorbed.layers) > 1:
            record.split_over = [node_label(layer) for layer in absorbed.layers]
            paths = [self.names.path(layer) for layer in absorbed.layers]
            record.split_over_modules = paths if all(paths) else None
        return record

    def finish(self, source_initializers=()) -> None:
        """Drop the folded BNs and what only they and their layers read; copy the main graph's
        initializers that no fold rewrote, once each, in the source's order, after the folded ones.

        Subgraphs must be finished before the graph that holds them, since what they read from
        outside decides what it keeps.
        """
        graph = self.graph
        index = self.index
        _delete_where(graph.node, lambda node: id(node) in self.removed)
        used = self._remove_dead_constants()
        # an initializer the caller may feed stays, so the model's inputs do not change
        keep = index.inputs if self.is_root and self.context.ir_version >= 4 else set()
        dropped = {name for name in self.used_before if name not in used and name not in keep}
        dropped |= {name for name in index.written if name not in used and name not in keep}
        _delete_where(graph.initializer, lambda tensor: tensor.name in dropped)
        if self.is_root:
            for tensor in source_initializers:
                if tensor.name not in dropped and tensor.name not in index.written:
                    graph.initializer.add().CopyFrom(tensor)
        if self.is_root and self.context.ir_version < 4:  # IR < 4: every initializer is also a graph input
            _delete_where(graph.input, lambda value: value.name in dropped and self.index.is_initializer(value.name))
            declared = {value.name for value in graph.input}
            for name, tensor in index.written.items():
                if name not in declared and name not in dropped:
                    graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        gone = self.known_before - defined_names(graph)
        _delete_where(graph.value_info, lambda value: value.name in gone)

    def _remove_dead_constants(self) -> set[str]:
        """Drop nodes of ``CONSTANT_OPS`` that a fold left unread; return every name still read."""
        graph = self.graph
        used = {o.name for o in graph.output}
        dead = []
        for position in reversed(range(len(graph.node))):  # reverse topological order: readers before producers
            node = graph.node[position]
            outputs = [name for name in node.output if name]
            if node.op_type in CONSTANT_OPS and node.domain in ONNX_DOMAINS and not any(n in used for n in outputs) \
                    and any(n in self.used_before for n in outputs):
                dead.append(position)
                continue
            used.update(name for name in node.input if name)
            used |= implicit_inputs(node)
        for position in dead:  # descending already
            del graph.node[position]
        return used


def fold_graph(model: onnx.ModelProto, *, fold_overridable: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization that folds exactly, in the main graph and every subgraph; return (copy, report).

    ``fold_overridable`` treats initializers that are also graph inputs (IR >= 4) as
    constants; by default a BN that needs one is kept. When nothing folds, the copy is the
    input, untouched. Raises ``BnexportError`` naming the BN whose running variance is
    negative, NaN, or zero with ε = 0, or whose shapes make the fold impossible.
    """
    report = FoldReport(source="onnx")
    in_functions = bool(model.functions) and functions_hold_batchnorm(model)
    if not _has_batchnorm(model.graph) and not in_functions:
        return _untouched_copy(model), report
    # the copy's initializers are written by the fold (folded values) and by GraphFolder.finish (the rest, once each):
    # copying them all first would hold the replaced bytes of every folded weight until the model is freed
    folded = copy_without_initializers(model)
    root = GraphFolder(folded, initializers={t.name: t for t in model.graph.initializer}, fold_overridable=fold_overridable)
    folders = [root]

    def visit(folder: GraphFolder) -> None:
        for node in list(folder.graph.node):
            if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
                report.records.append(folder.fold_one(node))
            for sub in subgraphs(node):
                child = GraphFolder(folded, graph=sub, parent=folder, context=folder.context)
                folders.append(child)
                visit(child)

    visit(root)
    if in_functions:
        report.records += fold_functions(folded, folders)
    if not report.folded:
        return _untouched_copy(model), report
    for folder in reversed(folders):  # a subgraph before the graph that holds it
        folder.finish(model.graph.initializer if folder.is_root else ())
    return folded, report


def _has_batchnorm(graph: onnx.GraphProto) -> bool:
    return any((node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS)
               or any(_has_batchnorm(sub) for sub in subgraphs(node)) for node in graph.node)


def _note(node: onnx.NodeProto, note: str) -> None:
    node.doc_string = f"{node.doc_string}\n{note}".strip() if node.doc_string else note


def _same_shape(index: GraphIndex, name: str, array: np.ndarray) -> bool:
    """Whether rewriting ``name`` in place keeps its shape (declared inputs and value_info stay true)."""
    tensor = index.written[name] if name in index.written else index.initializers[name]
    return tuple(tensor.dims) == array.shape


def _overwrite(tensor: onnx.TensorProto, name: str, array: np.ndarray) -> None:
    """Give ``tensor`` new values, as raw little-endian bytes (one copy, not three)."""
    tensor.Clear()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = (array if np.little_endian else array.byteswap()).tobytes()  # arrays here are in native order


def _delete_where(repeated, drop) -> None:
    """Delete matching entries of a protobuf repeated field by index; ``remove`` would compare whole tensors."""
    for position in reversed([i for i, item in enumerate(repeated) if drop(item)]):
        del repeated[position]


def _untouched_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
