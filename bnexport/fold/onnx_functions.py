"""Fold BatchNormalization inside model-local ONNX functions (``model.functions``).

A function body is folded like a graph, once per call site: the body becomes a small model
whose inputs bound to a constant at that call site (an initializer of the caller, or a
constant computed there) are its initializers, and ``fold_graph`` runs every pattern on it.
Two cases come out of that:

- The weights live in the body (Constant nodes) and no call site binds a constant: every
  call site sees the same fold, so the body is folded once and the folded tensors are written
  as Constant nodes at the start of the body.
- The weights come in from outside, as function inputs bound at each call site (the
  TorchScript exporter's ``export_modules_as_functions``). Each call site gets its own folded
  values: a function input whose tensor the fold rewrites keeps its place, and the call site
  binds the new value (rewritten in place when only that call reads the caller's tensor, a
  copy otherwise); a tensor the fold adds (the bias of a bias-less conv) becomes a new
  function input, bound at each call site to an initializer of its own. Function inputs
  that only the removed BN read are dropped, at the function and at every call site.

Call sites whose folds rewrite the body the same way share one function. Where they differ
(one call site binds a weight that is a graph input or is computed in the graph), the
function is specialised rather than left unfolded everywhere: the call sites that fold
nothing keep the original function, with its BN and that call site's reason in the report,
and each other group gets the folded body, in place when no call site keeps the original,
else as a copy named ``<name>_bnfolded``. Every call site so runs exactly the arithmetic of
its own fold, and no tensor another node reads changes.

Kept with ``in_function``: a function never called, one whose body reads the call's
attributes (``ref_attr_name``, which a fold of the body alone cannot resolve), and a call
site inside another function's body (the caller's constants are out of reach there; that
call site keeps the original function).

The report has one record per BN per call site, as a runtime executes it: the BN's label
is ``<call site>/<BN node>``, and its module path is the one the call site's tensors name
(``b1.bn.weight`` → ``b1.bn``), else the call site's own module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import onnx
from onnx import helper, numpy_helper

from .fold_report import FOLDED, KEPT, FoldRecord
from .onnx_graph import ONNX_DOMAINS, graph_reads, implicit_inputs, node_label, subgraphs, tensor_array
from .onnx_names import ModuleNamer

FunctionKey = tuple[str, str, str]  # domain, name, overload


def functions_hold_batchnorm(model: onnx.ModelProto) -> bool:
    """Whether any model-local function holds a BatchNormalization (free for a model without functions)."""
    return any(_holds_batchnorm(function.node) for function in model.functions)


def _holds_batchnorm(nodes) -> bool:
    return any((node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS)
               or any(_holds_batchnorm(sub.node) for sub in subgraphs(node)) for node in nodes)


def _key(function_or_call) -> FunctionKey:
    name = function_or_call.name if isinstance(function_or_call, onnx.FunctionProto) else function_or_call.op_type
    return function_or_call.domain, name, function_or_call.overload


@dataclass
class _Site:
    """One call of a function, from a graph whose folder writes its tensors (None: inside another function)."""

    call: onnx.NodeProto
    folder: object | None  # onnx_patterns.GraphFolder of the graph that holds the call
    outer_function: str | None = None
    bound: dict[str, str] = field(default_factory=dict)  # function input → the caller's constant tensor
    folded: onnx.GraphProto | None = None  # the body folded at this call site
    rewritten: set[str] = field(default_factory=set)  # bound inputs whose values the fold changed
    fresh: list[str] = field(default_factory=list)  # tensors the fold added to the body
    records: list[FoldRecord] = field(default_factory=list)
    signature: tuple = ()  # how the fold rewrote the body; () when nothing folded


def fold_functions(model: onnx.ModelProto, folders: list) -> list[FoldRecord]:
    """Fold the BNs of ``model``'s functions at their call sites and return their records.

    ``model`` is the copy being folded, and ``folders`` the GraphFolders of its main graph and
    subgraphs, not finished yet: new tensors of a call site are written through its folder.
    """
    sites: dict[FunctionKey, list[_Site]] = {}
    for folder in folders:
        for node in folder.graph.node:
            if node.domain not in ONNX_DOMAINS:
                sites.setdefault(_key(node), []).append(_Site(node, folder))
    for function in model.functions:
        _nested_calls(function.node, f"{function.domain}.{function.name}", sites)
    records: list[FoldRecord] = []
    for function in list(model.functions):
        if _holds_batchnorm(function.node):
            records += _fold_function(model, function, sites.get(_key(function), []))
    return records


def _nested_calls(nodes, outer: str, sites: dict[FunctionKey, list[_Site]]) -> None:
    for node in nodes:
        if node.domain not in ONNX_DOMAINS:
            sites.setdefault(_key(node), []).append(_Site(node, None, outer_function=outer))
        for sub in subgraphs(node):
            _nested_calls(sub.node, outer, sites)


def _fold_function(model: onnx.ModelProto, function: onnx.FunctionProto, sites: list[_Site]) -> list[FoldRecord]:
    name = f"{function.domain}.{function.name}"
    reason = None
    if not sites:
        reason = f"it sits inside the model-local function '{name}', which no node calls"
    elif _reads_call_attributes(function.node):
        reason = (f"it sits inside the model-local function '{name}', whose body reads the call's attributes "
                  "(ref_attr_name), which this fold does not resolve")
    if reason is not None:
        return [FoldRecord(label, KEPT, reason=reason, reason_code="in_function", module=module)
                for label, module in _body_batchnorms(function)]
    pristine = onnx.FunctionProto()
    pristine.CopyFrom(function)
    foldable = [site for site in sites if site.folder is not None]
    for site in foldable:
        site.bound = _bound_constants(function, site)
    outside = any(site.bound for site in foldable)
    shared = None  # weights in the body only: one fold serves every call site
    for site in foldable:
        if outside or shared is None:
            shared = _fold_at(model, pristine, site)
        site.folded, site.rewritten, site.fresh, site.signature, report = shared
        site.records = _site_records(pristine, site, report)
    # call sites that fold nothing keep the original function; each other outcome gets a function of its own
    groups: dict[tuple, list[_Site]] = {}
    for site in foldable:
        if site.signature:
            groups.setdefault(site.signature, []).append(site)
    original_kept = len(foldable) < len(sites) or any(not site.signature for site in foldable)
    targets = [function if position == 0 and not original_kept else _specialised_copy(model, pristine)
               for position in range(len(groups))]
    for target, group in zip(targets, groups.values()):
        for site in group:
            site.call.op_type = target.name
        _rewrite(target, pristine, group, outside=outside)
    records = []
    for site in sites:
        if site.folder is not None:
            records += site.records
            continue
        records += [FoldRecord(f"{node_label(site.call)}/{label}", KEPT, reason_code="in_function", module=module,
                               reason=f"it sits inside the model-local function '{name}', called here from inside "
                                      f"the function '{site.outer_function}', which this fold does not rewrite")
                    for label, module in _body_batchnorms(function)]
    return records


def _fold_at(model: onnx.ModelProto, function: onnx.FunctionProto, site: _Site):
    """The body folded with the constants ``site`` binds: (graph, rewritten inputs, new tensors, signature, report)."""
    from .onnx_patterns import fold_graph

    probe = _probe(model, function, site)
    folded, report = fold_graph(probe, fold_overridable=site.folder.context.fold_overridable)
    if not report.folded:
        return folded.graph, set(), [], (), report
    reads = graph_reads(folded.graph)
    before = {t.name: t for t in probe.graph.initializer}
    rewritten = {t.name for t in folded.graph.initializer
                 if t.name in before and t.name in reads and not _same_values(t, before[t.name])}
    fresh = [t.name for t in folded.graph.initializer if t.name in reads and t.name not in function.input]
    signature = (tuple(node.SerializeToString(deterministic=True) for node in folded.graph.node),
                 tuple(sorted(rewritten)), tuple(fresh))
    return folded.graph, rewritten, fresh, signature, report


def _same_values(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    x, y = tensor_array(a), tensor_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _reads_call_attributes(nodes) -> bool:
    return any(attr.ref_attr_name or any(_reads_call_attributes(sub.node) for sub in subgraphs(node))
               for node in nodes for attr in node.attribute)


def _body_batchnorms(function: onnx.FunctionProto) -> list[tuple[str, str | None]]:
    found = []

    def visit(nodes, names: ModuleNamer) -> None:
        for node in nodes:
            if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
                found.append((node_label(node), names.path(node)))
            for sub in subgraphs(node):
                visit(sub.node, ModuleNamer(sub))

    visit(function.node, ModuleNamer(function))
    return found


def _bound_constants(function: onnx.FunctionProto, site: _Site) -> dict[str, str]:
    """Function input → the caller's tensor, for each input the call binds to a constant (or to an
    initializer that is also a graph input, which the fold of the body then treats as the caller would)."""
    index = site.folder.index
    bound = {}
    for formal, actual in zip(function.input, site.call.input):
        if actual and (index.constant(actual) is not None or _overridable_initializer(index, actual) is not None):
            bound[formal] = actual
    return bound


def _overridable_initializer(index, name: str) -> onnx.TensorProto | None:
    scope = index.owner(name)
    if scope is None or name not in scope.overridable:
        return None
    return scope.written.get(name) or scope.initializers.get(name)


def _probe(model: onnx.ModelProto, function: onnx.FunctionProto, site: _Site) -> onnx.ModelProto:
    """The body as a model of its own: the inputs the call site binds to constants are initializers
    (one the caller may override is an input with a default, as in the caller)."""
    index = site.folder.index
    initializers, inputs = [], []
    for formal in function.input:
        actual = site.bound.get(formal)
        if actual is None:
            inputs.append(onnx.ValueInfoProto(name=formal))
            continue
        value = index.constant(actual)
        if value is None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(_overridable_initializer(index, actual))
            inputs.append(helper.make_tensor_value_info(formal, tensor.data_type, list(tensor.dims)))
        else:
            tensor = numpy_helper.from_array(value)
        tensor.name = formal
        initializers.append(tensor)
    outputs = [onnx.ValueInfoProto(name=name) for name in function.output]
    graph = helper.make_graph(list(function.node), f"{function.domain}.{function.name}", inputs, outputs, initializers,
                              value_info=list(function.value_info))
    probe = helper.make_model(graph, opset_imports=list(function.opset_import) or list(model.opset_import))
    probe.ir_version = max(model.ir_version, 4)
    return probe


def _site_records(function: onnx.FunctionProto, site: _Site, report) -> list[FoldRecord]:
    """The body's records, named after the call site: its label, and the modules its tensors name."""
    call_label = node_label(site.call)
    site_module = _call_module(site)
    body = {node_label(node): node for node in function.node}

    def module(label: str) -> str | None:
        return _module_of(body.get(label), function, site, site_module)

    records = []
    for record in report.records:
        label = f"{call_label}/{record.batchnorm}"
        if record.status == FOLDED:
            split = record.split_over
            records.append(replace(
                record, batchnorm=label, module=module(record.batchnorm),
                folded_into=f"{call_label}/{record.folded_into}", folded_into_module=module(record.folded_into),
                split_over=[f"{call_label}/{layer}" for layer in split] if split else None,
                split_over_modules=[module(layer) for layer in split] if split else None))
        else:
            reason = f"in the model-local function '{function.domain}.{function.name}', called at '{call_label}': "
            records.append(replace(record, batchnorm=label, module=module(record.batchnorm),
                                   reason=reason + (record.reason or "")))
    return records


