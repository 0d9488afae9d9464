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

A graph too big to draw whole within ``MAX_FIGURE_PX`` (a ResNet-50 or a DenseNet) is
summarised instead: each BatchNormalization's neighbourhood (the node that feeds it and the
nodes it feeds) before the fold, and what took its place after it, grouped into patterns
with a count each, and the op counts of both graphs for everything else.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Patch

from ..fold.onnx_patterns import ABSORBED_PREFIX
from .common import PNG_DPI, new_figure, save_figure

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
MAX_FIGURE_PX = 4000  # a whole graph taller or wider than this at PNG_DPI is summarised instead
MAX_PATTERNS = 12  # neighbourhood patterns drawn; the rarer ones are counted in one line


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
            quoted = re.fullmatch(r"\s*'(.*)'(.*)", line[len(ABSORBED_PREFIX):])  # "'name'" or "'name' (weight)"
            names.append(quoted.group(1) if quoted else line[len(ABSORBED_PREFIX):].strip())
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
                        names: tuple[str, str] = ("model.onnx", "model.folded.onnx"),
                        drawings: list[GraphDrawing] | None = None) -> tuple[Path, list[GraphDrawing]]:
    """Both graphs side by side at the same scale; returns the file and the two drawings."""
    drawings = drawings or [graph_drawing(before), graph_drawing(after)]
    layers = max(d.layers for d in drawings)
    widths = [max(node.x for node in d.nodes.values()) - min(node.x for node in d.nodes.values()) + 1.5 for d in drawings]
    height, width = _figure_inches(drawings)
    figure = new_figure(width, height)
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


def fits_whole(drawings: list[GraphDrawing]) -> bool:
    """Whether ``plot_folding_graphs`` would stay within MAX_FIGURE_PX in both directions."""
    height, width = _figure_inches(drawings)
    return max(height, width) * PNG_DPI <= MAX_FIGURE_PX


def _figure_inches(drawings: list[GraphDrawing]) -> tuple[float, float]:
    layers = max(d.layers for d in drawings)
    widths = [max(node.x for node in d.nodes.values()) - min(node.x for node in d.nodes.values()) + 1.5 for d in drawings]
    return Y_SPACING_IN * layers + 2.0, max(11.0, X_SPACING_IN * sum(widths) + 1.0)


# A big graph: each BatchNormalization's neighbourhood, grouped --------------------------

Step = tuple[tuple[str, str], ...]  # the nodes at one position of a chain, stacked: (label, role) each


@dataclass
class Neighbourhood:
    """BatchNormalizations that sit between the same kinds of node, and what the fold made of them."""

    before: tuple[Step, ...]  # producer → BatchNormalization → consumers
    after: tuple[Step, ...]  # e.g. Conv ⊕ BN → consumers; or the same chain when the BN was kept
    status: str  # "folded", "kept", or "gone" (no trace of it in the second graph)
    names: list[str] = field(default_factory=list)  # the BatchNormalizations, in graph order (``_readable_name``)

    @property
    def count(self) -> int:
        return len(self.names)


