"""What an ONNX model holds: op counts, opset, inputs and outputs, parameters, and each
BatchNormalization with its neighbours and whether bnexport can fold it. The data behind
``python -m bnexport inspect``.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import BnexportError
from ..fold.fold_report import describe_decision
from ..fold.onnx_graph import GraphIndex, node_label
from ..fold.onnx_names import ModuleNamer
from ..fold.onnx_patterns import fold_graph
from ..tables import format_table


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list  # ints for fixed dims, names (str) for dynamic ones, None when unknown


@dataclass
class BatchNormInfo:
    name: str
    input_from: str  # "OpType name" of the node that feeds it, or "graph input"
    output_to: list[str]  # the nodes that read its output
    foldable: bool
    detail: str  # the layer it folds into, or why it stays
    module: str | None = None  # the torch module it was exported from, where the exporter recorded it


@dataclass
class OnnxInfo:
    ir_version: int
    opsets: dict[str, int]
    producer: str
    op_counts: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    parameters: int  # elements in initializers of floating-point type
    initializer_bytes: int
    batchnorms: list[BatchNormInfo] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in self.opsets.items())
        lines = [f"opset {opsets}; IR {self.ir_version}; "
                 f"producer {self.producer or 'unknown'}",
                 f"parameters {self.parameters:,} ({self.initializer_bytes / 2**20:.2f} MiB of initializers)", ""]
        rows = [("", "name", "dtype", "shape")]
        rows += [("input", t.name, t.dtype, _shape_text(t.shape)) for t in self.inputs]
        rows += [("output", t.name, t.dtype, _shape_text(t.shape)) for t in self.outputs]
        lines += [format_table(rows), ""]
        rows = [("op", "count")] + sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines += [format_table(rows), ""]
        if self.batchnorms:
            modules = any(b.module for b in self.batchnorms)
            rows = [("BatchNormalization",) + (("module",) if modules else ()) +
                    ("input from", "output to", "foldable", "into / why not")]
            rows += [(b.name,) + ((b.module or "",) if modules else ()) +
                     (b.input_from, ", ".join(b.output_to) or "graph output", "yes" if b.foldable else "no", b.detail)
                     for b in self.batchnorms]
            folded = sum(b.foldable for b in self.batchnorms)
            lines += [format_table(rows), f"{folded} of {len(self.batchnorms)} BatchNormalization foldable"]
        else:
            lines.append("no BatchNormalization nodes")
        return "\n".join(lines)


def _shape_text(shape: list | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower() if tensor_type.elem_type else "unknown"
    shape = None
    if tensor_type.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return TensorInfo(value.name, dtype, shape)


def describe_onnx(model: onnx.ModelProto) -> OnnxInfo:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    info = OnnxInfo(
        ir_version=model.ir_version,
        opsets={o.domain: o.version for o in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        op_counts=dict(collections.Counter(node.op_type for node in graph.node)),
        inputs=[_tensor_info(i) for i in graph.input if i.name not in initializers],
        outputs=[_tensor_info(o) for o in graph.output],
        parameters=sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in float_types),
        initializer_bytes=sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                              for t in graph.initializer),
    )
    info.batchnorms = _batchnorms(model)
    return info


def _batchnorms(model: onnx.ModelProto) -> list[BatchNormInfo]:
    index = GraphIndex(model)
    problem = "not analysed"
    try:
        _, report = fold_graph(model)
        decisions = {r.batchnorm: (r.status == "folded", describe_decision(asdict(r))) for r in report.records}
        modules = {r.batchnorm: r.module for r in report.records}
    except BnexportError as err:  # invalid statistics: report the cause on every BN rather than fail the listing
        decisions = {}
        modules = {}
        problem = str(err)
    names = ModuleNamer(model.graph)
    result = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        label = node_label(node)
        producer = index.producer.get(node.input[0])
        readers = index.readers.get(node.output[0], [])
        foldable, detail = decisions.pop(label, (False, problem))
        result.append(BatchNormInfo(
            name=label,
            input_from=f"{producer.op_type} {node_label(producer)}" if producer else "graph input",
            output_to=[f"{r.op_type} {node_label(r)}" for r in readers],
            foldable=foldable,
            detail=detail or "",
            module=names.path(node),
        ))
    # BNs in If/Loop/Scan bodies and model-local functions: the fold reports them, the main graph does not hold them
    for label, (foldable, detail) in decisions.items():
        result.append(BatchNormInfo(name=label, input_from="(subgraph or function)", output_to=[],
                                    foldable=foldable, detail=detail or "", module=modules.get(label)))
    return result