def _call_module(site: _Site) -> str | None:
    """The call site's module: the one its name records, unless that lies inside the module that
    holds every tensor the call binds. The TorchScript exporter may name a call after the last
    child module its body ran (``/l1/l1.0/relu/Block``, whose tensors are ``l1.0.conv1.weight`` …)."""
    named = site.folder.names.path(site.call)
    owners = [actual.split(".")[:-1] for actual in site.bound.values() if "." in actual]
    if named is None or not owners:
        return named
    holder = ".".join(os.path.commonprefix(owners))  # element by element: the common leading atoms
    return holder if holder and named.startswith(f"{holder}.") else named


def _module_of(node: onnx.NodeProto | None, function: onnx.FunctionProto, site: _Site,
               site_module: str | None) -> str | None:
    """The module whose parameter the call site binds to the node's second input (``b1.bn.weight`` → ``b1.bn``),
    when it lies inside the call site's module; else the call site's module."""
    if node is None or len(node.input) < 2:
        return site_module
    actual = dict(zip(function.input, site.call.input)).get(node.input[1])
    if actual and "." in actual and (site_module is None or actual.startswith(f"{site_module}.")):
        return actual.rsplit(".", 1)[0]
    return site_module


def _specialised_copy(model: onnx.ModelProto, function: onnx.FunctionProto) -> onnx.FunctionProto:
    """A copy of ``function`` under a name no function of the model has."""
    taken = {_key(f) for f in model.functions}
    name, counter = f"{function.name}_bnfolded", 0
    while (function.domain, name, function.overload) in taken:
        counter += 1
        name = f"{function.name}_bnfolded_{counter}"
    copied = model.functions.add()
    copied.CopyFrom(function)
    copied.name = name
    return copied


