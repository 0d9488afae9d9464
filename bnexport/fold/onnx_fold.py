"""Fold BatchNormalization into the Conv node before it, in an ONNX graph.

The graph is rewritten in place on a copy: the Conv takes the folded weight and bias and
the BN's output name, the BN node is removed, and initializers nothing reads any more are
dropped. Node names are kept, so the folded graph reads the same in Netron, and the Conv
records in its ``doc_string`` which BatchNormalization it absorbed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .maths import bn_scale_shift, fold_into_output_channels
from .report import FOLDED, KEPT, FoldRecord, FoldReport

ABSORBED_PREFIX = "bnexport: absorbed BatchNormalization"


class GraphIndex:
    """Who produces and who reads each tensor, and which tensors are constant."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def use_count(self, name: str) -> int:
        return len(self.readers.get(name, [])) + (name in self.graph_outputs)


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _bn_parameters(index: GraphIndex, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) in float64 for a foldable BN, or the reason it cannot be folded."""
    if attribute(bn, "training_mode", 0):
        return "training_mode=1: uses batch statistics"
    if len([o for o in bn.output[1:] if o]) > 0:
        return "outputs running statistics (training graph)"
    values = [index.constant(name) for name in bn.input[1:5]]
    if any(v is None for v in values):
        return "scale, bias, mean or variance is not a constant"
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    return bn_scale_shift(gamma, beta, mean, var, float(attribute(bn, "epsilon", 1e-5)))


def _set_initializer(model: onnx.ModelProto, index: GraphIndex, name: str, value: np.ndarray, *, owner: onnx.NodeProto) -> str:
    """Store ``value`` for ``owner``: overwrite ``name`` when only ``owner`` reads it, else add a copy."""
    graph = model.graph
    if name and name in index.initializers and index.use_count(name) == 1:
        graph.initializer.remove(index.initializers[name])
        new_name = name
    else:
        base = f"{name or owner.output[0]}_bnfolded"
        new_name, counter = base, 0
        while new_name in index.initializers or new_name in index.producer:
            counter += 1
            new_name = f"{base}_{counter}"
    tensor = numpy_helper.from_array(value, name=new_name)
    graph.initializer.append(tensor)
    index.initializers[new_name] = tensor
    return new_name


def _fold_pair(model: onnx.ModelProto, index: GraphIndex, conv: onnx.NodeProto, bn: onnx.NodeProto, scale, shift) -> None:
    weight = index.constant(conv.input[1])
    bias_name = conv.input[2] if len(conv.input) > 2 else ""
    bias = index.constant(bias_name) if bias_name else None
    new_weight, new_bias = fold_into_output_channels(
        weight.astype(np.float64), None if bias is None else bias.astype(np.float64), scale, shift
    )
    weight_name = _set_initializer(model, index, conv.input[1], new_weight.astype(weight.dtype), owner=conv)
    bias_name = _set_initializer(model, index, bias_name, new_bias.astype(weight.dtype), owner=conv)
    conv.input[1] = weight_name
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)
    _drop_value_info(model.graph, conv.output[0])
    conv.output[0] = bn.output[0]
    note = f"{ABSORBED_PREFIX} '{node_label(bn)}'"
    conv.doc_string = f"{conv.doc_string}\n{note}".strip() if conv.doc_string else note
    model.graph.node.remove(bn)


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for info in list(graph.value_info):
        if info.name == name:
            graph.value_info.remove(info)


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers and Constant nodes that nothing reads any more."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    removed = set()
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
        removed.add(tensor.name)
    for graph_input in [i for i in graph.input if i.name in removed]:  # IR < 4 lists initializers as inputs
        graph.input.remove(graph_input)
    for node in [n for n in graph.node if n.op_type == "Constant" and not any(o in used for o in n.output)]:
        graph.node.remove(node)


def fold_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every Conv→BatchNormalization pair that folds exactly; return (copy, report)."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    report = FoldReport(source="onnx")
    for bn in [n for n in folded.graph.node if n.op_type == "BatchNormalization"]:
        index = GraphIndex(folded.graph)  # rebuilt per BN: each fold rewires the graph
        label = node_label(bn)
        conv = index.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv":
            report.records.append(FoldRecord(label, KEPT, reason="no Conv directly before it"))
            continue
        if index.use_count(conv.output[0]) > 1:
            report.records.append(FoldRecord(label, KEPT, reason="the Conv's output feeds more than the BN"))
            continue
        if index.constant(conv.input[1]) is None or (len(conv.input) > 2 and conv.input[2] and index.constant(conv.input[2]) is None):
            report.records.append(FoldRecord(label, KEPT, reason="the Conv's weight or bias is not a constant"))
            continue
        parameters = _bn_parameters(index, bn)
        if isinstance(parameters, str):
            report.records.append(FoldRecord(label, KEPT, reason=parameters))
            continue
        _fold_pair(folded, index, conv, bn, *parameters)
        report.records.append(FoldRecord(label, FOLDED, folded_into=node_label(conv)))
    remove_unused_initializers(folded)
    return folded, report
