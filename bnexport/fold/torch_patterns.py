"""Which BatchNorm sites of a traced module fold, into which layer, and the float64 maths of each fold.

Patterns, each exact in eval mode:

- Conv1/2/3d, ConvTranspose1/2/3d or Linear → BN: the BN scales the layer's output channels.
  A BN whose module runs more after normalising (timm's ``BatchNormAct2d``: dropout and
  activation) folds this way too, and the module is replaced by what remains of it.
- BN → Conv1/2/3d without zero padding, BN → Linear: the BN is folded into the layer after it,
  also through a reflect, replicate or circular pad of its spatial axes (``F.pad`` or a padding module)
  before the conv.
- A concatenation or a sum of such layers → BN: the BN is split over the layers (``torch_split``).

A site is a BN module's call, or an ``F.batch_norm`` call whose statistics are a module's
tensors. A pair folds only when the result is exact everywhere the weights are used: the
layer's output feeds nothing but the BN (or the BN's output nothing but the layer); the layer
and the BN module are each called at exactly one site and their tensors are read nowhere
else (a layer shared by two sites cannot hold both folds); the BN uses running statistics;
and for Linear the tensor is 2-D (BatchNorm1d normalises axis 1, Linear mixes the last
axis; the shapes come from the example inputs).

Folds of one layer compose (BN → Conv → BN folds both into the Conv); the weights stay in
float64 until every fold is made and are cast once, to the layer's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import BnexportError
from .maths import bn_scale_shift, fold_into_input_channels, invalid_statistics
from .fold_report import FOLDED, KEPT, FoldRecord
from .torch_graph import (Analysis, BnForm, BnStats, ChildrenAsLeaves, Observation, Part, batch_norm_arguments, bn_form,
                          LAYER_TYPES, is_batchnorm, layer_kind, module_label, observe, pads_same_dynamically)
from .torch_split import fold_split, split_of, split_reason


@dataclass
class Site:
    """One place where a BatchNorm runs: a BN module's call, or an ``F.batch_norm`` call."""

    label: str  # the BN module's path, or F.batch_norm(<running mean's path>)
    node: fx.Node
    part: Part
    module: nn.Module | None  # None for F.batch_norm
    form: BnForm
    owner: str | None = None  # F.batch_norm: the module whose own forward calls it

    @property
    def input(self):
        return self.node.args[0] if self.node.args else None


