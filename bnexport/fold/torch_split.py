"""A BatchNorm after a concatenation or a sum of layers, in a traced module: the BN is split over the layers.

- ``torch.cat([layer_1(x), …, layer_k(x)], dim=1)`` → BN: layer i owns the channel range R_i of
  the concatenation and folds s[R_i], t[R_i] (``maths`` docstring, "After a Concat").
- ``layer_1(x) + … + layer_k(y)`` → BN (``+``, ``+=``, ``torch.add`` and ``Tensor.add`` without
  a scale, nested for more than two): every layer folds s, exactly one folds t ("After an Add").
  The operands may broadcast over the batch and spatial axes, as in ONNX, but must have one rank.

Each layer is a Conv, ConvTranspose or Linear (on a 2-D tensor) called at this one site and
feeding nothing but the concatenation or the sum, whose result feeds nothing but the BN.
Every condition is checked before the plan changes, so a refusal leaves no partial fold.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from .fold_report import FOLDED, FoldRecord
from .torch_graph import layer_kind

if TYPE_CHECKING:
    from .torch_patterns import ModuleFolder, Site

_CONCATS = (torch.cat, torch.concat, torch.concatenate)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclass
class Split:
    """A concatenation or a sum in front of a BN: its layer outputs, in input order, and the joining nodes."""

    through: str  # "Concat" or "Add"
    operands: list  # the nodes (or constants) concatenated or summed, in input order
    joins: list[fx.Node]  # the cat node, or every add node of a nested sum (outermost first)
    dim: object = 1  # the cat's dim, as written


def split_of(node) -> Split | None:
    """The concatenation or the sum ``node`` computes, or None when it is neither (or an unusual form of one)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _CONCATS:
        if set(node.kwargs) - {"tensors", "dim", "axis"} or len(node.args) > 2:
            return None
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        if not isinstance(tensors, (list, tuple)):
            return None
        return Split("Concat", list(tensors), [node], dim)
    if _is_add(node):
        operands, joins = [], []
        _flatten_add(node, operands, joins)
        return Split("Add", operands, joins)
    return None


def _is_add(node) -> bool:
    if not isinstance(node, fx.Node) or len(node.args) != 2:
        return False
    plain = not node.kwargs or dict(node.kwargs) == {"alpha": 1}  # alpha scales the second operand
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return plain
    return node.op == "call_method" and node.target in _ADD_METHODS and plain


def _flatten_add(node: fx.Node, operands: list, joins: list[fx.Node]) -> None:
    joins.append(node)
    for operand in node.args:
        if _is_add(operand):
            _flatten_add(operand, operands, joins)
        else:
            operands.append(operand)


def split_reason(folder: ModuleFolder, site: Site, split: Split) -> tuple[tuple[str, str] | None, list[tuple[fx.Node, nn.Module]]]:
    """(why the BN cannot be split over the layers, or None; the (node, layer) of each operand when it can)."""
    from .torch_patterns import _describe, _is_layer_call, _value_users, output_channels

    part, what = site.part, "concatenation" if split.through == "Concat" else "sum"
    outer, *inner = split.joins
    if len(_value_users(outer)) > 1:
        return ("multiple_consumers", f"the {what} before it also feeds something else"), []
    if any(len(join.users) > 1 for join in inner):
        return ("multiple_consumers", f"a partial {what} before it also feeds something else"), []
    branches: list[tuple[fx.Node, nn.Module]] = []
    for index, operand in enumerate(split.operands):
        node = folder._upstream(operand, part)
        layer = folder._layer(node, part)
        if layer is None:
            code = "unsupported_layer" if _is_layer_call(node, part) else "no_linear_neighbour"
            return (code, f"input {index} of the {what} before it comes from {_describe(node, part)}, "
                          f"not a Conv, ConvTranspose or Linear"), []
        name = f"{type(layer).__name__} '{part.full(node.target)}'"
        if any(node is seen for seen, _ in branches):
            return ("multiple_consumers", f"the {name}'s output enters the {what} more than once"), []
        if len(_value_users(node)) > 1:
            return ("multiple_consumers", f"the {name}'s output feeds more than the {what}"), []
        why = folder._layer_reason(layer)
        if why is not None:
            return why, []
        why = _rank_reason(folder, layer, name)
        if why is not None:
            return why, []
        branches.append((node, layer))
    channels = site.form.stats.num_features
    counts = [output_channels(layer) for _, layer in branches]
    if split.through == "Concat":
        why = _dim_reason(folder, split.dim, branches[0][1])
        if why is not None:
            return why, []
        if sum(counts) != channels:
            return ("shape_mismatch", f"the layers concatenated before it have {' + '.join(map(str, counts))} = "
                                      f"{sum(counts)} output channels, the BN {channels}"), []
        return None, branches
    if any(count != channels for count in counts):
        return ("shape_mismatch", f"the layers summed before it have {', '.join(map(str, counts))} output channels, "
                                  f"the BN {channels}"), []
    if folder.example is None:
        return ("shape_mismatch", "a sum of layers folds only when their channel axes line up; pass example_input "
                                  "so the shapes are known"), []
    # broadcasting over batch or spatial axes keeps the fold exact (s and t do not vary along them);
    # operands of different ranks are aligned from the right, which puts their channels on different axes
    shapes = [folder._observe().shapes.get(id(layer)) for _, layer in branches]
    if any(shape is None for shape in shapes) or len({len(shape) for shape in shapes}) > 1:
        return ("shape_mismatch", "the layers summed before it have outputs of shapes "
                                  f"{', '.join(str(list(s)) if s is not None else '?' for s in shapes)}: "
                                  "their channels are not on one axis, so it is not the sum of the layers' folds"), []
    return None, branches


