"""Fold BatchNorm into the conv layer before it, in any traceable ``nn.Module``.

The module is traced with ``torch.fx``; each BatchNorm call site is matched against the
node that feeds it. A pair is folded only when the result is exact: the conv's output
feeds nothing but the BN, and the BN uses running statistics. A conv module called at
several sites gets its own folded copy per site; ``torch.fx``'s own ``fuse`` writes one
site's fold into the shared module and silently breaks the others.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..errors import BnexportError
from .maths import bn_scale_shift, fold_into_output_channels
from .report import FOLDED, KEPT, FoldRecord, FoldReport

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_scale_shift_of(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of an eval-mode BN in float64; γ=1, β=0 when it has no affine parameters."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    return bn_scale_shift(gamma, beta, mean, var, bn.eps)


def fold_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` in eval mode; the inputs are left untouched."""
    scale, shift = bn_scale_shift_of(bn)
    bias = conv.bias.detach().double() if conv.bias is not None else None
    weight, new_bias = fold_into_output_channels(conv.weight.detach().double(), bias, scale, shift)
    folded = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    folded.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    folded.bias = nn.Parameter(new_bias.to(dtype), requires_grad=conv.weight.requires_grad)
    return folded


def _kept_reason(conv_node: fx.Node, conv: nn.Module, bn: nn.Module) -> str | None:
    if not isinstance(conv, CONV_TYPES):
        return f"input comes from {type(conv).__name__}, not a conv layer"
    if len(conv_node.users) > 1:
        return "the conv's output feeds more than the BN"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): uses batch statistics at inference"
    if conv.weight.shape[0] != bn.num_features:
        return "channel counts differ"
    return None


def trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph_module = fx.symbolic_trace(module)
    except Exception as err:  # fx raises many types for untraceable Python
        raise BnexportError(f"cannot trace {type(module).__name__} with torch.fx: {err}") from None
    for node in graph_module.graph.nodes:
        # Postponed annotations ("from __future__ import annotations") reach fx as strings,
        # which TorchScript cannot resolve in the generated code.
        if isinstance(node.type, str):
            node.type = None
    return graph_module


def fold_module(module: nn.Module) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every Conv→BN pair that folds exactly; return (folded copy, report).

    The input module is not modified. It must be in eval mode: folding freezes the running
    statistics, which is only what the module computes when it no longer trains.
    """
    if any(m.training for m in module.modules() if isinstance(m, BN_TYPES)):
        raise BnexportError("the module is in training mode; call .eval() before folding BatchNorm")
    graph_module = trace(copy.deepcopy(module))
    modules = dict(graph_module.named_modules())
    report = FoldReport(source="torch")
    sites_per_module: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            sites_per_module[node.target] = sites_per_module.get(node.target, 0) + 1

    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], BN_TYPES):
            continue
        bn = modules[node.target]
        producer = node.args[0] if node.args else None
        if not (isinstance(producer, fx.Node) and producer.op == "call_module"):
            report.records.append(FoldRecord(node.target, KEPT, reason="no conv layer directly before it"))
            continue
        conv = modules[producer.target]
        reason = _kept_reason(producer, conv, bn)
        if reason:
            report.records.append(FoldRecord(node.target, KEPT, reason=reason))
            continue
        target = producer.target
        if sites_per_module[target] > 1:  # a shared conv: give this site its own weights
            target = _fresh_name(modules, f"{target}_folded_{node.target}")
        folded = fold_conv_bn(conv, bn)
        graph_module.add_submodule(target, folded)
        modules[target] = folded
        producer.target = target
        node.replace_all_uses_with(producer)
        graph_module.graph.erase_node(node)
        report.records.append(FoldRecord(node.target, FOLDED, folded_into=target))

    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module.eval(), report


def _fresh_name(modules: dict[str, nn.Module], base: str) -> str:
    name = base.replace(".", "_")
    index = 0
    while name in modules:
        index += 1
        name = f"{base.replace('.', '_')}_{index}"
    return name
