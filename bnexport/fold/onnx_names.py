"""The torch module path behind an ONNX node (``layer1.0.bn1``), where the exporter recorded it.

Two exporters record it, each its own way:

- ``torch.onnx.export(..., dynamo=True)`` writes the node's ``metadata_props`` key
  ``pkg.torch.onnx.name_scopes``: the ``repr`` of a list from the root module (``''``) to
  the op, e.g. ``['', 'layer1', 'layer1.0', 'layer1.0.bn1', '_native_batch_norm_legit_no_training_1']``.
  Every entry but the last is the full path of a module on the call stack; the last is the
  op's own name. The entry before it is the module whose forward ran the op.
- ``torch.onnx.export(..., dynamo=False)`` names the node by the scopes it ran in:
  ``/layer1/layer1.0/bn1/BatchNormalization``. Each scope is a module's path from its last
  non-numeric atom on (``bn1``, ``layer1.0``, ``downsample.0``), so the full path is rebuilt
  child by child. A module entered twice gets ``_1``, ``_2``… on its last scope
  (``/bn_1/BatchNormalization`` is the second call of ``bn``), which a module may also be
  called; the parameters the node reads (``bn.running_mean``) say which, and failing them a
  scope already seen without the suffix.

An op that the root module's own forward runs (a top-level ``F.batch_norm``) has no module
path; nor has any node of other producers (hand-built graphs, other converters): callers
fall back to the node name. An ``F.batch_norm`` inside a submodule's forward is named after
that submodule, the module that holds its statistics.
"""

from __future__ import annotations

import ast
import re

import onnx

from .onnx_graph import subgraphs

NAME_SCOPES = "pkg.torch.onnx.name_scopes"

# the last part of a TorchScript-exporter node name: the op type, with "_N" when the scope ran it more than once
_OP_PART = re.compile(r"[A-Z][A-Za-z0-9]*(?:_\d+)?")
_REENTRY = re.compile(r"(.+)_\d+")
# torch.export marks the n-th call of a module "path@n" in some versions; the module is the same
_CALL_INDEX = re.compile(r"@\d+$")


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """Node name → torch module path, for the nodes of the main graph and its subgraphs that record one."""
    paths: dict[str, str] = {}

    def visit(graph: onnx.GraphProto) -> None:
        namer = ModuleNamer(graph)
        for node in graph.node:
            path = namer.path(node)
            if path is not None and node.name:
                paths[node.name] = path
            for sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    return paths


class ModuleNamer:
    """The module path of nodes of one graph, asked for one node at a time.

    Reading one node's path costs one parse of its own metadata or name; only a re-entered
    TorchScript scope that its parameters do not settle reads the whole graph's names, once.
    """

    def __init__(self, graph: onnx.GraphProto | onnx.FunctionProto):
        self.graph = graph
        self._scopes: set[str] | None = None

    def path(self, node: onnx.NodeProto) -> str | None:
        scopes = _name_scopes(node)
        if scopes is not None:
            return _path_from_name_scopes(scopes)
        scope = _torchscript_scope(node.name)
        return None if scope is None else self._path_from_scope(scope, node)

    def _path_from_scope(self, scope: list[str], node: onnx.NodeProto) -> str | None:
        literal = _rebuild(scope)
        match = _REENTRY.fullmatch(scope[-1])
        if match is None:
            return literal
        stripped = _rebuild(scope[:-1] + [match.group(1)])
        for candidate in (literal, stripped):  # what the node reads, when it reads its module's parameters
            if candidate is not None and any(name.startswith(f"{candidate}.") for name in node.input):
                return candidate
        if self._scopes is None:
            self._scopes = {"/".join(s) for n in self.graph.node if (s := _torchscript_scope(n.name)) is not None}
        return stripped if "/".join(scope[:-1] + [match.group(1)]) in self._scopes else literal


def _name_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The dynamo exporter's scope list of ``node``; None when absent or not a list of strings."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
                return scopes
            return None
    return None


def _path_from_name_scopes(scopes: list[str]) -> str | None:
    if len(scopes) < 2:  # the op's own name only: the exporter knew no module
        return None
    path = _CALL_INDEX.sub("", scopes[-2])
    return path or None  # "": the root module's own forward


def _torchscript_scope(name: str) -> list[str] | None:
    """``/layer1/layer1.0/bn1/BatchNormalization`` → ``['layer1', 'layer1.0', 'bn1']``; None for other names."""
    if not name.startswith("/"):
        return None
    parts = name.split("/")[1:]
    if len(parts) < 2 or not _OP_PART.fullmatch(parts[-1]) or not all(parts[:-1]):
        return None
    return parts[:-1]


def _rebuild(scope: list[str]) -> str | None:
    """The dotted path from scopes that each name a module from its last non-numeric atom on.

    ``['layer1', 'layer1.0', 'bn1']`` → ``layer1.0.bn1``: a scope of several atoms repeats the
    end of its parent's path and adds one numeric atom. None when a scope is not a child of
    the one before it (a module called from elsewhere than its parent), whose path is unknown.
    """
    path: list[str] = []
    for part in scope:
        atoms = part.split(".")
        head = atoms[:-1]
        if head and path[len(path) - len(head):] != head:
            return None
        path.append(atoms[-1])
    return ".".join(path)