@dataclass
class LayerFold:
    """A layer's folds as they accumulate, in float64.

    BNs after the layer scale its output channels: their product waits in ``scale`` and
    reaches the weight only in ``folded_weight``, in one pass, so the common single fold
    never holds a float64 copy of the weight. A BN before the layer needs the weight itself,
    which is then kept in float64 (``weight``).
    """

    module: nn.Module
    kind: str  # conv | transposed | linear
    bias: torch.Tensor | None  # float64
    scale: torch.Tensor | None = None  # float64, per output channel, not yet applied to the weight
    weight: torch.Tensor | None = None  # float64, once a BN before the layer folded

    def after(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``bn(layer(x))``: w' = w · s per output channel, b' = b · s + t (``maths.fold_into_output_channels``)."""
        self.bias = shift if self.bias is None else self.bias * scale + shift
        if self.weight is not None:
            self.weight = self.weight * _output_channel_view(scale, self.weight, self.kind, self.groups)
        else:
            self.scale = scale if self.scale is None else self.scale * scale

    def before(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``layer(bn(x))``: ``maths.fold_into_input_channels`` on the float64 weight."""
        weight = self.module.weight.detach().double()
        if self.weight is not None:
            weight = self.weight
        elif self.scale is not None:
            weight = weight * _output_channel_view(self.scale, weight, self.kind, self.groups)
        self.scale = None
        self.weight, self.bias = fold_into_input_channels(weight, self.bias, scale, shift, groups=self.groups)

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    def folded_weight(self, scratch: dict) -> torch.Tensor:
        """The folded weight, computed in float64 and rounded once to the layer's dtype.

        It goes through a small float64 buffer, rows at a time, shared by every layer: a
        float64 copy of each whole weight would cost more in fresh memory than the maths.
        A row longer than the buffer is still one pass.
        """
        original = self.module.weight.detach()
        if self.weight is not None:
            return self.weight.to(original.dtype)
        scale = _output_channel_view(self.scale, original, self.kind, self.groups)
        folded = original.clone()  # one parallel pass touches the new memory; the serial passes below then stay in cache
        rows = max(1, _CHUNK // max(1, original[0].numel()))
        buffer = _scratch(scratch, (rows, *original.shape[1:]), original.device)
        for start in range(0, len(original), rows):
            stop = min(start + rows, len(original))
            chunk = buffer[: stop - start]
            chunk.copy_(folded[start:stop])
            chunk.mul_(scale[start:stop])
            folded[start:stop].copy_(chunk)
        return folded


# float64 elements per pass: torch's grain size, below which an op runs on one thread. Thousands
# of small serial passes cost a few ms; parallel ones stall whenever the thread pool waits on a busy core.
_CHUNK = 1 << 15


def _scratch(scratch: dict, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``shape`` over one buffer per device, reused by every layer."""
    size = 1
    for dim in shape:
        size *= dim
    buffer = scratch.get(device)
    if buffer is None or buffer.numel() < size:
        buffer = scratch[device] = torch.empty(max(size, _CHUNK), dtype=torch.float64, device=device)
    return buffer[:size].view(shape)


def _output_channel_view(scale: torch.Tensor, weight: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """``scale`` shaped to multiply ``weight`` per output channel.

    Conv and Linear weights hold output channels on axis 0. A ConvTranspose weight is
    (C_in, C_out / groups, *kernel): output channel g · (C_out/groups) + j is column j of
    group g's rows (as in ``maths.fold_into_transposed_conv``), so its scale is repeated per
    row of each group.
    """
    if kind != "transposed":
        return scale.reshape(-1, *([1] * (weight.dim() - 1)))
    c_in, c_out_per_group, *kernel = weight.shape
    per_group = scale.reshape(groups, 1, c_out_per_group, *([1] * len(kernel)))
    ones = [1] * len(kernel)
    return per_group.expand(groups, c_in // groups, c_out_per_group, *ones).reshape(c_in, c_out_per_group, *ones)


@dataclass
class Plan:
    """What to change on the copy: layer weights, BN modules to remove, forwards to rewrite."""

    layers: dict[str, LayerFold] = field(default_factory=dict)
    removed: dict[str, BnForm] = field(default_factory=dict)  # BN module path → its form
    rewritten: dict[str, fx.Graph] = field(default_factory=dict)  # module path → its forward without folded batch_norms
    # drill-down: a folded model's module → the original's module whose output it now computes; None: not comparable
    equivalent: dict[str, str | None] = field(default_factory=dict)


def bn_scale_shift_of(stats: BnStats, *, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of an eval-mode BN in float64; γ=1, β=0 when it has no affine parameters.

    Raises ``BnexportError`` naming the BN when its running variance gives NaN or ∞.
    """
    mean, var = stats.mean.detach().double(), stats.var.detach().double()
    problem = invalid_statistics(var, stats.eps)
    if problem:
        raise BnexportError(f"BatchNorm '{name}': {problem}; refusing to fold a BN that outputs NaN or inf")
    gamma = stats.weight.detach().double() if stats.weight is not None else torch.ones_like(mean)
    beta = stats.bias.detach().double() if stats.bias is not None else torch.zeros_like(mean)
    return bn_scale_shift(gamma, beta, mean, var, stats.eps)


def output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def pads_zeros(conv: nn.Module) -> bool:
    """True when the conv adds zeros around its input (the default ``padding_mode='zeros'`` with padding > 0,
    or 'SAME' padding computed at each call)."""
    return pads_same_dynamically(conv) or (conv.padding_mode == "zeros" and any(conv._reversed_padding_repeated_twice))


class ModuleFolder:
    """Decides every site of an analysed module, in graph order, and builds the ``Plan``."""

    def __init__(self, analysis: Analysis, example: tuple[tuple, dict] | None):
        self.analysis = analysis
        self.example = example
        self.plan = Plan()
        self._observation: Observation | None = None
        self._forms: dict[int, BnForm] = {}
        self._owner_graphs: dict[str, fx.Graph | str] = {}

    # sites --------------------------------------------------------------------------------

    def site(self, node: fx.Node, part: Part) -> Site | None:
        if node.op == "call_module" and is_batchnorm(part.modules[node.target]):
            module = part.modules[node.target]
            if id(module) not in self._forms:
                self._forms[id(module)] = bn_form(module)
            return Site(part.full(node.target), node, part, module, self._forms[id(module)])
        if node.op == "call_function" and node.target is F.batch_norm:
            return self._functional_site(node, part)
        return None

    def _functional_site(self, node: fx.Node, part: Part) -> Site:
        arguments = batch_norm_arguments(node)
        mean = arguments["running_mean"]
        where = part.full(mean.target) if isinstance(mean, fx.Node) and mean.op == "get_attr" else part.full(node.name)
        label = f"F.batch_norm({where})"
        stack = node.meta.get("nn_module_stack") or {}
        owner = part.full(list(stack)[-1]) if stack else part.path
        tensors = {k: _attr(part.root, arguments[k]) for k in ("running_mean", "running_var", "weight", "bias")}
        if arguments["training"] is not False or arguments["running_mean"] is None:
            form = BnForm(reason="F.batch_norm with batch statistics (training=True or no running statistics)",
                          reason_code="training_mode")
        elif tensors["running_mean"] is None or tensors["running_var"] is None or not isinstance(arguments["eps"], float) \
                or any(arguments[k] is not None and tensors[k] is None for k in ("weight", "bias")):
            form = BnForm(reason="F.batch_norm whose statistics are computed, not a module's tensors", reason_code="not_constant")
        else:
            form = BnForm(BnStats(tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                                  arguments["eps"]))
        return Site(label, node, part, None, form, owner=owner)

    # decisions ----------------------------------------------------------------------------

    def decide(self, site: Site) -> FoldRecord:
        if site.form.reason:
            return _kept(site, site.form.reason_code, site.form.reason)
        if site.module is not None:
            shared = self._shared(site.module)
            if shared:
                return _kept(site, *shared)
        reasons: list[tuple[str, str]] = []
        producer = self._upstream(site.input, site.part)
        layer = self._layer(producer, site.part)
        reshaped = False
        if layer is None and site.module is not None:  # Linear → flatten → BN1d (LeViT's LinearNorm)
            source = self._before_reshapes(producer)
            if source is not producer and layer_kind(self._layer(source, site.part)) == "linear":
                producer, layer, reshaped = source, self._layer(source, site.part), True
        if layer is not None:
            why = self._after_reason(producer, layer, site, reshaped=reshaped) or self._layer_reason(layer)
            if why is None:
                return self._fold_after(site, producer, layer, reshaped=reshaped)
            reasons.append(why)
        elif (split := split_of(producer)) is not None:  # BN after a concatenation or a sum of layers
            why, branches = split_reason(self, site, split)
            if why is None:
                return fold_split(self, site, split, branches)
            reasons.append(why)
        elif _is_layer_call(producer, site.part):
            reasons.append(("unsupported_layer", f"input comes from {_describe(producer, site.part)}, a layer subclass "
                                                 f"with its own forward, which may not compute w ⊛ x + b with its weight"))
        else:
            reasons.append(("no_linear_neighbour", f"input comes from {_describe(producer, site.part)}, "
                                                   f"not a Conv, ConvTranspose or Linear"))
        feed, users = self._downstream(site.node, site.part)
        pad = self._pad_before_layer(feed, users, site.part)
        if pad is not None:
            feed, users = users[0], list(users[0].users)
        if site.form.remainder is not None:
            reasons.append(("no_linear_neighbour", "its forward goes on after normalising (e.g. an activation), "
                                                   "so it folds only into a layer before it"))
        elif len(users) == 1 and self._layer(users[0], site.part) is not None:
            consumer = users[0]
            layer = self._layer(consumer, site.part)
            why = self._before_reason(site, feed, consumer, layer, pad=pad) or self._layer_reason(layer)
            if why is None:
                if pad and feed.op == "call_module":  # the pad module now pads un-normalised values
                    self.plan.equivalent[site.part.full(feed.target)] = None
                return self._fold_before(site, consumer, layer, through="Pad" if pad else None)
            reasons.append(why)
        elif len(users) != 1:
            # several users are what stops the fold only when one of them is a layer it could fold into
            into_layer = any(self._layer(user, site.part) is not None for user in users)
            reasons.append(("multiple_consumers" if into_layer else "no_linear_neighbour",
                            "its output feeds several nodes" if users else "its output is unused"))
        else:
            reasons.append(("no_linear_neighbour", f"its output goes to {_describe(users[0], site.part)}, not a Conv or Linear"))
        code = next((c for c, _ in reasons if c != "no_linear_neighbour"), "no_linear_neighbour")
        return _kept(site, code, "; ".join(sentence for _, sentence in reasons))

    def _fold_after(self, site: Site, producer: fx.Node, layer: nn.Module, *, reshaped: bool = False) -> FoldRecord:
        if site.owner is not None and not self._remove_call(site):
            return _kept(site, "untraceable", self._owner_graphs[site.owner])
        path = site.part.full(producer.target)
        scale, shift = bn_scale_shift_of(site.form.stats, name=site.label)
        self._pending(path, layer).after(scale, shift)
        if site.form.remainder is None:
            site.node.replace_all_uses_with(site.input)
            site.part.graph.erase_node(site.node)
        if site.module is not None:
            self.plan.removed[site.label] = site.form
        pure_module = site.module is not None and site.form.remainder is None and not reshaped
        self.plan.equivalent[path] = site.label if pure_module else None
        return FoldRecord(site.label, FOLDED, folded_into=path, position="after")

    def _fold_before(self, site: Site, consumer: fx.Node, layer: nn.Module, *, through: str | None = None) -> FoldRecord:
        if site.owner is not None and not self._remove_call(site):
            return _kept(site, "untraceable", self._owner_graphs[site.owner])
        path = site.part.full(consumer.target)
        scale, shift = bn_scale_shift_of(site.form.stats, name=site.label)
        self._pending(path, layer).before(scale, shift)
        next(iter(site.node.users)).replace_input_with(site.node, site.input)
        site.part.graph.erase_node(site.node)
        if site.module is not None:
            self.plan.removed[site.label] = site.form
            self.plan.equivalent[site.label] = None  # the identity left there outputs the un-normalised input
        return FoldRecord(site.label, FOLDED, folded_into=path, position="before", through=through)

    def _pending(self, path: str, layer: nn.Module) -> LayerFold:
        if path not in self.plan.layers:
            bias = layer.bias.detach().double() if layer.bias is not None else None
            self.plan.layers[path] = LayerFold(layer, layer_kind(layer), bias)
        return self.plan.layers[path]

    def _remove_call(self, site: Site) -> bool:
        """Drop an F.batch_norm call from its owner's own forward; False (with the reason stored) when it cannot be."""
        owner = site.owner
        if owner not in self._owner_graphs:
            module = self.analysis.module.get_submodule(owner)
            try:
                self._owner_graphs[owner] = ChildrenAsLeaves().trace(module)
            except Exception as err:  # fx raises many types for untraceable Python
                from ..errors import first_line

                self._owner_graphs[owner] = (f"the forward of {module_label(module, owner)} that calls it cannot be traced "
                                             f"on its own: {first_line(err)}")
        graph = self._owner_graphs[owner]
        if isinstance(graph, str):
            return False
        module = self.analysis.module.get_submodule(owner)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is F.batch_norm:
                mean = _attr(module, batch_norm_arguments(node)["running_mean"])
                if mean is site.form.stats.mean:
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    graph.owning_module = module
                    graph.eliminate_dead_code()
                    self.plan.rewritten[owner] = graph
                    return True
        self._owner_graphs[owner] = f"the batch_norm call is not in the forward of {module_label(module, owner)} itself"
        return False

    # reasons --------------------------------------------------------------------------------

    def _passes_through(self, node, part: Part) -> bool:
        """A module that is the identity in eval mode: nn.Identity, or Dropout that is not training."""
        if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        module = part.modules[node.target]
        return type(module) is nn.Identity or (isinstance(module, nn.modules.dropout._DropoutNd) and not module.training)

    def _upstream(self, node, part: Part):
        """What feeds ``node``, past identities that feed nothing else (ONNX exports drop them too)."""
        while self._passes_through(node, part) and len(node.users) == 1:
            node = node.args[0]
        return node

    def _downstream(self, node: fx.Node, part: Part) -> tuple[fx.Node, list[fx.Node]]:
        """(the last node of ``node``'s single-user chain of identities, that node's users)."""
        users = list(node.users)
        while len(users) == 1 and self._passes_through(users[0], part):
            node = users[0]
            users = list(node.users)
        return node, users

    def _pad_before_layer(self, feed: fx.Node, users: list[fx.Node], part: Part) -> str | None:
        """The mode of a pad that is ``feed``'s one user and feeds nothing but a layer (BN → pad → layer), or None."""
        if len(users) != 1 or users[0].args[:1] != (feed,) or len(users[0].users) != 1:
            return None
        return _pad_mode(users[0], part) if self._layer(next(iter(users[0].users)), part) is not None else None

    def _before_reshapes(self, node):
        """What feeds ``node`` through a single-user chain of reshapes (flatten, reshape, view), or ``node``."""
        while (isinstance(node, fx.Node) and len(node.users) == 1 and node.args
               and ((node.op == "call_method" and node.target in _RESHAPE_METHODS)
                    or (node.op == "call_function" and node.target in (torch.flatten, torch.reshape)))):
            node = node.args[0]
        return node

    def _layer(self, node, part: Part) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            module = part.modules[node.target]
            if layer_kind(module) is not None:
                return module
        return None

    def _shared(self, module: nn.Module) -> tuple[str, str] | None:
        """Why folding into (or removing) this module would change another site, or None."""
        analysis = self.analysis
        path = analysis.path(module)
        name = f"{type(module).__name__} '{path}'"
        calls = analysis.calls[id(module)]
        if len(analysis.paths[id(module)]) > 1:
            return "multiple_consumers", f"the {name} is registered at {len(analysis.paths[id(module)])} paths"
        if calls > 1:
            return "multiple_consumers", f"the {name} is called at {calls} sites; its weights serve all of them"
        own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if any(analysis.tensor_slots[id(t)] > 1 or id(t) in analysis.read_directly for t in own):
            return "multiple_consumers", f"a tensor of the {name} is also used elsewhere"
        if analysis.untraced and self.example is not None:
            observation = self._observe()
            caller = analysis.caller[id(module)]
            expected = observation.calls[id(caller.root)] if caller.path else 1
            if observation.calls[id(module)] > expected:
                return "multiple_consumers", f"the {name} is also called outside the traced forward of its parent"
        return None

    def _layer_reason(self, layer: nn.Module) -> tuple[str, str] | None:
        name = f"{type(layer).__name__} '{self.analysis.path(layer)}'"
        if parametrize.is_parametrized(layer) or layer._forward_pre_hooks:
            return "not_constant", f"the {name} computes its weight at each call (a parametrization or pre-hook)"
        return self._shared(layer)

    def _observe(self) -> Observation:
        if self._observation is None:
            self._observation = observe(self.analysis.module, *self.example)
        return self._observation

    def _rank(self, layer: nn.Module, which: int) -> int | None:
        """Rank of a Linear's input (which=0) or output (which=1) on the example, or None without one."""
        if self.example is None:
            return None
        return self._observe().ranks.get(id(layer), (None, None))[which]

    def _after_reason(self, layer_node: fx.Node, layer: nn.Module, site: Site, *, reshaped: bool = False) -> tuple[str, str] | None:
        """Why ``bn(layer(x))`` cannot be folded into the layer, or None when it can.

        ``reshaped``: the Linear's output reaches the BN through reshapes only. Reshapes keep
        row-major order, so when both ends have C as their last axis, each row the BN sees is
        one of the Linear's: on a 2-D BN input, channel c is the Linear's feature c.
        """
        name = type(layer).__name__
        if len(_value_users(layer_node)) > 1:
            return "multiple_consumers", f"the {name}'s output feeds more than the BN"
        channels = site.form.stats.num_features
        if output_channels(layer) != channels:
            return "shape_mismatch", f"the {name} has {output_channels(layer)} output channels, the BN {channels}"
        if reshaped:
            rank = self._rank(site.module, 0)
            if rank != 2:
                return "shape_mismatch", ("Linear → reshape → BN is exact only when the BN's input is 2-D"
                                          + ("; pass example_input so the shapes are known" if rank is None else f", not {rank}-D"))
        elif layer_kind(layer) == "linear":
            rank = self._rank(layer, 1)
            if rank is None:
                return "shape_mismatch", "Linear → BN is exact only on 2-D input; pass example_input so the shapes are known"
            if rank != 2:
                return "shape_mismatch", (f"Linear → BN on {rank}-D input: BN normalises axis 1, "
                                          f"the Linear's features are the last axis")
        elif _unbatched(self._rank(layer, 1), layer):
            return "shape_mismatch", f"the {name} runs on unbatched input: its channels are axis 0, the BN normalises axis 1"
        return None

    def _before_reason(self, site: Site, feed: fx.Node, layer_node: fx.Node, layer: nn.Module, *,
                       pad: str | None = None) -> tuple[str, str] | None:
        """Why ``layer(bn(x))`` cannot be folded into the layer, or None when it can.

        ``pad``: the mode of a pad between them. Reflect, replicate and circular padding copy
        normalised values (``maths``, "Through a Pad"); a constant pad writes values the BN
        never touched.
        """
        name = type(layer).__name__
        kind = layer_kind(layer)
        channels = site.form.stats.num_features
        if kind == "transposed":
            return "unsupported_layer", f"it precedes a {name}, whose border outputs sum fewer taps, so the shift is not uniform"
        if not layer_node.args or layer_node.args[0] is not feed or len(layer_node.args) > 1 or layer_node.kwargs:
            return "no_linear_neighbour", f"it feeds the {name} other than as its input"
        if pad not in (None, *_COPYING_PADS):
            return "zero_padding", (f"it precedes a {pad} pad and a {name}: the padded border is not shifted, "
                                    f"so the fold is inexact")
        if pad is not None:
            why = _pad_axes_reason(feed, site.part, spatial=layer.weight.dim() - 2 if kind == "conv" else 0)
            if why is not None:
                return why
        if kind == "conv":
            if _unbatched(self._rank(layer, 0), layer):
                return "shape_mismatch", f"the {name} runs on unbatched input: its channels are axis 0, the BN normalises axis 1"
            if pads_zeros(layer):
                return "zero_padding", (f"it precedes a {name} with zero padding: the padded border is not shifted, "
                                        f"so the fold is inexact")
            if layer.in_channels != channels:
                return "shape_mismatch", f"the {name} has {layer.in_channels} input channels, the BN {channels}"
            return None
        if layer.in_features != channels:
            return "shape_mismatch", f"the Linear has {layer.in_features} input features, the BN {channels}"
        rank = self._rank(layer, 0)
        if rank is None:
            return "shape_mismatch", "BN → Linear is exact only on 2-D input; pass example_input so the shapes are known"
        if rank != 2:
            return "shape_mismatch", f"BN → Linear on {rank}-D input: BN normalises axis 1, the Linear reads the last axis"
        return None


_RESHAPE_METHODS = ("flatten", "reshape", "view")
_COPYING_PADS = ("reflect", "replicate", "circular")
_PAD_MODULES = ((nn.modules.padding._ReflectionPadNd, "reflect"), (nn.modules.padding._ReplicationPadNd, "replicate"),
                (nn.modules.padding._CircularPadNd, "circular"), (nn.modules.padding._ConstantPadNd, "constant"))


def _pad_mode(node, part: Part) -> str | None:
    """The mode of a pad of spatial axes (F.pad, or a padding module), or None when ``node`` is none.

    F.pad's non-constant modes pad only the axes after the channels; a constant one may pad
    any axis, but it is kept whichever it pads."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    if node.op == "call_module":
        module = part.modules[node.target]
        return next((mode for cls, mode in _PAD_MODULES if type(module).forward is cls.forward and isinstance(module, cls)),
                    None)
    if node.op == "call_function" and node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        return mode if isinstance(mode, str) else None
    return None


def _unbatched(rank: int | None, conv: nn.Module) -> bool:
    """Whether the example ran ``conv`` without a batch axis (Conv1d on (C, L)); unknown without one."""
    return rank is not None and rank != conv.weight.dim()


def _pad_axes_reason(pad: fx.Node, part: Part, *, spatial: int) -> tuple[str, str] | None:
    """Why a pad between the BN and the layer does not commute with the BN, or None when it does.

    The BN commutes with a pad of the layer's ``spatial`` last axes only. F.pad and the padding
    modules pad as many last axes as their amounts have pairs, so a longer tuple reaches the
    channel axis (a 6-tuple on a 4-D tensor): even with the channel count unchanged, as with
    (1, -1), channel c then holds another channel's values, which channel c's scale does not fit.
    """
    if pad.op == "call_module":
        amounts = getattr(part.modules[pad.target], "padding", None)
    else:
        amounts = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
    if not isinstance(amounts, (tuple, list)) or not all(type(a) is int for a in amounts):
        return "not_constant", "the pad before the layer has amounts computed at each call"
    if any(amounts[2 * spatial:]):
        return "shape_mismatch", (f"the pad before the layer pads {len(amounts) // 2} axes, beyond the layer's "
                                  f"{spatial} spatial one{'s' if spatial != 1 else ''}: it moves values across channels")
    return None


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users that read ``node``'s values, not only its shape (``y.reshape_as(node)``, ``node.size()``)."""

    def shape_only(user: fx.Node) -> bool:
        if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
            return user.args[0] is not node
        if user.op == "call_method" and user.target in ("size", "dim"):
            return True
        return (user.op == "call_function" and user.target is getattr
                and user.args[1] in ("shape", "ndim", "dtype", "device"))

    return [user for user in node.users if not shape_only(user)]


def _is_layer_call(node, part: Part) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(part.modules[node.target], LAYER_TYPES)


def _kept(site: Site, code: str, reason: str) -> FoldRecord:
    return FoldRecord(site.label, KEPT, reason=reason, reason_code=code)


def _attr(root: nn.Module, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = root
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _describe(node, part: Part) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return type(part.modules[node.target]).__name__
    if node.op == "placeholder":
        return "the module's input" if not part.path else f"the input of '{part.path}'"
    if node.op == "output":
        return "the module's output" if not part.path else f"the output of '{part.path}'"
    return getattr(node.target, "__name__", str(node.target))
