"""The per-layer drill-down: when two models disagree, name the layer where they start to.

``first_divergence`` walks intermediate tensors in execution order and names the first whose
error jumps; ``onnx_drilldown`` feeds it every tensor two ONNX graphs share by name, and
``module_drilldown`` every module output of two torch modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, MACHINE_EPSILON, Tolerance
from .compare import Feeds, ParityResult, compare
from .runners import onnxruntime_runner

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch

# A layer is named only when its error jumps by this factor over every earlier tensor's (and over
# one rounding of its dtype): a bug does that; rounding that accumulates layer by layer does not.
DIVERGENCE_MARGIN = 10.0


@dataclass
class Divergence:
    """The first intermediate tensor, in the candidate's order, whose error jumps past the tolerance."""

    layer: str  # the candidate's node that computes it
    tensor: str  # the tensor or fx node compared
    compared: int  # how many intermediate tensors were compared up to and including this one
    result: ParityResult

    def to_json(self) -> dict:
        return {"layer": self.layer, "tensor": self.tensor, "compared": self.compared, "result": self.result.to_json()}


def first_divergence(pairs, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> Divergence | None:
    """``pairs`` yields (layer, tensor, reference, candidate) in execution order; the first that diverges.

    A tensor diverges when it fails ``tolerance`` and its relative error (max |Δ| / max|ref|) is
    more than ``DIVERGENCE_MARGIN`` times both the largest relative error of every tensor before it
    and its dtype's machine epsilon. A wrong fold makes its layer's error jump by orders of
    magnitude; a tolerance too tight for the dtype fails at the first layer by a few ε, and
    errors that grow by rounding grow smoothly. None means no single layer diverges: the
    final error accumulated.
    """
    worst = 0.0
    for compared, (layer, tensor, reference, candidate) in enumerate(pairs, start=1):
        if np.shape(reference) != np.shape(candidate):
            continue
        result = compare(tensor, reference, candidate, tolerance=tolerance)
        floor = max(worst, MACHINE_EPSILON.get(np.asarray(candidate).dtype.name, 0.0))
        if not result.passed and result.max_rel > DIVERGENCE_MARGIN * floor:
            return Divergence(layer=layer, tensor=tensor, compared=compared, result=result)
        if np.isfinite(result.max_rel):
            worst = max(worst, result.max_rel)
    return None


def onnx_intermediates(model, inputs: np.ndarray | Feeds) -> dict[str, np.ndarray]:
    """Every float tensor that shape inference can type, computed by ORT with graph optimisations off."""
    import onnx

    from .inputs import input_specs

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    probed = onnx.ModelProto()
    probed.CopyFrom(inferred)
    existing = {o.name for o in probed.graph.output}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for info in inferred.graph.value_info:
        if info.name not in existing and info.type.tensor_type.elem_type in float_types:
            probed.graph.output.append(info)
    run = onnxruntime_runner(probed.SerializeToString(), optimize=False)
    return run(inputs if isinstance(inputs, dict) else {input_specs(probed)[0].name: inputs})


def onnx_drilldown(reference, candidate, inputs: np.ndarray | Feeds, *,
                   tolerance: Tolerance = DEFAULT_TOLERANCE) -> Divergence | None:
    """Compare every tensor the two ONNX graphs share by name, in the candidate's node order."""
    expected = onnx_intermediates(reference, inputs)
    got = onnx_intermediates(candidate, inputs)
    pairs = ((node.name or node.op_type, name, expected[name], got[name])
             for node in candidate.graph.node for name in node.output if name in expected and name in got)
    return first_divergence(pairs, tolerance=tolerance)


def module_intermediates(module: torch.nn.Module, inputs: tuple[tuple, dict], *, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Every module's tensor output on ``inputs`` ((args, kwargs)), by module path, in the order they finish.

    A module called more than once gets ``path#2``, ``path#3``... for its later calls. The random
    generator is reseeded first, so Dropout in train mode draws the same masks in both models.
    """
    import torch

    values: dict[str, np.ndarray] = {}
    handles = []

    def record(path):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                key, index = path, 1
                while key in values:
                    index += 1
                    key = f"{path}#{index}"
                values[key] = output.detach().to(device="cpu", dtype=torch.float64).numpy()
        return hook

    for path, sub in module.named_modules():
        handles.append(sub.register_forward_hook(record(path or "(model)")))
    args, kwargs = inputs
    devices = sorted({t.device.index or 0 for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return values


def module_drilldown(reference: torch.nn.Module, candidate: torch.nn.Module, inputs: tuple[tuple, dict], *,
                     equivalent: dict[str, str | None] | None = None, tolerance: Tolerance = DEFAULT_TOLERANCE,
                     seed: int = DEFAULT_SEED) -> Divergence | None:
    """Compare module outputs in the candidate's order; ``equivalent`` maps a candidate module to the reference
    module whose output it now computes (a layer that absorbed the BN after it), or to None where no
    reference module's output is comparable (a BN removed before its layer)."""
    equivalent = equivalent or {}
    expected = module_intermediates(reference, inputs, seed=seed)
    got = module_intermediates(candidate, inputs, seed=seed)
    pairs = []
    for key, value in got.items():
        path, _, call = key.partition("#")
        source = equivalent.get(path, path)
        if source is None:
            continue
        source_key = f"{source}#{call}" if call else source
        if source_key in expected:
            pairs.append((path, source, expected[source_key], value))
    return first_divergence(pairs, tolerance=tolerance)
