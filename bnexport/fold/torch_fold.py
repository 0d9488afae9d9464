"""Fold BatchNorm into a neighbouring linear layer, in any traceable ``nn.Module``.

The module is traced with ``torch.fx``; each BatchNorm call site is matched against the
node that feeds it and the node it feeds. Patterns, each exact in eval mode:

- Conv1/2/3d, ConvTranspose1/2/3d or Linear → BN: the BN scales the layer's output channels.
- BN → Conv1/2/3d without zero padding, BN → Linear: the BN is folded into the layer after it.

A pair is folded only when the result is exact: the layer's output feeds nothing but the
BN (or the BN's output nothing but the layer), the BN uses running statistics, and for
Linear the tensor is 2-D (BatchNorm1d normalises axis 1, Linear mixes the last axis; the
shapes come from ``example_input``). A layer module called at several sites gets its own
folded copy per site; ``torch.fx``'s own ``fuse`` writes one site's fold into the shared
module and silently breaks the others.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..errors import BnexportError, first_line
from ..model import BN_TYPES
from .maths import (bn_scale_shift, fold_into_input_channels, fold_into_output_channels, fold_into_transposed_conv,
                    invalid_statistics)
from .report import FOLDED, KEPT, FoldRecord, FoldReport

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear,)
LAYER_TYPES = CONV_TYPES + TRANSPOSED_TYPES + LINEAR_TYPES

# GraphModule.meta key: folded node name → the original node whose output it now computes.
EQUIVALENT_NODES = "bnexport_equivalent_nodes"


def bn_scale_shift_of(bn: nn.modules.batchnorm._BatchNorm, *, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of an eval-mode BN in float64; γ=1, β=0 when it has no affine parameters.

    Raises ``BnexportError`` naming the BN when its running variance gives NaN or ∞.
    """
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    problem = invalid_statistics(var, bn.eps)
    if problem:
        raise BnexportError(f"BatchNorm '{name or type(bn).__name__}': {problem}; refusing to fold a BN that outputs NaN or inf")
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    return bn_scale_shift(gamma, beta, mean, var, bn.eps)


