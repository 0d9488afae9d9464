"""An ONNX graph before and after BatchNorm folding, side by side.

The graph is drawn top to bottom in layers (a node's layer is the longest path from the
input), with matplotlib alone: no Graphviz, no browser. Only the data path is drawn. The
exporter also writes nodes that only compute shapes and constants (the Shape → Concat
→ Reshape chain of ``flatten``, the Expand → CastLike zero bias of a bias-free conv);
they are counted in the subtitle rather than drawn, so a ResNet-18 still reads as a
ResNet-18.

In the first graph each BatchNormalization is highlighted. In the second, each node whose
``doc_string`` says it absorbed a BatchNormalization (bnexport's ONNX fold writes this)
is marked, and any BatchNormalization that survived the fold is highlighted too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Patch

from ..fold.onnx_patterns import ABSORBED_PREFIX
from .common import new_figure, save_figure

# Input slots that carry a shape or a type, not data: what flows only through them is not drawn.
SHAPE_SLOTS = {
    "CastLike": {1}, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Unsqueeze": {1}, "Squeeze": {1},
    "Slice": {1, 2, 3, 4}, "Pad": {1, 2}, "Resize": {1, 2, 3}, "Upsample": {1}, "ReduceMean": {1},
    "ReduceSum": {1}, "ReduceMax": {1}, "TopK": {1}, "Split": {1}, "ConstantOfShape": {0},
}
SHAPE_OPS = {"Shape", "Size"}  # their output describes a tensor, it is not the tensor

BN, ABSORBED, OP, IO = "batchnorm", "absorbed", "op", "io"
ROLE_COLORS = {BN: "#f4a6a6", ABSORBED: "#9fd8a4", OP: "#ffffff", IO: "#cfe0f5"}
ROLE_EDGES = {BN: "#b22222", ABSORBED: "#1e7b34", OP: "#555555", IO: "#3a6ea5"}
X_SPACING_IN, Y_SPACING_IN = 2.0, 0.36  # inches between node centres
BOX_WIDTH, BOX_HEIGHT = 0.82, 0.62  # as fractions of the spacings


@dataclass
class DrawnNode:
    key: str
    label: str
    role: str
    absorbed: list[str] = field(default_factory=list)  # BatchNormalization names this node absorbed
    layer: int = 0
    x: float = 0.0


@dataclass
class GraphDrawing:
    """What gets drawn: the data-path nodes with their layer and position, the edges, and what was hidden."""

    nodes: dict[str, DrawnNode]
    edges: list[tuple[str, str]]
    hidden_shape_nodes: int

    def count(self, role: str) -> int:
        return sum(node.role == role for node in self.nodes.values())

    @property
    def layers(self) -> int:
        return 1 + max((node.layer for node in self.nodes.values()), default=0)

    @property
    def width(self) -> int:
        per_layer: dict[int, int] = {}
        for node in self.nodes.values():
            per_layer[node.layer] = per_layer.get(node.layer, 0) + 1
        return max(per_layer.values(), default=1)


def absorbed_batchnorms(node: onnx.NodeProto) -> list[str]:
    """The BatchNormalization names recorded in a node's doc_string by bnexport's fold."""
    names = []
    for line in node.doc_string.splitlines():
        if line.startswith(ABSORBED_PREFIX):
            names.append(line[len(ABSORBED_PREFIX):].strip().strip("'"))
    return names


def _label(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> str:
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers:
        dims = "×".join(str(d) for d in initializers[node.input[1]].dims)
        return f"{node.op_type} {dims}"
    return node.op_type


def graph_drawing(model: onnx.ModelProto) -> GraphDrawing:
    """The data path of ``model``'s main graph, laid out in layers."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    data: dict[str, str] = {}  # data tensor → the drawn node that produces it
    nodes: dict[str, DrawnNode] = {}
    edges: list[tuple[str, str]] = []
    for graph_input in graph.input:
        if graph_input.name not in initializers:
            key = f"input:{graph_input.name}"
            nodes[key] = DrawnNode(key, f"input {graph_input.name}", IO)
            data[graph_input.name] = key
    hidden = 0
    for index, node in enumerate(graph.node):
        shape_slots = SHAPE_SLOTS.get(node.op_type, set())
        sources = [data[name] for slot, name in enumerate(node.input) if name in data and slot not in shape_slots]
        if node.op_type in SHAPE_OPS or not sources:
            hidden += 1
            continue
        key = f"node:{index}"
        absorbed = absorbed_batchnorms(node)
        role = BN if node.op_type == "BatchNormalization" else ABSORBED if absorbed else OP
        label = _label(node, initializers)
        if absorbed:
            label = f"{label} ⊕ BN" if len(absorbed) == 1 else f"{label} ⊕ {len(absorbed)} BN"
        nodes[key] = DrawnNode(key, label, role, absorbed)
        edges.extend((source, key) for source in dict.fromkeys(sources))
        for name in node.output:
            if name:
                data[name] = key
    for graph_output in graph.output:
        if graph_output.name in data:
            key = f"output:{graph_output.name}"
            nodes[key] = DrawnNode(key, f"output {graph_output.name}", IO)
            edges.append((data[graph_output.name], key))
    drawing = GraphDrawing(nodes, edges, hidden)
    _layout(drawing)
    return drawing