def _rank_reason(folder: ModuleFolder, layer: nn.Module, name: str) -> tuple[str, str] | None:
    """A Linear mixes the last axis, the BN normalises axis 1: the two agree on 2-D tensors only; a conv
    on unbatched input has its channels on axis 0."""
    rank = folder._rank(layer, 1)
    if layer_kind(layer) == "linear":
        if rank is None:
            return "shape_mismatch", f"the {name} folds a BN only on 2-D input; pass example_input so the shapes are known"
        if rank != 2:
            return "shape_mismatch", f"the {name} runs on {rank}-D input: BN normalises axis 1, the Linear's features are the last axis"
    elif rank is not None and rank != layer.weight.dim():
        return "shape_mismatch", f"the {name} runs on unbatched input: its channels are not axis 1"
    return None


def _dim_reason(folder: ModuleFolder, dim, first: nn.Module) -> tuple[str, str] | None:
    if not isinstance(dim, int) or isinstance(dim, bool):
        return "shape_mismatch", "the concatenation before it has a computed dim"
    if dim < 0:
        rank = folder._rank(first, 1)
        if rank is None:
            return "shape_mismatch", (f"the concatenation before it is along dim {dim}; pass example_input so the "
                                      f"rank, and so the axis, is known")
        dim += rank
    if dim != 1:
        return "shape_mismatch", f"the concatenation before it is along axis {dim}, not the channel axis 1"
    return None


def fold_split(folder: ModuleFolder, site: Site, split: Split, branches: list[tuple[fx.Node, nn.Module]]) -> FoldRecord:
    """Fold the BN into every layer of ``split`` (``split_reason`` found nothing against it)."""
    from .torch_patterns import _kept, bn_scale_shift_of, output_channels

    if site.owner is not None and not folder._remove_call(site):
        return _kept(site, "untraceable", folder._owner_graphs[site.owner])
    scale, shift = bn_scale_shift_of(site.form.stats, name=site.label)
    paths = [site.part.full(node.target) for node, _ in branches]
    start = 0
    for index, (path, (_, layer)) in enumerate(zip(paths, branches)):
        if split.through == "Concat":
            stop = start + output_channels(layer)
            folder._pending(path, layer).after(scale[start:stop], shift[start:stop])
            start = stop
        else:  # every layer scales; only the first adds the shift, so the sum gets it once
            folder._pending(path, layer).after(scale, shift if index == 0 else torch.zeros_like(shift))
        folder.plan.equivalent[path] = None  # a layer's output is now a slice or a summand of the BN's
    if site.form.remainder is None:
        site.node.replace_all_uses_with(site.input)
        site.part.graph.erase_node(site.node)
    if site.module is not None:
        folder.plan.removed[site.label] = site.form
    return FoldRecord(site.label, FOLDED, folded_into=paths[0], position="after", split_over=paths, through=split.through)