class _Index:
    """Who produces and who reads each tensor of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        initializers = {t.name for t in graph.initializer}
        self.inputs = {i.name for i in graph.input} - initializers
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in dict.fromkeys(node.input):
                if name:
                    self.readers.setdefault(name, []).append(node)

    def source(self, tensor: str) -> Step:
        if tensor in self.producer:
            return ((_short_label(self.producer[tensor]), _role(self.producer[tensor])),)
        return (("input", IO),) if tensor in self.inputs else (("constant", OP),)

    def sinks(self, tensor: str) -> Step:
        counts = Counter(_short_label(node) for node in self.readers.get(tensor, []))
        roles = {_short_label(node): _role(node) for node in self.readers.get(tensor, [])}
        step = tuple((label if n == 1 else f"{label} ×{n}", roles[label]) for label, n in sorted(counts.items()))
        if tensor in self.outputs:
            step += (("output", IO),)
        if len(step) > 3:  # three stacked boxes fill a row
            step = step[:2] + ((f"+{len(step) - 2} more", OP),)
        return step or (("(unused)", OP),)


def _role(node: onnx.NodeProto) -> str:
    return BN if node.op_type == "BatchNormalization" else ABSORBED if absorbed_batchnorms(node) else OP


def _short_label(node: onnx.NodeProto) -> str:
    absorbed = absorbed_batchnorms(node)
    if not absorbed:
        return node.op_type
    return f"{node.op_type} ⊕ BN" if len(absorbed) == 1 else f"{node.op_type} ⊕ {len(absorbed)} BN"


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"  # as the fold names it in fold.json


def _readable_name(bn: onnx.NodeProto) -> str:
    """The module a BatchNormalization came from where its scale is named after it (``layer1.0.bn1.weight``),
    else its node name."""
    scale = bn.input[1] if len(bn.input) > 1 else ""
    return scale.removesuffix(".weight") if scale.endswith(".weight") else _node_name(bn)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def bn_neighbourhoods(before: onnx.ModelProto, after: onnx.ModelProto) -> list[Neighbourhood]:
    """Every BatchNormalization of ``before``'s main graph, grouped by its neighbourhood, commonest first."""
    old, new = _Index(before.graph), _Index(after.graph)
    absorber: dict[str, onnx.NodeProto] = {}
    survivors: dict[str, onnx.NodeProto] = {}
    for node in after.graph.node:
        for name in absorbed_batchnorms(node):
            absorber.setdefault(name, node)
        if node.op_type == "BatchNormalization":
            survivors[_node_name(node)] = node
    groups: dict[tuple, Neighbourhood] = {}
    for node in before.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        name = _node_name(node)
        chain = (old.source(node.input[0]), (("BatchNormalization", BN),), old.sinks(node.output[0]))
        if name in absorber:
            layer = absorber[name]
            step = ((_short_label(layer), ABSORBED),)
            producer = old.producer.get(node.input[0])
            if producer is not None and _node_name(producer) == _node_name(layer):  # layer → BN: BN after the layer
                after_chain, status = (step, new.sinks(layer.output[0])), "folded"
            elif any(_node_name(reader) == _node_name(layer) for reader in old.readers.get(node.output[0], [])):
                after_chain, status = (new.source(layer.input[0]), step), "folded"  # BN → layer: before it
            else:
                after_chain, status = (new.source(layer.input[0]), step, new.sinks(layer.output[0])), "folded"
        elif name in survivors:
            kept = survivors[name]
            after_chain, status = (new.source(kept.input[0]), (("BatchNormalization", BN),),
                                   new.sinks(kept.output[0])), "kept"
        else:
            after_chain, status = ((("not in the folded graph", OP),),), "gone"
        key = (chain, after_chain, status)
        groups.setdefault(key, Neighbourhood(chain, after_chain, status)).names.append(_readable_name(node))
    return sorted(groups.values(), key=lambda group: -group.count)