def _layout(drawing: GraphDrawing) -> None:
    """Longest-path layers; within a layer, nodes ordered by where their inputs sit."""
    dag = nx.DiGraph()
    dag.add_nodes_from(drawing.nodes)
    dag.add_edges_from(drawing.edges)
    for key in nx.topological_sort(dag):
        parents = list(dag.predecessors(key))
        drawing.nodes[key].layer = 1 + max((drawing.nodes[p].layer for p in parents), default=-1)
    layers: dict[int, list[str]] = {}
    for key in nx.topological_sort(dag):
        layers.setdefault(drawing.nodes[key].layer, []).append(key)
    for layer in sorted(layers):
        keys = layers[layer]
        def centre(key: str) -> float:
            parents = list(dag.predecessors(key))
            return float(np.mean([drawing.nodes[p].x for p in parents])) if parents else 0.0
        keys.sort(key=centre)
        wanted = [centre(k) for k in keys]
        # start at the parents' centre, then push apart so boxes never overlap
        positions = list(np.round(wanted, 6))
        for i in range(1, len(positions)):
            positions[i] = max(positions[i], positions[i - 1] + 1.0)
        shift = (np.mean(wanted) - np.mean(positions)) if len(keys) > 1 else 0.0
        for key, x in zip(keys, positions):
            drawing.nodes[key].x = float(x + shift)


