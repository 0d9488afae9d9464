"""Fold BatchNorm into neighbouring linear layers of an ``nn.Module``, returning a copy of the user's own class.

The module is analysed in traced parts (``torch_graph``) and each BatchNorm site is decided
(``torch_patterns``). The result is a deep copy of the module in which each layer that
absorbed a BN has its folded weight and bias, each folded BN module is replaced by
``nn.Identity`` (or, for a norm-act module, by what its forward runs after normalising), and
a module whose own forward called a folded ``F.batch_norm`` runs that forward without the
call (it becomes an instance of a subclass of its class, made here, whose forward is the
traced one: ``isinstance`` holds, but ``torch.save`` of the whole module cannot pickle that
class; save its state dict instead). Everything else is untouched: the copy's class, methods, attributes and module modes
are the user's, and its state-dict keys differ only where a BN was removed (plus the bias a
bias-less layer gains).

The copy is made once, skipping the tensors about to be replaced, so no weight is copied twice.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from ..errors import BnexportError
from .fold_report import KEPT, FoldRecord, FoldReport
from .torch_graph import analyse, is_batchnorm, module_label
from .torch_patterns import ModuleFolder, Plan

__all__ = ["rewrite_module"]


def rewrite_module(module: nn.Module, *, example: tuple[tuple, dict] | None = None) -> tuple[nn.Module, FoldReport, dict]:
    """Fold every BatchNorm that folds exactly; return (folded copy, report, drill-down map).

    The input module is not modified. Its BatchNorms must be in eval mode: folding freezes
    the running statistics, which is only what the module computes when it no longer trains.
    ``example`` is (args, kwargs) of a call; it gives the shapes that Linear ↔ BatchNorm1d
    needs, and, where part of the module cannot be traced, shows which modules its
    untraceable forwards call. The map names, for the drill-down, the original module whose
    output each folded module now computes (None where none does).
    """
    training = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training:
        raise BnexportError(f"the module is in training mode (BatchNorm '{training[0]}'); call .eval() before folding BatchNorm")
    analysis = analyse(module)
    folder = ModuleFolder(analysis, example)
    report = FoldReport(source="torch")
    seen: set[int] = set()
    for part in analysis.parts:
        for node in list(part.graph.nodes):
            site = folder.site(node, part)
            if site is not None:
                if site.module is not None:
                    seen.add(id(site.module))
                record = folder.decide(site)
                # a BN module's label is its path; an F.batch_norm call has no module of its own
                record.module = site.label if site.module is not None else None
                record.folded_into_module = record.folded_into
                record.split_over_modules = record.split_over
                report.records.append(record)
    for path, sub in module.named_modules():
        caller = analysis.untraced_caller(path)
        if is_batchnorm(sub) and id(sub) not in seen and caller is not None:
            parent = module.get_submodule(caller)
            report.records.append(FoldRecord(path, KEPT, reason_code="untraceable", reason=(
                f"it is called by {module_label(parent, caller)}, whose forward torch.fx cannot trace "
                f"({analysis.untraced[caller]}), so what feeds it is unknown"), module=path))
    return apply_plan(module, folder.plan, analysis.tensor_slots), report, folder.plan.equivalent


def apply_plan(module: nn.Module, plan: Plan, tensor_slots) -> nn.Module:
    """A deep copy of ``module`` with the plan's changes; nothing the plan replaces is copied.

    A BN that leaves nothing behind enters the copy as its ``nn.Identity`` directly (through
    deepcopy's memo, so it is not copied first); the tensors of folded layers and norm-act
    modules are skipped the same way.
    """
    memo: dict[int, object] = {}
    for fold in plan.layers.values():
        for tensor in (fold.module.weight, fold.module.bias):
            if tensor is not None:
                memo[id(tensor)] = None
    for path, form in plan.removed.items():
        bn = module.get_submodule(path)
        if form.remainder is None:
            memo[id(bn)] = nn.Identity().train(bn.training)
            continue
        for tensor in [*bn._parameters.values(), *bn._buffers.values()]:
            if tensor is not None and tensor_slots[id(tensor)] == 1:
                memo[id(tensor)] = None
    copied = copy.deepcopy(module, memo)
    scratch: dict = {}  # one float64 buffer for all layers
    for path, fold in plan.layers.items():
        layer, original = copied.get_submodule(path), fold.module.weight
        layer.weight = nn.Parameter(fold.folded_weight(scratch), requires_grad=original.requires_grad)
        layer.bias = nn.Parameter(fold.bias.to(original.dtype), requires_grad=original.requires_grad)
    for path, form in plan.removed.items():
        if form.remainder is not None:
            parent_path, _, name = path.rpartition(".")
            parent = copied.get_submodule(parent_path)
            old = getattr(parent, name)
            new = _remainder(old, form.remainder)
            new.training = old.training  # its children (dropout, activation) keep their own modes
            setattr(parent, name, new)
    for path, graph in plan.rewritten.items():
        owner = copied.get_submodule(path)
        owner.__class__ = _rewritten_class(type(owner), _forward(owner, graph))
    return copied


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new


def _remainder(bn: nn.Module, graph: fx.Graph) -> nn.Module:
    """What a norm-act module runs after normalising, over the same child modules (their state-dict keys stay)."""
    return fx.GraphModule(bn, _copy_graph(graph), class_name=f"{type(bn).__name__}AfterFold")


def _forward(owner: nn.Module, graph: fx.Graph):
    """The Python forward of ``graph``, reading the owner's own submodules and tensors."""
    return type(fx.GraphModule(owner, _copy_graph(graph))).forward


def _rewritten_class(cls: type, forward) -> type:
    """A subclass of the user's class with a new forward: its methods and attributes stay the user's."""
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})