def with_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` with new weight and bias, in the layer's dtype; ``layer`` is untouched."""
    skip = {id(layer.weight): None, **({id(layer.bias): None} if layer.bias is not None else {})}
    folded = copy.deepcopy(layer, memo=skip)  # everything but the two tensors about to be replaced
    dtype, grad = layer.weight.dtype, layer.weight.requires_grad
    folded.weight = nn.Parameter(weight.to(dtype), requires_grad=grad)
    folded.bias = nn.Parameter(bias.to(dtype), requires_grad=grad)
    return folded


def fold_layer_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, *, bn_name: str = "") -> nn.Module:
    """A new layer equal to ``bn(layer(x))`` in eval mode, for Conv, ConvTranspose and Linear."""
    scale, shift = bn_scale_shift_of(bn, name=bn_name)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    weight = layer.weight.detach()
    # s and t in float64; the weight is scaled in its own precision (one rounding, as with float64 then cast)
    work_scale = scale.to(_work_dtype(weight.dtype))
    if isinstance(layer, TRANSPOSED_TYPES):
        weight, _ = fold_into_transposed_conv(weight.to(work_scale.dtype), None, work_scale, shift, groups=layer.groups)
    else:
        weight, _ = fold_into_output_channels(weight.to(work_scale.dtype), None, work_scale, shift)
    bias = shift if bias is None else bias * scale + shift
    return with_weights(layer, weight, bias)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_bn_layer(bn: nn.modules.batchnorm._BatchNorm, layer: nn.Module, *, bn_name: str = "") -> nn.Module:
    """A new layer equal to ``layer(bn(x))`` in eval mode, for Conv without zero padding and Linear."""
    scale, shift = bn_scale_shift_of(bn, name=bn_name)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    groups = getattr(layer, "groups", 1)
    weight, bias = fold_into_input_channels(layer.weight.detach().double(), bias, scale, shift, groups=groups)
    return with_weights(layer, weight, bias)


# kept-reasons ---------------------------------------------------------------------------

def output_channels(layer: nn.Module) -> int:
    if isinstance(layer, LINEAR_TYPES):
        return layer.out_features
    return layer.out_channels


def pads_zeros(conv: nn.Module) -> bool:
    """True when the conv adds zeros around its input (the default ``padding_mode='zeros'`` with padding > 0)."""
    return conv.padding_mode == "zeros" and any(conv._reversed_padding_repeated_twice)


SHAPE_META = "bnexport_shape"  # node.meta key: the output shape seen on the example input


def _rank(node: fx.Node) -> int | None:
    shape = node.meta.get(SHAPE_META)
    return None if shape is None else len(shape)


def _after_reason(layer_node: fx.Node, layer: nn.Module, bn_node: fx.Node, bn: nn.Module) -> str | None:
    """Why ``bn(layer(x))`` cannot be folded into the layer, or None when it can."""
    name = type(layer).__name__
    if len(layer_node.users) > 1:
        return f"the {name}'s output feeds more than the BN"
    if output_channels(layer) != bn.num_features:
        return f"the {name} has {output_channels(layer)} output channels, the BN {bn.num_features}"
    if isinstance(layer, LINEAR_TYPES):
        rank = _rank(bn_node)
        if rank is None:
            return "Linear → BN is exact only on 2-D input; pass example_input so the shapes are known"
        if rank != 2:
            return f"Linear → BN on {rank}-D input: BN normalises axis 1, the Linear's features are the last axis"
    return None


def _before_reason(bn_node: fx.Node, bn: nn.Module, layer_node: fx.Node, layer: nn.Module) -> str | None:
    """Why ``layer(bn(x))`` cannot be folded into the layer, or None when it can."""
    name = type(layer).__name__
    if isinstance(layer, TRANSPOSED_TYPES):
        return f"it precedes a {name}, whose border outputs sum fewer taps, so the shift is not uniform"
    if not layer_node.args or layer_node.args[0] is not bn_node:
        return f"it feeds the {name} other than as its input"
    if isinstance(layer, CONV_TYPES):
        if pads_zeros(layer):
            return f"it precedes a {name} with zero padding: the padded border is not shifted, so the fold is inexact"
        if layer.in_channels != bn.num_features:
            return f"the {name} has {layer.in_channels} input channels, the BN {bn.num_features}"
        return None
    rank = _rank(bn_node)
    if layer.in_features != bn.num_features:
        return f"the Linear has {layer.in_features} input features, the BN {bn.num_features}"
    if rank is None:
        return "BN → Linear is exact only on 2-D input; pass example_input so the shapes are known"
    if rank != 2:
        return f"BN → Linear on {rank}-D input: BN normalises axis 1, the Linear reads the last axis"
    return None


# tracing --------------------------------------------------------------------------------

def trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph_module = fx.symbolic_trace(module)
    except Exception as err:  # fx raises many types for untraceable Python
        raise BnexportError(f"cannot trace {type(module).__name__} with torch.fx: {first_line(err)}") from None
    for node in graph_module.graph.nodes:
        # Postponed annotations ("from __future__ import annotations") reach fx as strings,
        # which TorchScript cannot resolve in the generated code.
        if isinstance(node.type, str):
            node.type = None
    return graph_module


def propagate_shapes(graph_module: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Record each node's output shape in ``node.meta[SHAPE_META]``."""

    class ShapeRecorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                node.meta[SHAPE_META] = tuple(result.shape)
            return result

    try:
        with torch.no_grad():
            ShapeRecorder(graph_module).run(example_input)
    except Exception as err:  # a wrong shape surfaces as whatever the first layer raises
        raise BnexportError(f"example input of shape {list(example_input.shape)} does not fit the module: "
                            f"{first_line(err)}") from None


class _Sites:
    """Which module each call site uses; a folded site of a shared module gets its own copy.

    The traced graph module shares its submodules with the user's module until ``copy``, so
    folded modules are attached under flat names at the root (never inside the shared
    hierarchy) and get their dotted names back on the copy.
    """

    def __init__(self, graph_module: fx.GraphModule):
        self.graph_module = graph_module
        self.modules = dict(graph_module.named_modules())
        self.count: dict[str, int] = {}
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                self.count[node.target] = self.count.get(node.target, 0) + 1
        # modules whose tensors the graph reads directly (get_attr): their name must keep its original weights
        self.read_directly = {node.target.rpartition(".")[0] for node in graph_module.graph.nodes if node.op == "get_attr"}
        self.final_name: dict[str, str] = {}  # flat root name → the name it has in the folded module
        self.created: list[nn.Module] = []

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def replace(self, node: fx.Node, new_module: nn.Module, *, bn_target: str) -> str:
        """Make ``node`` call ``new_module``: under the layer's own name when it alone calls it, else a fresh one."""
        target = node.target
        self.count[target] -= 1
        shared = self.count[target] > 0 or target in self.read_directly or target in self.final_name.values()
        if shared:  # this site gets its own weights under a new name
            final = self._fresh_name(f"{self.final_name.get(target, target)}_folded_{bn_target}")
        else:
            final = self.final_name.pop(target, target)
        flat = self._fresh_name(f"_bnexport_{final}")
        self.graph_module.add_submodule(flat, new_module)
        self.modules[flat] = new_module
        self.count[flat] = 1
        self.final_name[flat] = final
        self.created.append(new_module)
        node.target = flat
        return final

    def copy(self) -> fx.GraphModule:
        """A deep copy that shares nothing with the user's module, without copying tensors twice.

        Parameters of the folded modules are new already, and those of layers no call site
        uses any more are about to be dropped: neither is copied.
        """
        memo: dict[int, object] = {}
        for module in self.created:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                memo[id(tensor)] = tensor
        in_use = {id(t) for name, n in self.count.items() if n > 0 for t in self.modules[name].parameters()}
        for node in self.graph_module.graph.nodes:  # tensors read directly, e.g. a tied weight
            if node.op == "get_attr":
                value = self.graph_module
                for part in node.target.split("."):
                    value = getattr(value, part)
                in_use.add(id(value))
        for name, n in self.count.items():
            if n == 0:
                for tensor in self.modules[name].parameters(recurse=False):
                    if id(tensor) not in in_use:
                        memo[id(tensor)] = None
        copied = copy.deepcopy(self.graph_module, memo)
        for node in copied.graph.nodes:
            if node.op == "call_module" and node.target in self.final_name:
                flat = node.target
                module = getattr(copied, flat)
                delattr(copied, flat)
                copied.add_submodule(self.final_name[flat], module)
                node.target = self.final_name[flat]
        return copied

    def _fresh_name(self, base: str) -> str:
        base = base.replace(".", "_")
        name, index = base, 0
        while name in self.modules or name in self.final_name.values():
            index += 1
            name = f"{base}_{index}"
        return name


def fold_module(module: nn.Module, *, example_input: torch.Tensor | None = None) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every BatchNorm that folds exactly; return (folded copy, report).

    The input module is not modified. It must be in eval mode: folding freezes the running
    statistics, which is only what the module computes when it no longer trains. With
    ``example_input`` the shapes are known, which Linear ↔ BatchNorm1d needs.
    """
    training = [name for name, m in module.named_modules() if isinstance(m, BN_TYPES) and m.training]
    if training:
        raise BnexportError(f"the module is in training mode (BatchNorm '{training[0]}'); call .eval() before folding BatchNorm")
    graph_module = trace(module)  # shares the module's submodules until sites.copy(); nothing writes to them
    if example_input is not None and _linear_next_to_bn(graph_module):
        propagate_shapes(graph_module, example_input)
    sites = _Sites(graph_module)
    report = FoldReport(source="torch")
    equivalent: dict[str, str] = {}

    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(sites.module(node), BN_TYPES):
            continue
        record = _fold_site(graph_module, sites, node, equivalent)
        report.records.append(record)

    folded = sites.copy()
    folded.graph.lint()
    folded.delete_all_unused_submodules()
    folded.recompile()
    folded.meta[EQUIVALENT_NODES] = equivalent
    return folded.eval(), report


def _linear_next_to_bn(graph_module: fx.GraphModule) -> bool:
    """Whether any BN call site has a Linear neighbour; only those need shapes (one forward pass)."""
    modules = dict(graph_module.named_modules())

    def is_module(node, types) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], types)

    for node in graph_module.graph.nodes:
        if is_module(node, BN_TYPES):
            if (node.args and is_module(node.args[0], LINEAR_TYPES)) or any(is_module(u, LINEAR_TYPES) for u in node.users):
                return True
    return False


def _fold_site(graph_module: fx.GraphModule, sites: _Sites, node: fx.Node, equivalent: dict[str, str]) -> FoldRecord:
    bn = sites.module(node)
    label = node.target
    if bn.running_mean is None or bn.running_var is None:
        return FoldRecord(label, KEPT, reason="no running statistics (track_running_stats=False): uses batch statistics at inference")

    reasons = []
    producer = node.args[0] if node.args else None
    if isinstance(producer, fx.Node) and producer.op == "call_module" and isinstance(sites.module(producer), LAYER_TYPES):
        layer = sites.module(producer)
        reason = _after_reason(producer, layer, node, bn)
        if reason is None:
            target = sites.replace(producer, fold_layer_bn(layer, bn, bn_name=label), bn_target=label)
            node.replace_all_uses_with(producer)
            equivalent[producer.name] = node.name  # the layer now computes what the BN did
            graph_module.graph.erase_node(node)
            return FoldRecord(label, FOLDED, folded_into=target, position="after")
        reasons.append(reason)
    else:
        reasons.append(f"input comes from {_describe(producer, sites)}, not a Conv, ConvTranspose or Linear")

    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(sites.module(users[0]), LAYER_TYPES):
        consumer = users[0]
        layer = sites.module(consumer)
        reason = _before_reason(node, bn, consumer, layer)
        if reason is None:
            target = sites.replace(consumer, fold_bn_layer(bn, layer, bn_name=label), bn_target=label)
            consumer.replace_input_with(node, node.args[0])
            graph_module.graph.erase_node(node)
            return FoldRecord(label, FOLDED, folded_into=target, position="before")
        reasons.append(reason)
    elif len(users) != 1:
        reasons.append("its output feeds several nodes" if users else "its output is unused")
    else:
        reasons.append(f"its output goes to {_describe(users[0], sites)}, not a Conv or Linear")
    return FoldRecord(label, KEPT, reason="; ".join(reasons))


def _describe(node, sites: _Sites) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return type(sites.module(node)).__name__
    if node.op == "placeholder":
        return "the module's input"
    if node.op == "output":
        return "the module's output"
    return getattr(node.target, "__name__", str(node.target))