def _rewrite(target: onnx.FunctionProto, original: onnx.FunctionProto, group: list[_Site], *, outside: bool) -> None:
    """Give ``target`` the folded body of ``group``'s call sites, and bind each call site's own folded tensors."""
    folded = group[0].folded
    reads = graph_reads(folded)
    read_before = {name for node in original.node for name in node.input} | set(original.output)
    for node in original.node:
        read_before |= implicit_inputs(node)
    formals = list(original.input)
    kept_positions = [i for i, formal in enumerate(formals) if formal in reads or formal not in read_before]
    fresh = group[0].fresh
    constants = []
    if not outside:  # no call site binds a constant: the folded tensors are Constant nodes of the body
        constants = [helper.make_node("Constant", [], [t.name], name=t.name, value=t)
                     for t in folded.initializer if t.name in fresh]
        fresh = []
    del target.node[:]
    target.node.extend(constants + list(folded.node))
    del target.input[:]
    target.input.extend([formals[i] for i in kept_positions] + fresh)
    defined = set(target.input) | {name for node in target.node for name in node.output}
    values = [v for v in target.value_info if v.name in defined]
    del target.value_info[:]
    target.value_info.extend(values)
    for site in group:
        _bind(site, formals, kept_positions, fresh)


def _bind(site: _Site, formals: list[str], kept_positions: list[int], fresh: list[str]) -> None:
    """The call site's new inputs: its own folded tensors; the removed BN's parameters dropped."""
    folder, call = site.folder, site.call
    actuals = list(call.input)
    values = {t.name: t for t in site.folded.initializer}
    for position, formal in enumerate(formals):
        if formal in site.rewritten:
            array = tensor_array(values[formal])
            if list(call.input).count(call.input[position]) == 1:
                folder.store(call, position, array, dtype=array.dtype)
            else:  # the call also reads the tensor at another position, which must keep its value
                _bind_new(folder, call, position, f"{call.input[position]}_bnfolded", array)
    before = list(call.input)
    kept = [before[i] if i < len(before) else "" for i in kept_positions]
    if not fresh:
        while kept and not kept[-1]:
            kept.pop()
    for name in set(before) - set(kept):
        if name:
            _forget_reader(folder.index, name, call)
    del call.input[:]
    call.input.extend(kept)
    for name in fresh:
        _bind_new(folder, call, len(call.input), _site_name(name, site, formals, actuals), tensor_array(values[name]))


def _forget_reader(index, name: str, call: onnx.NodeProto) -> None:
    readers = index.readers.get(name, [])
    for position, reader in enumerate(readers):
        if reader is call:
            del readers[position]
            return


def _bind_new(folder, call: onnx.NodeProto, position: int, base: str, array) -> None:
    """Bind the call's input ``position`` to a new initializer of the caller holding ``array``."""
    name = folder.context.fresh_name(base)
    holder = folder.context.root if folder.context.ir_version < 4 else folder
    folder._write(holder, name, array)
    folder.index.replace_input(call, position, name)


def _site_name(name: str, site: _Site, formals: list[str], actuals: list[str]) -> str:
    """A new tensor's name at a call site, after the caller's tensor it comes from: the body's
    ``b2.conv.bias`` (from ``b2.conv.weight``) is ``b1.conv.bias`` where ``b1.conv.weight`` is bound."""
    for formal, actual in zip(formals, actuals):
        if not actual:
            continue
        if formal.endswith("weight") and actual.endswith("weight") and name == f"{formal[:-6]}bias":
            return f"{actual[:-6]}bias"
        if name.startswith(formal) and len(name) > len(formal):
            return actual + name[len(formal):]
    return f"{site.call.output[0]}_{name}" if site.call.output else name