def _draw(axes, drawing: GraphDrawing, *, layers: int) -> int:
    """Draw ``drawing`` on ``axes``; return how many edges were routed around boxes (skip connections)."""
    xs = [node.x for node in drawing.nodes.values()]
    low, high = min(xs) - 0.6, max(xs) + 0.9
    axes.set_xlim(low, high)
    axes.set_ylim(-layers + 0.4, 0.6)
    axes.set_axis_off()
    by_layer: dict[int, list[DrawnNode]] = {}
    for node in drawing.nodes.values():
        by_layer.setdefault(node.layer, []).append(node)
    skips = 0
    for source, target in drawing.edges:
        a, b = drawing.nodes[source], drawing.nodes[target]
        y0, y1 = -a.layer - BOX_HEIGHT / 2, -b.layer + BOX_HEIGHT / 2
        blocked = any(abs(n.x - a.x) < 0.5 for layer in range(a.layer + 1, b.layer) for n in by_layer.get(layer, []))
        if blocked:  # a skip connection: route it around the boxes it would cross
            skips += 1
            side = max(n.x for layer in range(a.layer + 1, b.layer) for n in by_layer.get(layer, [])) + 0.62
            points = [(a.x + BOX_WIDTH / 2, -a.layer), (side, -a.layer - 0.5), (side, -b.layer + 0.5),
                      (b.x + BOX_WIDTH / 2 * 0.6, y1 - 0.02)]
            axes.plot(*zip(*points[:-1]), color="#777777", linewidth=0.8, zorder=1)
            axes.annotate("", xy=points[-1], xytext=points[-2],
                          arrowprops=dict(arrowstyle="-|>", color="#777777", linewidth=0.8, shrinkA=0, shrinkB=0))
        else:
            axes.annotate("", xy=(b.x, y1), xytext=(a.x, y0),
                          arrowprops=dict(arrowstyle="-|>", color="#555555", linewidth=0.8, shrinkA=0, shrinkB=0))
    for node in drawing.nodes.values():
        box = FancyBboxPatch((node.x - BOX_WIDTH / 2, -node.layer - BOX_HEIGHT / 2), BOX_WIDTH, BOX_HEIGHT,
                             boxstyle="round,pad=0,rounding_size=0.12", facecolor=ROLE_COLORS[node.role],
                             edgecolor=ROLE_EDGES[node.role], linewidth=1.6 if node.role in (BN, ABSORBED) else 0.8,
                             zorder=2)
        axes.add_patch(box)
        axes.text(node.x, -node.layer, node.label, ha="center", va="center", fontsize=7, zorder=3,
                  fontweight="bold" if node.role in (BN, ABSORBED) else "normal")
    return skips


def plot_folding_graphs(before: onnx.ModelProto, after: onnx.ModelProto, path: str | Path, *,
                        names: tuple[str, str] = ("model.onnx", "model.folded.onnx")) -> tuple[Path, list[GraphDrawing]]:
    """Both graphs side by side at the same scale; returns the file and the two drawings."""
    drawings = [graph_drawing(before), graph_drawing(after)]
    layers = max(d.layers for d in drawings)
    widths = [max(node.x for node in d.nodes.values()) - min(node.x for node in d.nodes.values()) + 1.5 for d in drawings]
    figure = new_figure(max(11.0, X_SPACING_IN * sum(widths) + 1.0), Y_SPACING_IN * layers + 2.0)
    grid = figure.subplots(1, 2, width_ratios=widths)
    subtitles = [
        f"{names[0]}: {drawings[0].count(BN)} BatchNormalization (red)",
        f"{names[1]}: {drawings[1].count(ABSORBED)} absorbed a BatchNorm (green)"
        + (f", {drawings[1].count(BN)} BatchNorm left" if drawings[1].count(BN) else ""),
    ]
    skips = 0
    for axes, drawing, subtitle in zip(grid, drawings, subtitles):
        skips += _draw(axes, drawing, layers=layers)
        axes.set_title(f"{subtitle}\n{len(drawing.nodes)} nodes drawn; {drawing.hidden_shape_nodes} shape/constant "
                       f"nodes not drawn", fontsize=9)
    figure.suptitle("The ONNX graph before and after BatchNorm folding")
    legend = [Patch(facecolor=ROLE_COLORS[BN], edgecolor=ROLE_EDGES[BN], label="BatchNormalization"),
              Patch(facecolor=ROLE_COLORS[ABSORBED], edgecolor=ROLE_EDGES[ABSORBED], label="absorbed a BatchNorm (⊕ BN)"),
              Patch(facecolor=ROLE_COLORS[OP], edgecolor=ROLE_EDGES[OP], label="other operator"),
              Patch(facecolor=ROLE_COLORS[IO], edgecolor=ROLE_EDGES[IO], label="graph input / output")]
    if skips:
        legend.append(Line2D([], [], color="#777777", label="skip connection"))
    figure.legend(handles=legend, loc="outside lower center", ncols=3)
    return save_figure(figure, path), drawings
