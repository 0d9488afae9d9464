"""The graph side of the ONNX fold: who reads what, and what counts as a constant.

A tensor is a constant when its value cannot change between runs:

- an initializer, unless it is also an input of the main graph in a model of IR version 4 or
  later: a caller may then feed another value (ONNX Runtime does not fuse those either). For
  IR version 3 and earlier every initializer must be listed as an input, and it is a constant;
- the output of a node of ``CONSTANT_OPS`` whose own inputs are constants: Constant, and the
  small subgraphs exporters write for a weight or a bias (Identity for TorchScript's
  deduplicated initializers, the Shape → Expand → CastLike zero bias of the dynamo exporter,
  ConstantOfShape for the model zoo's weights, and the TorchScript exporter's Shape → Gather → Mul
  → Sub → ConstantOfShape → Concat → Reshape → Slice → Transpose → Cast chain for a Pad's amounts);
- a name that a subgraph (If, Loop or Scan body) reads from an enclosing graph, when it is a
  constant there. Subgraphs read outer names implicitly: they appear in none of the node's
  inputs, so ``outer_reads`` finds them and the node that owns the subgraph counts as their reader.

Graph inputs, and the inputs of a subgraph (a Loop's iteration count, carried values), are not.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that compute a constant from constants; followed when looking for a weight or bias,
# and dropped once a fold leaves them unread.
CONSTANT_OPS = {"Constant", "Identity", "Shape", "Expand", "CastLike", "Cast", "ConstantOfShape",
                "Concat", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Transpose", "Mul", "Sub", "Slice"}

ONNX_DOMAINS = ("", "ai.onnx")


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes: an If's branches, a Loop's or Scan's body."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(t.values.name for t in graph.sparse_initializer)
    names.update(name for node in graph.node for name in node.output if name)
    return names


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that ``graph`` or any graph nested in it reads from an enclosing scope."""
    defined = defined_names(graph)
    reads = {name for node in graph.node for name in node.input if name and name not in defined}
    reads.update(o.name for o in graph.output if o.name not in defined)  # a branch may return an outer tensor as is
    for node in graph.node:
        for sub in subgraphs(node):
            reads.update(outer_reads(sub) - defined)
    return reads


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """What a node's subgraphs read from the graph the node sits in (or further out)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        names |= outer_reads(sub)
    return names


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name read in ``graph``: node inputs, its subgraphs' outer reads and the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(name for name in node.input if name)
        used |= implicit_inputs(node)
    return used


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name of the main graph and its subgraphs, so new names never shadow one."""
    names: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        names.update(defined_names(graph))
        names.update(o.name for o in graph.output)
        for node in graph.node:
            names.update(node.input)
            for sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    return names


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A read-only view of an initializer's values; raw little-endian bytes are read without a further copy."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type) if tensor.data_type else None
    if (tensor.HasField("raw_data") and dtype is not None and dtype.kind in "fiub" and sys.byteorder == "little"
            and tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


class GraphIndex:
    """Who produces and who reads each tensor of one graph, and the value of each constant tensor.

    A subgraph's index has its enclosing graph's index as ``parent``: names it does not define
    are looked up there. Built once per graph and updated by each fold, so folding n
    BatchNorms costs O(n).
    """

    def __init__(self, model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto] | None = None, *,
                 graph: onnx.GraphProto | None = None, parent: "GraphIndex | None" = None,
                 fold_overridable: bool = False):
        self.model = model
        self.parent = parent
        graph = self.graph = model.graph if graph is None else graph
        # read-only tensors (possibly the source model's)
        self.initializers = {t.name: t for t in graph.initializer} if initializers is None else initializers
        # folded values, already written as tensors of the graph being built: each weight's bytes
        # are copied into the result once, and no array outlives the fold that computed it
        self.written: dict[str, onnx.TensorProto] = {}
        self.inputs = {i.name for i in graph.input}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in {*(n for n in node.input if n), *implicit_inputs(node)}:
                self.readers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.elem_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
        # IR >= 4 lets an initializer be a graph input, whose value a caller may override at run time
        in_signature = parent is None and model.ir_version >= 4
        self.caller_inputs = (self.inputs & set(self.initializers)) if in_signature else set()
        self.overridable = set() if fold_overridable else self.caller_inputs
        self._constants: dict[str, np.ndarray | None] = {}
        self.shapes: dict[str, list[int | None]] | None = None  # filled by shape inference when first needed

    @property
    def root(self) -> "GraphIndex":
        return self if self.parent is None else self.parent.root

    def defines(self, name: str) -> bool:
        return name in self.written or name in self.initializers or name in self.producer or name in self.inputs

    def owner(self, name: str) -> "GraphIndex | None":
        """The index of the innermost graph that defines ``name``, seen from this graph."""
        scope = self
        while scope is not None and not scope.defines(name):
            scope = scope.parent
        return scope

    def constant(self, name: str) -> np.ndarray | None:
        """The tensor's value when it is constant. Initializers are read afresh each time rather
        than cached, so the fold never holds a second copy of every weight."""
        scope = self.owner(name) if name else None
        return None if scope is None else scope._local_constant(name)

    def _local_constant(self, name: str) -> np.ndarray | None:
        if name in self.written:
            return tensor_array(self.written[name])
        if name in self.overridable:
            return None
        if name in self.initializers:
            return tensor_array(self.initializers[name])
        if name not in self._constants:
            self._constants[name] = self._evaluate(name)
        return self._constants[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        node = self.producer.get(name)
        if node is None or node.op_type not in CONSTANT_OPS or node.domain not in ONNX_DOMAINS:
            return None
        try:
            return _evaluate_constant_node(self, node)
        except (ValueError, IndexError, TypeError, KeyError):  # an unusual attribute combination: not constant
            return None

    def is_overridable(self, name: str) -> bool:
        """Whether ``name``, or a tensor its constant value is computed from, is an overridable graph input."""
        scope = self.owner(name) if name else None
        if scope is None:
            return False
        if name in scope.overridable:
            return True
        node = scope.producer.get(name)
        return node is not None and node.op_type in CONSTANT_OPS and any(scope.is_overridable(n) for n in node.input)

    def is_initializer(self, name: str) -> bool:
        """Whether this graph itself holds ``name`` as an initializer (an enclosing graph's do not count)."""
        return name in self.written or name in self.initializers

    def elem_type(self, name: str) -> int | None:
        scope = self.owner(name) or self
        tensor = scope.written[name] if name in scope.written else scope.initializers.get(name)
        if tensor is not None:
            return tensor.data_type
        if scope.elem_types.get(name):
            return scope.elem_types[name]
        if self.elem_types.get(name):
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
            remove_by_identity(self.readers.get(old, []), node)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = new_name
        self.readers.setdefault(new_name, []).append(node)

    def static_shape(self, name: str) -> list[int | None] | None:
        """The tensor's shape from ONNX shape inference (run once on the whole model, when first needed).

        None marks a dynamic dim: symbolic, missing, or a non-positive value such as -1.
        """
        root = self.root
        if root.shapes is None:
            root.shapes = _inferred_shapes(root)
        return root.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.static_shape(name)
        return None if shape is None else len(shape)


def _inferred_shapes(root: GraphIndex) -> dict[str, list[int | None]]:
    # the main graph's constants, source and folded, declared by type and shape only: no weight is copied
    probe = copy_without_initializers(root.model)
    declared = {i.name for i in probe.graph.input}
    for name, tensor in {**root.initializers, **root.written}.items():
        if name not in declared:
            declared.add(name)
            probe.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    except Exception:  # inference gives up on some graphs: every shape is unknown, and patterns needing one keep the BN
        return {}
    shapes: dict[str, list[int | None]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.tensor_type.HasField("shape"):
                shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                      for d in value.type.tensor_type.shape.dim]
        for node in graph.node:
            for sub in subgraphs(node):
                collect(sub)

    collect(inferred.graph)
    return shapes


def _evaluate_constant_node(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The value of ``node``'s output, one of CONSTANT_OPS in the ONNX domain; None when it is not constant."""
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
        scope = index.owner(source)
        tensor = scope.initializers.get(source) if scope is not None and source not in scope.overridable else None
        shape = list(tensor.dims) if tensor is not None else None  # folds keep shapes
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
        if value is None or not target_type:
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
        return np.full(tuple(int(d) for d in inputs[0]), fill.reshape(-1)[0], dtype=fill.dtype)
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
    if op == "Mul":
        return np.multiply(inputs[0], inputs[1])
    if op == "Sub":
        return np.subtract(inputs[0], inputs[1])
    if op == "Slice":
        return _slice(node, inputs)
    # Transpose, the last of CONSTANT_OPS (``_evaluate`` passes no other op; a test holds every
    # op of CONSTANT_OPS to ONNX Runtime): the TorchScript exporter's bias-less Linear, MatMul(x, Transpose(W))
    return np.transpose(inputs[0], attribute(node, "perm", None))


def _slice(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray:
    """Slice-1 (attributes) or Slice-10+ (inputs); ONNX clamps out-of-range bounds as Python slices do."""
    data = inputs[0]
    if len(inputs) > 1:
        starts, ends = inputs[1], inputs[2]
        axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
        steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    else:
        starts, ends = attribute(node, "starts", []), attribute(node, "ends", [])
        axes, steps = attribute(node, "axes", range(len(starts))), [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)].copy()


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Everything of ``model`` but its main graph's initializers (a subgraph keeps its own)."""
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


def opset_version(model: onnx.ModelProto) -> int:
    """The default (ai.onnx) domain's opset of the model."""
    return next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 1)


def remove_by_identity(nodes: list[onnx.NodeProto], node: onnx.NodeProto) -> None:
    for position, candidate in enumerate(nodes):
        if candidate is node:
            del nodes[position]
            return
