"""How a torch module is analysed for folding: what is a BatchNorm, what is a layer, and what calls what.

The module is traced with ``torch.fx``, but not necessarily in one piece. A module whose
forward fx cannot trace (data-dependent control flow, say) is skipped and each of its
children is traced instead, so everything below it still folds. Every BatchNorm-like module
is a leaf of the trace, whatever its class: ``nn.BatchNorm*`` and its subclasses with their
own forward (timm's ``BatchNormAct2d``), ``SyncBatchNorm``, and the frozen BatchNorms of
torchvision and timm. A subclass's own forward is traced on its own, to find the
``batch_norm`` inside it and what runs after it (dropout, activation): that remainder is what
replaces the module once its BatchNorm is folded.

Graph nodes name modules by path (``layer1.0.bn1``), so a fold found on the user's module
applies unchanged to a deep copy of it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BnexportError, first_line

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear,)
LAYER_TYPES = CONV_TYPES + TRANSPOSED_TYPES + LINEAR_TYPES

# BatchNorm classes whose forward is torch's own: what they compute is known without tracing.
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
# A rank per BatchNorm class, for tracing a subclass's forward that checks its input's rank.
_RANKS = ((nn.BatchNorm1d, 2), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))


def pads_same_dynamically(module: nn.Module) -> bool:
    """timm's ``Conv2dSame`` (TensorFlow's 'SAME' padding): its forward zero-pads the input by an amount
    that depends on the input's size, then runs ``F.conv2d`` with its stored weight and bias. So a BN
    after it folds like any conv's, and a BN before it meets zero padding."""
    cls = type(module)
    return cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm.") and isinstance(module, nn.Conv2d)


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'transposed' or 'linear' for a layer whose forward is torch's own; None for anything else.

    A subclass with its own forward (weight standardisation, dynamic padding) may not compute
    ``w ⊛ x + b`` with its stored weight, so it is not a layer a BN folds into; the one known
    exception is ``pads_same_dynamically``.
    """
    if pads_same_dynamically(module):
        return "conv"
    for types, kind in ((CONV_TYPES, "conv"), (TRANSPOSED_TYPES, "transposed"), (LINEAR_TYPES, "linear")):
        for base in types:
            if isinstance(module, base):
                cls = type(module)
                standard = (cls.forward is base.forward
                            and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None))
                return kind if standard else None
    return None


def is_layer_subclass(module: nn.Module) -> bool:
    """A Conv, ConvTranspose or Linear of any class, holding no BatchNorm: tracing stops at it, so that a
    forward fx cannot trace (dynamic padding) does not make its caller untraceable."""
    return isinstance(module, LAYER_TYPES) and not any(is_batchnorm(sub) for sub in module.modules())


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm of any class: ``_BatchNorm`` and subclasses, and the frozen ones (plain modules with BN buffers)."""
    if isinstance(module, _BatchNorm):
        return True
    return type(module).__name__.startswith("FrozenBatchNorm") and all(
        isinstance(getattr(module, name, None), torch.Tensor) for name in ("weight", "bias", "running_mean", "running_var"))


def module_label(module: nn.Module, path: str) -> str:
    return f"'{path}' ({type(module).__name__})" if path else f"the model ({type(module).__name__})"


class BnTracer(fx.Tracer):
    """fx's tracer with every BatchNorm and every layer as a leaf, so each is one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or is_layer_subclass(m) or super().is_leaf_module(m, module_qualified_name)


class ChildrenAsLeaves(BnTracer):
    """Traces one module's own forward: every submodule it calls is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _clean(graph: fx.Graph) -> fx.Graph:
    for node in graph.nodes:
        # Postponed annotations ("from __future__ import annotations") reach fx as strings,
        # which TorchScript cannot resolve in the generated code.
        if isinstance(node.type, str):
            node.type = None
    return graph


def trace(module: nn.Module) -> fx.GraphModule:
    """The whole module as one GraphModule (fx's default leaves); raises ``BnexportError`` naming it."""
    try:
        return fx.GraphModule(module, _clean(fx.Tracer().trace(module)))
    except Exception as err:  # fx raises many types for untraceable Python
        raise BnexportError(f"cannot trace {type(module).__name__} with torch.fx: {first_line(err)}") from None