def _op_count_line(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    old = Counter(node.op_type for node in before.graph.node)
    new = Counter(node.op_type for node in after.graph.node)
    ops = sorted(set(old) | set(new), key=lambda op: (-max(old[op], new[op]), op))
    return " · ".join(f"{op} {old[op]}" + (f" → {new[op]}" if new[op] != old[op] else "") for op in ops)


def _draw_chain(axes, chain: tuple[Step, ...], *, x0: float, y: float, spacing: float, box: float) -> None:
    """Left to right, one column per step; the nodes of a step stacked about ``y``, an arrow from each node to the next."""
    height = 0.26
    previous: list[float] = []
    for index, step in enumerate(chain):
        x = x0 + index * spacing
        ys = [y + (len(step) - 1) * height * 0.62 - k * height * 1.24 for k in range(len(step))]
        for (label, role), yy in zip(step, ys):
            axes.add_patch(FancyBboxPatch((x - box / 2, yy - height / 2), box, height,
                                          boxstyle="round,pad=0,rounding_size=0.06", facecolor=ROLE_COLORS[role],
                                          edgecolor=ROLE_EDGES[role], linewidth=1.4 if role in (BN, ABSORBED) else 0.8))
            axes.text(x, yy, label, ha="center", va="center", fontsize=7.5,
                      fontweight="bold" if role in (BN, ABSORBED) else "normal")
            for py in previous:
                axes.annotate("", xy=(x - box / 2, yy), xytext=(x - spacing + box / 2, py),
                              arrowprops=dict(arrowstyle="-|>", color="#555555", linewidth=0.8, shrinkA=0, shrinkB=0))
        previous = ys


def plot_folding_summary(before: onnx.ModelProto, after: onnx.ModelProto, path: str | Path, *,
                         names: tuple[str, str] = ("model.onnx", "model.folded.onnx")
                         ) -> tuple[Path, list[Neighbourhood]]:
    """Each BatchNormalization's neighbourhood before the fold and after it, one row per pattern, with counts."""
    groups = bn_neighbourhoods(before, after)
    shown, rest = groups[:MAX_PATTERNS], groups[MAX_PATTERNS:]
    rows = max(1, len(shown)) + (1 if rest else 0)
    counts = _op_count_line(before, after)
    wrapped = textwrap.fill(f"Op counts, {names[0]} → {names[1]} (one number: unchanged): {counts}", 170)
    text_rows = 0.35 * (wrapped.count("\n") + 1)  # the op counts, in row units
    figure = new_figure(14, 0.9 * (rows + text_rows) + 2.2)
    axes = figure.add_subplot()
    axes.set_xlim(0, 14)
    axes.set_ylim(rows - 0.5 + text_rows, -0.9)
    axes.set_axis_off()
    total = sum(group.count for group in groups)
    folded = sum(group.count for group in groups if group.status == "folded")
    figure.suptitle(f"The ONNX graph before and after BatchNorm folding: {total} BatchNormalization, {folded} folded, "
                    f"{total - folded} left\n{len(before.graph.node)} nodes in {names[0]}, {len(after.graph.node)} in "
                    f"{names[1]}; too big to draw whole, so each BatchNorm's neighbourhood, grouped")
    axes.text(0.1, -0.65, "BatchNorms with this neighbourhood", fontsize=9, fontweight="bold")
    axes.text(3.8, -0.65, f"{names[0]}: producer → BatchNorm → consumers", fontsize=9, fontweight="bold")
    axes.text(9.0, -0.65, f"{names[1]}: what took its place", fontsize=9, fontweight="bold")
    for row, group in enumerate(shown):
        examples = [_shorten(group.names[0], 40)] + ([f"… {_shorten(group.names[-1], 38)}"] if group.count > 1 else [])
        axes.text(0.1, row, f"× {group.count} {group.status}\n" + "\n".join(examples), fontsize=7.5, va="center")
        _draw_chain(axes, group.before, x0=4.6, y=row, spacing=1.7, box=1.45)
        _draw_chain(axes, group.after, x0=9.8, y=row, spacing=1.7, box=1.45)
        axes.axhline(row + 0.5, color="#dddddd", linewidth=0.6)
    if not groups:
        axes.text(7, 0, f"{names[0]} has no BatchNormalization: nothing to fold.", ha="center", va="center")
    if rest:
        axes.text(0.1, len(shown), f"+ {len(rest)} rarer patterns: {sum(g.count for g in rest)} BatchNorms, "
                                   f"{sum(g.count for g in rest if g.status == 'folded')} of them folded",
                  fontsize=8, va="center")
    axes.text(0.1, rows - 0.45, wrapped, fontsize=7.5, va="top")
    legend = [Patch(facecolor=ROLE_COLORS[BN], edgecolor=ROLE_EDGES[BN], label="BatchNormalization"),
              Patch(facecolor=ROLE_COLORS[ABSORBED], edgecolor=ROLE_EDGES[ABSORBED], label="absorbed a BatchNorm (⊕ BN)"),
              Patch(facecolor=ROLE_COLORS[OP], edgecolor=ROLE_EDGES[OP], label="other operator"),
              Patch(facecolor=ROLE_COLORS[IO], edgecolor=ROLE_EDGES[IO], label="graph input / output")]
    figure.legend(handles=legend, loc="outside lower center", ncols=4)
    return save_figure(figure, path), groups


def plot_folding_figure(before: onnx.ModelProto, after: onnx.ModelProto, path: str | Path, *,
                        names: tuple[str, str] = ("model.onnx", "model.folded.onnx"),
                        drawings: list[GraphDrawing] | None = None) -> tuple[Path, bool]:
    """The whole graphs side by side when they fit MAX_FIGURE_PX, the neighbourhood summary otherwise;
    returns the file and whether the graphs were drawn whole."""
    drawings = drawings or [graph_drawing(before), graph_drawing(after)]
    if fits_whole(drawings):
        return plot_folding_graphs(before, after, path, names=names, drawings=drawings)[0], True
    return plot_folding_summary(before, after, path, names=names)[0], False
