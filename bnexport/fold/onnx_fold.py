"""Fold BatchNormalization into a neighbouring linear node of an ONNX graph.

Patterns, each exact in eval mode:

- Conv / ConvTranspose / Gemm → BN, and MatMul → Add(constant) → BN on a 2-D tensor:
  the BN scales the layer's output channels (``maths.fold_into_output_channels``,
  ``maths.fold_into_transposed_conv``).
- BN → Conv with zero pads, BN → Gemm, BN → MatMul → Add(constant) on a 2-D tensor: the BN
  is folded into the layer after it (``maths.fold_into_input_channels``).

The graph is rewritten on a copy: the layer takes the folded weight and bias, the BN node
is removed, and initializers and constant subgraphs nothing reads any more are dropped.
Node names are kept, so the folded graph reads the same in Netron, and each layer records
in its ``doc_string`` which BatchNormalization it absorbed. A weight read by several nodes
is copied for the node being folded, so every call site keeps its own numbers.

Constants are followed through the small subgraphs exporters write for them: Identity (the
TorchScript exporter's deduplicated initializers) and the Shape → Expand → CastLike zero
bias that the dynamo exporter gives a bias-less conv when ``optimize=False``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import BnexportError
from .maths import (bn_scale_shift, fold_into_input_channels, fold_into_output_channels, fold_into_transposed_conv,
                    invalid_statistics)
from .report import FOLDED, KEPT, FoldRecord, FoldReport

ABSORBED_PREFIX = "bnexport: absorbed BatchNormalization"

# Ops that compute a constant from constants; followed when looking for a weight or bias,
# and dropped once nothing reads them.
CONSTANT_OPS = {"Constant", "Identity", "Shape", "Expand", "CastLike", "Cast", "ConstantOfShape",
                "Concat", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Transpose"}


class GraphIndex:
    """Who produces and who reads each tensor, and the value of each constant tensor.

    Built once per graph and updated by each fold, so folding n BatchNorms costs O(n).
    """

    def __init__(self, model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto] | None = None):
        self.model = model
        graph = self.graph = model.graph
        # read-only tensors (possibly the source model's); folded values live in new_values until written out
        self.initializers = {t.name: t for t in graph.initializer} if initializers is None else initializers
        self.new_values: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.elem_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
        self._constants: dict[str, np.ndarray | None] = {}
        self.shapes: dict[str, list[int | None]] | None = None  # filled by shape inference when first needed

    def constant(self, name: str) -> np.ndarray | None:
        """The tensor's value when it is constant. Initializers are read afresh each time rather
        than cached, so the fold never holds a second copy of every weight."""
        if not name:
            return None
        if name in self.new_values:
            return self.new_values[name]
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name not in self._constants:
            self._constants[name] = self._evaluate(name)
        return self._constants[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is None or node.op_type not in CONSTANT_OPS:
            return None
        try:
            return _evaluate_constant_node(self, node)
        except (ValueError, IndexError, TypeError):  # an unusual attribute combination: treat as not constant
            return None

    def is_initializer(self, name: str) -> bool:
        return name in self.new_values or name in self.initializers

    def elem_type(self, name: str) -> int | None:
        if name in self.new_values:
            return helper.np_dtype_to_tensor_dtype(self.new_values[name].dtype)
        if name in self.initializers:
            return self.initializers[name].data_type
        if name in self.elem_types and self.elem_types[name]:
            return self.elem_types[name]
        value = self.constant(name)
        return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)

    def use_count(self, name: str) -> int:
        return len(self.readers.get(name, [])) + (name in self.graph_outputs)

    def metadata_readers(self, name: str) -> list[onnx.NodeProto]:
        """Readers that need only the tensor's shape or type (Shape, CastLike's target), not its values."""
        return [node for node in self.readers.get(name, [])
                if node.op_type == "Shape" or (node.op_type == "CastLike" and node.input[0] != name)]

    def value_use_count(self, name: str) -> int:
        """Uses of the tensor's values; a BN keeps shape and type, so metadata readers may move to its output."""
        return self.use_count(name) - len(self.metadata_readers(name))


    def replace_input(self, node: onnx.NodeProto, position: int, new_name: str) -> None:
        old = node.input[position] if position < len(node.input) else ""
        if old:
            _remove_by_identity(self.readers[old], node)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = new_name
        self.readers.setdefault(new_name, []).append(node)

    def static_shape(self, name: str) -> list[int | None] | None:
        """The tensor's shape from ONNX shape inference (run once, when first needed); None dims are dynamic."""
        if self.shapes is None:
            # the graph being folded holds no initializers yet: declare their types and shapes as inputs
            probe = onnx.ModelProto()
            probe.CopyFrom(self.model)
            declared = {i.name for i in probe.graph.input}
            for constant_name, tensor in self.initializers.items():
                if constant_name not in declared:
                    probe.graph.input.append(helper.make_tensor_value_info(constant_name, tensor.data_type, list(tensor.dims)))
            for constant_name, value in self.new_values.items():
                if constant_name not in declared and constant_name not in self.initializers:
                    probe.graph.input.append(helper.make_tensor_value_info(
                        constant_name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
            inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
            self.shapes = {
                v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
                if v.type.tensor_type.HasField("shape")
            }
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.static_shape(name)
        return None if shape is None else len(shape)


def _evaluate_constant_node(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    op = node.op_type
    if op == "Constant":
        for attr in node.attribute:
            value = helper.get_attribute_value(attr)
            if attr.name == "value":
                return numpy_helper.to_array(value)
            if attr.name in ("value_float", "value_floats"):
                return np.array(value, dtype=np.float32)
            if attr.name in ("value_int", "value_ints"):
                return np.array(value, dtype=np.int64)
        return None
    if op == "Shape":  # needs only the input's shape, which an initializer knows without its data
        source = node.input[0]
        shape = list(index.initializers[source].dims) if source in index.initializers else None  # folds keep shapes
        if shape is None:
            value = index.constant(source)
            # an activation's shape is constant where inference knows the dims asked for
            shape = list(value.shape) if value is not None else index.static_shape(source)
            if shape is None:
                return None
        start, end = attribute(node, "start", 0), attribute(node, "end", len(shape))
        dims = shape[start:end]
        return None if None in dims else np.array(dims, dtype=np.int64)
    if op == "CastLike":  # needs only the target's element type, not its values
        value, target_type = index.constant(node.input[0]), index.elem_type(node.input[1])
        if value is None or target_type is None:
            return None
        return value.astype(helper.tensor_dtype_to_np_dtype(target_type))
    inputs = [index.constant(name) if name else None for name in node.input]
    if any(value is None for name, value in zip(node.input, inputs) if name):
        return None
    if op == "Identity":
        return inputs[0]
    if op == "Cast":
        return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attribute(node, "to", 1)))
    if op == "Expand":
        return np.broadcast_to(inputs[0], np.broadcast_shapes(inputs[0].shape, tuple(inputs[1]))).copy()
    if op == "ConstantOfShape":
        value = attribute(node, "value", None)
        fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, dtype=np.float32)
        return np.full(tuple(inputs[0]), fill.reshape(-1)[0], dtype=fill.dtype)
    if op == "Concat":
        return np.concatenate(inputs, axis=attribute(node, "axis", 0))
    if op == "Reshape":
        shape = [d if d != 0 else inputs[0].shape[i] for i, d in enumerate(inputs[1])]
        return inputs[0].reshape(shape)
    if op == "Unsqueeze":
        axes = inputs[1] if len(inputs) > 1 else attribute(node, "axes", [])
        return np.expand_dims(inputs[0], tuple(int(a) for a in axes))
    if op == "Squeeze":
        axes = inputs[1] if len(inputs) > 1 else attribute(node, "axes", None)
        return np.squeeze(inputs[0], None if axes is None else tuple(int(a) for a in axes))
    if op == "Gather":
        return np.take(inputs[0], inputs[1], axis=attribute(node, "axis", 0))
    if op == "Transpose":  # the TorchScript exporter's bias-less Linear: MatMul(x, Transpose(W))
        return np.transpose(inputs[0], attribute(node, "perm", None))
    return None


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def bn_parameters(index: GraphIndex, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) in float64 for a foldable BN, or the reason it cannot be folded.

    Raises ``BnexportError`` for statistics that make the BN itself NaN or infinite.
    """
    if attribute(bn, "training_mode", 0):
        return "training_mode=1: uses batch statistics"
    if any(bn.output[1:]):
        return "outputs running statistics (training graph)"
    values = [index.constant(name) for name in bn.input[1:5]]
    if any(v is None for v in values):
        missing = [role for role, v in zip(("scale", "bias", "mean", "variance"), values) if v is None]
        return f"{', '.join(missing)} not a constant (computed in the graph, e.g. batch statistics)"
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    eps = float(attribute(bn, "epsilon", 1e-5))
    problem = invalid_statistics(var, eps)
    if problem:
        raise BnexportError(f"BatchNormalization '{node_label(bn)}': {problem}; refusing to fold a BN that outputs NaN or inf")
    return bn_scale_shift(gamma, beta, mean, var, eps)


def _output_channels(layer: onnx.NodeProto, weight: np.ndarray) -> int:
    if layer.op_type == "ConvTranspose":
        return weight.shape[1] * attribute(layer, "group", 1)
    if layer.op_type == "Gemm":
        return weight.shape[0] if attribute(layer, "transB", 0) else weight.shape[-1]
    return weight.shape[0]


def _work_dtype(dtype: np.dtype) -> type:
    """float64 models fold in float64; others scale their weights in float32 (one rounding, as in float64 then cast)."""
    return np.float64 if dtype == np.float64 else np.float32


class Folder:
    """The rewrite of one model: holds the copy, its index and the nodes removed so far."""

    def __init__(self, model: onnx.ModelProto, *, initializers: dict[str, onnx.TensorProto] | None = None):
        self.model = model
        self.index = GraphIndex(model, initializers)
        # id → node; holding the node keeps its protobuf wrapper, and so its id, alive until finish()
        self.removed: dict[int, onnx.NodeProto] = {}

    # writing results -------------------------------------------------------------------

    def store(self, node: onnx.NodeProto, position: int, value: np.ndarray, *, dtype: np.dtype) -> None:
        """Give ``node`` input ``position`` the constant ``value``: in place when only it reads it, else a copy."""
        index = self.index
        name = node.input[position] if position < len(node.input) else ""
        array = np.ascontiguousarray(value, dtype=dtype)
        # readers of only its shape or type (Shape, CastLike) do not count: a fold keeps both
        if name and index.is_initializer(name) and index.value_use_count(name) == 1:
            index.new_values[name] = array
            return
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if position == 2 and weight_name.endswith("weight") and not index.is_initializer(name):
            base = f"{weight_name[:-len('weight')]}bias"  # a bias-less conv's new bias: "conv.weight" → "conv.bias"
        else:
            base = f"{name or node.output[0]}_bnfolded"
        new_name, counter = base, 0
        while index.is_initializer(new_name) or new_name in index.producer or new_name in index.readers or \
                new_name in index.graph_outputs:
            counter += 1
            new_name = f"{base}_{counter}"
        index.new_values[new_name] = array
        index.replace_input(node, position, new_name)

    def remove_bn(self, bn: onnx.NodeProto, *, absorbed_by: onnx.NodeProto, after: bool) -> None:
        """Take the BN out of the graph; its output is now produced by ``absorbed_by`` (after) or
        its input read by ``absorbed_by`` (before)."""
        index = self.index
        if after:  # layer → BN: the layer writes the BN's output name
            old_output = absorbed_by.output[0]
            for reader in self.index.metadata_readers(old_output):
                self.index.replace_input(reader, list(reader.input).index(old_output), bn.output[0])
            _drop_value_info(self.model.graph, old_output)
            absorbed_by.output[0] = bn.output[0]
            index.producer[bn.output[0]] = absorbed_by
            index.producer.pop(old_output, None)
        else:  # BN → layer: the layer reads the BN's input
            position = list(absorbed_by.input).index(bn.output[0])
            index.replace_input(absorbed_by, position, bn.input[0])
            for reader in index.metadata_readers(bn.output[0]):
                index.replace_input(reader, list(reader.input).index(bn.output[0]), bn.input[0])
            _drop_value_info(self.model.graph, bn.output[0])
            index.producer.pop(bn.output[0], None)
        for name in bn.input:
            if name:
                _remove_by_identity(index.readers.get(name, []), bn)
        note = f"{ABSORBED_PREFIX} '{node_label(bn)}'"
        absorbed_by.doc_string = f"{absorbed_by.doc_string}\n{note}".strip() if absorbed_by.doc_string else note
        self.removed[id(bn)] = bn

    # the patterns -------------------------------------------------------------------------

    def fold_after(self, bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> str | onnx.NodeProto:
        """Fold into the layer that produces the BN's input; return that layer or why not."""
        index = self.index
        layer = index.producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "ConvTranspose", "Gemm", "Add", "MatMul"):
            return f"input comes from {layer.op_type if layer else 'a graph input'}, not Conv, ConvTranspose, Gemm or MatMul"
        if index.value_use_count(layer.output[0]) > 1:
            return f"the {layer.op_type}'s output feeds more than the BN"
        if layer.op_type == "Add":
            return self._fold_matmul_add_then_bn(bn, layer, scale, shift)
        if layer.op_type == "MatMul":
            return self._fold_matmul_then_bn(bn, layer, scale, shift)
        constants = self._weight_and_bias(layer)
        if isinstance(constants, str):
            return constants
        weight, bias = constants
        if _output_channels(layer, weight) != len(scale):
            return f"the {layer.op_type} has {_output_channels(layer, weight)} output channels, the BN {len(scale)}"
        work = _work_dtype(weight.dtype)
        scale_w = scale.astype(work)
        if layer.op_type == "Conv":
            new_weight, _ = fold_into_output_channels(weight.astype(work, copy=False), None, scale_w, shift)
            new_bias = shift if bias is None else bias.astype(np.float64) * scale + shift
        elif layer.op_type == "ConvTranspose":
            new_weight, _ = fold_into_transposed_conv(weight.astype(work, copy=False), None, scale_w, shift,
                                                      groups=attribute(layer, "group", 1))
            new_bias = shift if bias is None else bias.astype(np.float64) * scale + shift
        else:  # Gemm: Y = α·A·op(B) + β·C, output channels are op(B)'s columns
            effective_bias = self._gemm_bias(layer, bias, len(scale))
            if isinstance(effective_bias, str):
                return effective_bias
            trans_b = attribute(layer, "transB", 0)
            new_weight = weight.astype(work, copy=False) * (scale_w[:, None] if trans_b else scale_w[None, :])
            new_bias = effective_bias * scale + shift
            set_attribute(layer, "beta", 1.0)
        self.store(layer, 1, new_weight, dtype=weight.dtype)
        self.store(layer, 2, new_bias, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=layer, after=True)
        return layer

    def _gemm_bias(self, gemm: onnx.NodeProto, bias: np.ndarray | None, channels: int) -> np.ndarray | str:
        """β·C as a float64 vector over the output channels, or why C does not broadcast as one."""
        if bias is None:
            return np.zeros(channels)
        if bias.size not in (1, channels) or (bias.ndim == 2 and bias.shape[0] != 1):
            return f"the Gemm's C has shape {list(bias.shape)}, not one value per output channel"
        return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) * float(attribute(gemm, "beta", 1.0))

    def _fold_matmul_add_then_bn(self, bn, add, scale, shift) -> str | onnx.NodeProto:
        index = self.index
        found = self._matmul_and_bias(add)
        if isinstance(found, str):
            return found
        matmul, weight, bias_position, bias = found
        if index.rank(bn.input[0]) != 2:
            return "BN normalises axis 1, but the MatMul's output channels are its last axis (input is not 2-D)"
        if bias.size not in (1, len(scale)) or bias.ndim > 1:
            return f"the Add's constant has shape {list(bias.shape)}, not one value per output channel"
        work = _work_dtype(weight.dtype)
        self.store(matmul, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], dtype=weight.dtype)
        self.store(add, bias_position, bias.astype(np.float64) * scale + shift, dtype=bias.dtype)
        self.remove_bn(bn, absorbed_by=add, after=True)
        note = f"{ABSORBED_PREFIX} '{node_label(bn)}' (weight)"
        matmul.doc_string = f"{matmul.doc_string}\n{note}".strip() if matmul.doc_string else note
        return matmul

    def _fold_matmul_then_bn(self, bn, matmul, scale, shift) -> str | onnx.NodeProto:
        """A bias-less MatMul on 2-D input becomes a Gemm whose C takes the BN's shift."""
        index = self.index
        weight = index.constant(matmul.input[1])
        if weight is None or weight.ndim != 2 or index.constant(matmul.input[0]) is not None:
            return "the MatMul's weight is not a constant 2-D matrix"
        if weight.shape[1] != len(scale):
            return f"the MatMul has {weight.shape[1]} output channels, the BN {len(scale)}"
        if index.rank(bn.input[0]) != 2:
            return "BN normalises axis 1, but the MatMul's output channels are its last axis (input is not 2-D)"
        work = _work_dtype(weight.dtype)
        self.store(matmul, 1, weight.astype(work, copy=False) * scale.astype(work)[None, :], dtype=weight.dtype)
        self._matmul_to_gemm(matmul, shift, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=matmul, after=True)
        return matmul

    def _matmul_to_gemm(self, matmul: onnx.NodeProto, bias: np.ndarray, *, dtype) -> None:
        """MatMul(A, B) with 2-D A is Gemm(A, B, C=bias): same name, same inputs, and a bias."""
        matmul.op_type = "Gemm"
        self.store(matmul, 2, bias, dtype=dtype)

    def _matmul_and_bias(self, add: onnx.NodeProto):
        """(MatMul, its constant 2-D weight, the Add input position of the bias, the bias) or why not."""
        index = self.index
        for position in (0, 1):
            bias = index.constant(add.input[1 - position])
            matmul = index.producer.get(add.input[position])
            if bias is None or matmul is None or matmul.op_type != "MatMul":
                continue
            weight = index.constant(matmul.input[1])
            if weight is None or weight.ndim != 2 or index.constant(matmul.input[0]) is not None:
                return "the MatMul's weight is not a constant 2-D matrix"
            if index.use_count(matmul.output[0]) > 1:
                return "the MatMul's output feeds more than the Add"
            return matmul, weight, 1 - position, bias
        return "input comes from an Add that is not MatMul plus a constant"

    def fold_before(self, bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> str | onnx.NodeProto:
        """Fold into the one layer that reads the BN's output; return that layer or why not."""
        index = self.index
        metadata = index.metadata_readers(bn.output[0])
        readers = [r for r in index.readers.get(bn.output[0], []) if not any(r is m for m in metadata)]
        if bn.output[0] in index.graph_outputs:
            return "its output is a graph output"
        if len(readers) != 1:
            return "its output feeds several nodes" if readers else "its output is unused"
        layer = readers[0]
        if list(layer.input).index(bn.output[0]) != 0:
            return f"it feeds the {layer.op_type}'s weight, not its data input"
        if layer.op_type == "Conv":
            return self._fold_bn_then_conv(bn, layer, scale, shift)
        if layer.op_type == "Gemm":
            return self._fold_bn_then_gemm(bn, layer, scale, shift)
        if layer.op_type == "MatMul":
            return self._fold_bn_then_matmul(bn, layer, scale, shift)
        if layer.op_type == "ConvTranspose":
            return "it precedes a ConvTranspose, whose border outputs sum fewer taps, so the shift is not uniform"
        return f"its output goes to {layer.op_type}, not Conv, Gemm or MatMul"

    def _weight_and_bias(self, layer: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | str:
        """The layer's weight and optional bias as arrays, or the reason they are not constants."""
        weight = self.index.constant(layer.input[1])
        bias_name = layer.input[2] if len(layer.input) > 2 else ""
        bias = self.index.constant(bias_name) if bias_name else None
        if weight is None or (bias_name and bias is None):
            return f"the {layer.op_type}'s weight or bias is not a constant"
        return weight, bias

    def _fold_bn_then_conv(self, bn, conv, scale, shift) -> str | onnx.NodeProto:
        pads = attribute(conv, "pads", [])
        auto_pad = attribute(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return "it precedes a Conv with zero padding: the padded border is not shifted, so the fold is inexact"
        constants = self._weight_and_bias(conv)
        if isinstance(constants, str):
            return constants
        weight, bias = constants
        groups = attribute(conv, "group", 1)
        if weight.shape[1] * groups != len(scale):
            return "channel counts differ"
        work = _work_dtype(weight.dtype)
        new_weight, _ = fold_into_input_channels(weight.astype(work, copy=False), None, scale.astype(work), shift, groups=groups)
        _, added = fold_into_input_channels(weight.astype(np.float64), None, scale, shift, groups=groups)
        new_bias = added if bias is None else bias.astype(np.float64) + added
        self.store(conv, 1, new_weight, dtype=weight.dtype)
        self.store(conv, 2, new_bias, dtype=weight.dtype)
        self.remove_bn(bn, absorbed_by=conv, after=False)
        return conv

    def _fold_bn_then_gemm(self, bn, gemm, scale, shift) -> str | onnx.NodeProto:
        if attribute(gemm, "transA", 0):
            return "it precedes a Gemm with transA=1, which reads the BN's channels as rows"
        constants = self._weight_and_bias(gemm)
        if isinstance(constants, str):
            return constants
        weight, bias = constants
        trans_b = attribute(gemm, "transB", 0)
        as_linear = weight if trans_b else weight.T  # (out, in), the layout fold_into_input_channels takes
        effective_bias = self._gemm_bias(gemm, bias, as_linear.shape[0])
        if isinstance(effective_bias, str):
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

    def _fold_bn_then_matmul(self, bn, matmul, scale, shift) -> str | onnx.NodeProto:
        index = self.index
        weight = index.constant(matmul.input[1])
        if weight is None or weight.ndim != 2:
            return "the MatMul's weight is not a constant 2-D matrix"
        if index.rank(bn.input[0]) != 2:
            return "BN normalises axis 1, but the MatMul reads the last axis (input is not 2-D)"
        if weight.shape[0] != len(scale):
            return f"the MatMul has {weight.shape[0]} input channels, the BN {len(scale)}"
        work = _work_dtype(weight.dtype)
        new_weight = weight.astype(work, copy=False) * scale.astype(work)[:, None]
        added = shift @ weight.astype(np.float64)
        readers = index.readers.get(matmul.output[0], [])
        sole_reader = readers[0] if len(readers) == 1 and index.use_count(matmul.output[0]) == 1 else None
        add = sole_reader if sole_reader is not None and sole_reader.op_type == "Add" else None
        position = 1 - list(add.input).index(matmul.output[0]) if add is not None else None
        bias = index.constant(add.input[position]) if add is not None else None
        if bias is not None and bias.ndim <= 1 and bias.size in (1, weight.shape[1]):
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
        parameters = bn_parameters(self.index, bn)
        if isinstance(parameters, str):
            return FoldRecord(label, KEPT, reason=parameters)
        scale, shift = parameters
        after = self.fold_after(bn, scale, shift)
        if not isinstance(after, str):
            return FoldRecord(label, FOLDED, folded_into=node_label(after), position="after")
        before = self.fold_before(bn, scale, shift)
        if not isinstance(before, str):
            return FoldRecord(label, FOLDED, folded_into=node_label(before), position="before")
        return FoldRecord(label, KEPT, reason=f"{after}; {before}")

    def finish(self, source_initializers) -> None:
        """Drop the folded BNs and the constant subgraphs nothing reads any more, then write the
        initializers still read: folded values as new tensors, the rest copied once, in the
        source's order."""
        graph = self.model.graph
        _delete_where(graph.node, lambda node: id(node) in self.removed)
        remove_unused(self.model)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        for tensor in source_initializers:
            if tensor.name not in used:
                continue
            if tensor.name in self.index.new_values:
                written = graph.initializer.add()
                written.name = tensor.name
                _overwrite(written, self.index.new_values.pop(tensor.name))
            else:
                graph.initializer.add().CopyFrom(tensor)
        for name, array in self.index.new_values.items():
            if name in used:
                written = graph.initializer.add()
                written.name = name
                _overwrite(written, array)
        _delete_where(graph.input, lambda value: value.name in self.index.initializers and value.name not in used)


def _overwrite(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Give ``tensor`` new values of the same dtype, as raw little-endian bytes (one copy, not three)."""
    name = tensor.name
    tensor.Clear()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _remove_by_identity(nodes: list[onnx.NodeProto], node: onnx.NodeProto) -> None:
    for position, candidate in enumerate(nodes):
        if candidate is node:
            del nodes[position]
            return


def _delete_where(repeated, drop) -> None:
    """Delete matching entries of a protobuf repeated field by index; ``remove`` would compare whole tensors."""
    for position in reversed([i for i, item in enumerate(repeated) if drop(item)]):
        del repeated[position]


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    _delete_where(graph.value_info, lambda value: value.name == name)


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop initializers, and nodes of ``CONSTANT_OPS``, whose outputs nothing reads any more."""
    graph = model.graph
    used = {o.name for o in graph.output}
    dead = set()
    for position in reversed(range(len(graph.node))):  # reverse topological order: readers before producers
        node = graph.node[position]
        if node.op_type in CONSTANT_OPS and not any(name in used for name in node.output):
            dead.add(position)
            continue
        used.update(name for name in node.input if name)
    for position in sorted(dead, reverse=True):
        del graph.node[position]
    unused = {t.name for t in graph.initializer if t.name not in used}
    _delete_where(graph.initializer, lambda tensor: tensor.name in unused)
    _delete_where(graph.input, lambda value: value.name in unused)  # IR < 4 lists initializers as inputs
    known = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    _delete_where(graph.value_info, lambda value: value.name not in known)


def fold_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization that folds exactly; return (copy, report).

    Raises ``BnexportError`` naming the BN whose running variance is negative, NaN, or
    zero with ε = 0.
    """
    folded = _copy_without_initializers(model)
    folder = Folder(folded, initializers={t.name: t for t in model.graph.initializer})
    report = FoldReport(source="onnx")
    for bn in [n for n in folded.graph.node if n.op_type == "BatchNormalization"]:
        report.records.append(folder.fold_one(bn))
    folder.finish(model.graph.initializer)
    return folded, report


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Everything of ``model`` but its initializers, which ``Folder.finish`` writes once each.

    Copying them here and overwriting the folded ones later would hold two copies of every
    folded weight: protobuf keeps replaced bytes until the whole message is freed.
    """
    copied = onnx.ModelProto()
    _copy_fields(model, copied, skip={"graph"})
    _copy_fields(model.graph, copied.graph, skip={"initializer"})
    return copied


def _copy_fields(source, target, *, skip: set[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