# What a BatchNorm module computes -------------------------------------------------------

@dataclass
class BnStats:
    """The tensors an eval-mode BatchNorm reads: BN(x) = γ · (x − μ) / √(σ² + ε) + β."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @property
    def num_features(self) -> int:
        return self.mean.numel()


@dataclass
class BnForm:
    """A BatchNorm module as a fold sees it: its statistics, and what its forward does after normalising.

    ``remainder`` is None when the forward is the BatchNorm alone; otherwise the forward's
    graph with the batch_norm removed (e.g. dropout then activation). ``reason`` and
    ``reason_code`` say why it cannot fold at all.
    """

    stats: BnStats | None = None
    remainder: fx.Graph | None = None
    reason: str | None = None
    reason_code: str | None = None


class _ShapedProxy(fx.Proxy):
    """A traced input whose rank and size are known, so that a forward may check them (``x.ndim == 4``)."""

    def __init__(self, node: fx.Node, tracer, shape: tuple[int, ...]):
        super().__init__(node, tracer)
        self._known_shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self._known_shape)

    @property
    def ndim(self) -> int:
        return len(self._known_shape)

    @property
    def shape(self) -> torch.Size:
        return self._known_shape

    def size(self, dim: int | None = None):
        return self._known_shape if dim is None else self._known_shape[dim]


class _ShapedTracer(BnTracer):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.input_shape = shape

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "placeholder" and not any(n.op == "placeholder" for n in node.graph.nodes if n is not node):
            return _ShapedProxy(node, self, self.input_shape)
        return super().proxy(node)


def batch_norm_arguments(node: fx.Node) -> dict:
    """F.batch_norm's arguments of a call node, by name, defaults filled in."""
    bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _get_attr(root: nn.Module, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = root
    for part in node.target.split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def bn_form(module: nn.Module, *, rank: int | None = None) -> BnForm:
    """What a BatchNorm-like module computes; see ``BnForm``."""
    if isinstance(module, _BatchNorm) and type(module).forward in _PLAIN_FORWARDS:
        if module.running_mean is None or module.running_var is None:
            return BnForm(reason="no running statistics (track_running_stats=False): uses batch statistics at inference",
                          reason_code="training_mode")
        return BnForm(BnStats(module.running_mean, module.running_var, module.weight, module.bias, module.eps))
    if type(module).__name__ == "FrozenBatchNorm2d" and type(module).__module__.startswith("torchvision."):
        return BnForm(BnStats(module.running_mean, module.running_var, module.weight, module.bias, module.eps))
    return _traced_form(module, rank=rank)


def _traced_form(module: nn.Module, *, rank: int | None) -> BnForm:
    """A BatchNorm with its own forward: trace it, find its one batch_norm, and keep what follows it."""
    name = type(module).__name__
    channels = module.running_mean.numel() if isinstance(getattr(module, "running_mean", None), torch.Tensor) else 1
    if rank is None:
        rank = next((r for cls, r in _RANKS if isinstance(module, cls)), 4)
    try:
        graph = _ShapedTracer((2, channels, *([3] * (rank - 2)))).trace(module)
    except Exception as err:  # fx raises many types for untraceable Python
        return BnForm(reason=f"its own forward ({name}) cannot be traced by torch.fx: {first_line(err)}",
                      reason_code="untraceable")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    found = [n for n in graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    stats, bn_node = None, None
    if len(found) == 1:
        bn_node = found[0]
        arguments = batch_norm_arguments(bn_node)
        if arguments["training"] is not False:
            return BnForm(reason=f"its forward ({name}) normalises with batch statistics", reason_code="training_mode")
        tensors = [_get_attr(module, arguments[k]) for k in ("running_mean", "running_var")]
        affine = {k: arguments[k] for k in ("weight", "bias")}
        if any(t is None for t in tensors) or any(v is not None and _get_attr(module, v) is None for v in affine.values()) \
                or not isinstance(arguments["eps"], float):
            return BnForm(reason=f"its forward ({name}) calls batch_norm with computed statistics", reason_code="not_constant")
        stats = BnStats(*tensors, *(None if v is None else _get_attr(module, v) for v in affine.values()), arguments["eps"])
    elif not found and type(module).__name__.startswith("FrozenBatchNorm"):
        bn_node = _frozen_affine(graph, placeholders[0]) if placeholders else None
        if bn_node is not None:
            stats = BnStats(module.running_mean, module.running_var, module.weight, module.bias, float(module.eps))
            if not _computes(module, graph, bn_node, stats):
                bn_node = None
    if bn_node is None:
        return BnForm(reason=f"its forward ({name}) has no single batch_norm bnexport recognises", reason_code="untraceable")
    bn_input = bn_node.args[0].args[0] if bn_node.target is not F.batch_norm else bn_node.args[0]  # x of x * s + t
    if not placeholders or bn_input is not placeholders[0]:
        return BnForm(reason=f"its forward ({name}) computes on the input before normalising it",
                      reason_code="no_linear_neighbour")
    bn_node.replace_all_uses_with(placeholders[0])
    graph.erase_node(bn_node)
    for node in list(graph.nodes):  # nn.Identity stand-ins for a missing dropout or activation
        if node.op == "call_module" and type(module.get_submodule(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.owning_module = module  # dead-code elimination asks each called module whether it is pure
    graph.eliminate_dead_code()
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is placeholders[0] and all(n.op in ("placeholder", "output") for n in graph.nodes):
        return BnForm(stats)
    return BnForm(stats, remainder=_clean(graph))


def _frozen_affine(graph: fx.Graph, x: fx.Node) -> fx.Node | None:
    """The ``x * scale + shift`` node of a frozen BatchNorm's forward, or None."""
    import operator

    for user in x.users:
        if user.op == "call_function" and user.target is operator.mul and user.args[0] is x and len(user.users) == 1:
            add = next(iter(user.users))
            if add.op == "call_function" and add.target is operator.add and add.args[0] is user:
                return add
    return None


def _computes(module: nn.Module, graph: fx.Graph, bn_node: fx.Node, stats: BnStats) -> bool:
    """Whether the graph up to ``bn_node`` computes s·x + t with the statistics' s and t (a probe on 0 and 1)."""
    from .maths import bn_scale_shift

    mapping: dict[fx.Node, fx.Node] = {}
    probe = fx.Graph()
    probe.graph_copy(graph, mapping)
    probe.output(mapping[bn_node])
    probe.owning_module = module
    probe.eliminate_dead_code()
    try:
        runner = fx.GraphModule(module, probe)
        channels = stats.num_features
        with torch.no_grad():
            like = {"dtype": stats.mean.dtype, "device": stats.mean.device}
            zero = runner(torch.zeros(1, channels, 1, 1, **like)).reshape(-1).double()
            one = runner(torch.ones(1, channels, 1, 1, **like)).reshape(-1).double()
    except Exception:  # any forward that does not take a (1, C, 1, 1) tensor is not the pattern
        return False
    mean = stats.mean.double()
    gamma = stats.weight.double() if stats.weight is not None else torch.ones_like(mean)
    beta = stats.bias.double() if stats.bias is not None else torch.zeros_like(mean)
    scale, shift = bn_scale_shift(gamma, beta, mean, stats.var.double(), stats.eps)
    tol = 1e-3 if stats.mean.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scale_of = lambda v: tol * (1 + v.abs().max())  # noqa: E731
    return bool((zero - shift).abs().max() <= scale_of(shift) and (one - zero - scale).abs().max() <= scale_of(scale))


# The model, traced in parts --------------------------------------------------------------

@dataclass
class Part:
    """One traced subtree: the graph of ``root``'s forward, with node targets relative to ``path``."""

    path: str  # '' for the model itself
    root: nn.Module
    graph: fx.Graph
    modules: dict[str, nn.Module]

    def full(self, target: str) -> str:
        return f"{self.path}.{target}" if self.path else target


@dataclass
class Analysis:
    """Every traced part of a module, and who calls or reads what across all of them."""

    module: nn.Module
    parts: list[Part] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)  # module path → why fx cannot trace its forward
    calls: Counter = field(default_factory=Counter)  # id(module) → call_module nodes, all parts
    caller: dict[int, Part] = field(default_factory=dict)  # id(module) → a part that calls it
    paths: dict[int, list[str]] = field(default_factory=dict)  # id(module) → every path it has (aliases)
    tensor_slots: Counter = field(default_factory=Counter)  # id(tensor) → modules that hold it
    read_directly: set[int] = field(default_factory=set)  # tensors a graph reads with get_attr

    def path(self, module: nn.Module) -> str:
        return self.paths[id(module)][0]

    def untraced_caller(self, path: str) -> str | None:
        """The untraceable module whose forward calls ``path`` directly, if any (containers without a forward skipped)."""
        parent = path
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in self.untraced:
                return parent
            if has_forward(self.module.get_submodule(parent)):
                return None
        return None


def has_forward(module: nn.Module) -> bool:
    """False for containers such as ModuleList, which hold modules but are never called."""
    return type(module).forward is not nn.Module.forward


def analyse(module: nn.Module) -> Analysis:
    analysis = Analysis(module)
    for path, sub in module.named_modules(remove_duplicate=False):
        analysis.paths.setdefault(id(sub), []).append(path)
        for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
            if tensor is not None:
                analysis.tensor_slots[id(tensor)] += 1
    _visit(analysis, "", module, BnTracer())
    return analysis


def _visit(analysis: Analysis, path: str, module: nn.Module, tracer: BnTracer) -> None:
    if path and tracer.is_leaf_module(module, path):
        return  # its caller is untraceable; the records say so
    if is_batchnorm(module) or layer_kind(module) is not None:
        return  # a lone BN or layer as the model: nothing next to it
    try:
        if not has_forward(module):
            raise NotImplementedError  # a container: its children are called by its parent's forward
        graph = _clean(tracer.trace(module))
    except Exception as err:  # fx raises many types for untraceable Python
        if has_forward(module):
            analysis.untraced[path] = first_line(err)
        for name, child in module.named_children():
            _visit(analysis, f"{path}.{name}" if path else name, child, tracer)
        return
    part = Part(path, module, graph, dict(module.named_modules()))
    analysis.parts.append(part)
    for node in graph.nodes:
        if node.op == "call_module":
            sub = part.modules[node.target]
            analysis.calls[id(sub)] += 1
            analysis.caller[id(sub)] = part
        elif node.op == "get_attr":
            tensor = _get_attr(module, node)
            if tensor is not None:
                analysis.read_directly.add(id(tensor))


# What running the module on an example shows ---------------------------------------------

@dataclass
class Observation:
    """One eager run on the example inputs: how often each module ran, and the ranks and shapes it saw."""

    calls: Counter
    ranks: dict[int, tuple[int | None, int | None]]  # id(module) → (rank of its first input, rank of its output)
    shapes: dict[int, tuple[int, ...] | None] = field(default_factory=dict)  # id(module) → its output's shape


def observe(module: nn.Module, args: tuple, kwargs: dict) -> Observation:
    """Run the module once with hooks; an input that does not fit names the module that failed."""
    calls: Counter = Counter()
    ranks: dict[int, tuple[int | None, int | None]] = {}
    shapes: dict[int, tuple[int, ...] | None] = {}
    stack: list[tuple[str, nn.Module]] = []

    def before(path, sub, inputs):
        stack.append((path, sub))

    def after(sub, inputs, output):
        stack.pop()
        calls[id(sub)] += 1
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        ranks[id(sub)] = (None if first is None else first.dim(), output.dim() if isinstance(output, torch.Tensor) else None)
        shapes[id(sub)] = tuple(output.shape) if isinstance(output, torch.Tensor) else None

    handles = []
    try:
        for path, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(lambda s, i, p=path: before(p, s, i)))
            handles.append(sub.register_forward_hook(after))
        with torch.no_grad():
            module(*args, **kwargs)
    except Exception as err:  # whatever the failing layer raises
        where = module_label(stack[-1][1], stack[-1][0]) if stack else module_label(module, "")
        raise BnexportError(f"the example input does not fit the module: {where} raised: {first_line(err)}") from None
    finally:
        for handle in handles:
            handle.remove()
    return Observation(calls, ranks, shapes)
