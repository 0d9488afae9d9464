"""Numerical parity: runners for each runtime, and the comparison that knows no runtime.

A comparison passes when ``max|candidate − reference| <= atol + rtol · scale``, where
``scale = max|reference|``. Measuring error against the output's scale, rather than
element by element, keeps the check honest for nets whose logits are large and for
logits that happen to sit near zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DEFAULT_TOLERANCE, Tolerance
from .errors import BnexportError, first_line
from .tables import format_table

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class ParityResult:
    """One candidate against the reference on the same seeded input."""

    name: str
    max_abs: float
    mean_abs: float
    median_abs: float
    scale: float  # max|reference|
    max_rel: float  # max_abs / scale
    top1_agreement: float  # fraction of rows whose argmax matches
    atol: float
    rtol: float
    passed: bool
    required_rtol: float  # the smallest rtol that passes at this atol

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict:
        return asdict(self)


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> ParityResult:
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise BnexportError(f"{name}: output shape {candidate.shape} differs from the reference's {reference.shape}")
    diff = np.abs(candidate - reference)
    finite = bool(np.isfinite(candidate).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    if reference.ndim >= 2 and reference.shape[0] > 0:
        flat_ref, flat_cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
        top1 = float((flat_ref.argmax(1) == flat_cand.argmax(1)).mean())
    else:
        top1 = 1.0
    passed = finite and max_abs <= tolerance.atol + tolerance.rtol * scale
    return ParityResult(
        name=name,
        max_abs=max_abs if finite else float("inf"),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        median_abs=float(np.median(diff)) if diff.size else 0.0,
        scale=scale,
        max_rel=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        top1_agreement=top1,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        passed=passed,
        required_rtol=max(0.0, max_abs - tolerance.atol) / scale if scale > 0 else 0.0,
    )


@dataclass
class ParityReport:
    reference: str
    input_shape: list[int]
    seed: int
    results: list[ParityResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.results)

    def to_json(self) -> dict:
        def finite(value: float):  # JSON has no infinity
            return value if np.isfinite(value) else None

        return {
            "reference": self.reference,
            "input_shape": self.input_shape,
            "seed": self.seed,
            "passed": self.passed,
            "results": [{k: finite(v) if isinstance(v, float) else v for k, v in r.to_json().items()} for r in self.results],
        }

    def table(self) -> str:
        rows = [("comparison", "max |Δ|", "max |Δ|/scale", "top-1 agree", "verdict")]
        for r in self.results:
            rows.append((r.name, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.top1_agreement:.1%}", "ok" if r.passed else "FAIL"))
        tol = self.results[0] if self.results else None
        footer = f"reference: {self.reference}; pass when max |Δ| <= atol + rtol·max|ref|"
        if tol:
            footer += f" (atol={tol.atol:g}, rtol={tol.rtol:g})"
        return format_table(rows) + "\n" + footer


def run_parity(
    reference: Runner,
    candidates: dict[str, Runner],
    inputs: np.ndarray,
    *,
    reference_name: str = "reference",
    seed: int = 0,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> ParityReport:
    expected = reference(inputs)
    report = ParityReport(reference=reference_name, input_shape=list(inputs.shape), seed=seed)
    for name, runner in candidates.items():
        report.results.append(compare(name, expected, runner(inputs), tolerance=tolerance))
    return report


def seeded_input(shape: tuple[int, ...], *, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard-normal input that depends only on (shape, seed): reproducible anywhere."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# Runners: each takes a float32 numpy batch and returns the first output as numpy.

def eager_runner(module: torch.nn.Module) -> Runner:
    def run(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(inputs)).numpy()

    return run


def torchscript_runner(path: str | Path) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    return eager_runner(scripted)


def exported_program_runner(path: str | Path) -> Runner:
    program = torch.export.load(str(path))
    return eager_runner(program.module())


def ort_session(path_or_bytes: str | Path | bytes, *, optimize: bool, providers: list | None = None,
                threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph types
        label = "model" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        raise BnexportError(f"{label}: ONNX Runtime cannot load it: {first_line(err)}") from None


def onnxruntime_runner(path_or_bytes: str | Path | bytes, *, optimize: bool = False, providers: list[str] | None = None,
                       threads: int | None = None) -> Runner:
    """ONNX Runtime; ``optimize=False`` disables its graph fusions so they cannot hide a bad fold."""
    session = ort_session(path_or_bytes, optimize=optimize, providers=providers, threads=threads)
    input_name = session.get_inputs()[0].name

    def run(inputs: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {input_name: inputs})[0]
        except Exception as err:  # ORT's own error types: a shape or type the model does not accept
            label = "model" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
            raise BnexportError(f"{label}: ONNX Runtime cannot run it on input of shape {list(inputs.shape)}: "
                                f"{first_line(err)}") from None

    return run


def onnxruntime_cuda_runner(path: str | Path, *, optimize: bool = False) -> Runner | None:
    """ONNX Runtime on its CUDA execution provider, or None where this onnxruntime cannot run it.

    TF32 is turned off: it rounds conv inputs to 10 mantissa bits, an error the float32
    tolerance is not meant to absorb. A session that silently fell back to the CPU does not count.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    for provider_options in ({"use_tf32": "0"}, {}):  # older releases do not know use_tf32 (and had TF32 off)
        try:
            session = ort_session(path, optimize=optimize, providers=[("CUDAExecutionProvider", provider_options)])
        except BnexportError:  # missing CUDA libraries or an unknown option: try the next, then give up
            continue
        if session.get_providers()[0] == "CUDAExecutionProvider":
            input_name = session.get_inputs()[0].name
            return lambda inputs: session.run(None, {input_name: inputs})[0]
    return None


# The per-layer drill-down: when two models disagree, name the first layer that does. -------

@dataclass
class Divergence:
    """The first intermediate tensor, in the candidate's order, that fails the tolerance."""

    layer: str  # the candidate's node that computes it
    tensor: str  # the tensor or fx node compared
    compared: int  # how many intermediate tensors were compared up to and including this one
    result: ParityResult

    def to_json(self) -> dict:
        return {"layer": self.layer, "tensor": self.tensor, "compared": self.compared, "result": self.result.to_json()}


def first_divergence(pairs, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> Divergence | None:
    """``pairs`` yields (layer, tensor, reference, candidate) in execution order; the first that fails."""
    for compared, (layer, tensor, reference, candidate) in enumerate(pairs, start=1):
        if np.shape(reference) != np.shape(candidate):
            continue
        result = compare(tensor, reference, candidate, tolerance=tolerance)
        if not result.passed:
            return Divergence(layer=layer, tensor=tensor, compared=compared, result=result)
    return None


def onnx_intermediates(model, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor that shape inference can type, computed by ORT with graph optimisations off."""
    import onnx

    from .export import onnx_bytes

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    probed = onnx.ModelProto()
    probed.CopyFrom(inferred)
    existing = {o.name for o in probed.graph.output}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
    for info in inferred.graph.value_info:
        if info.name not in existing and info.type.tensor_type.elem_type in float_types:
            probed.graph.output.append(info)
    session = ort_session(onnx_bytes(probed), optimize=False)
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: inputs})
    return dict(zip(names, values))


def onnx_drilldown(reference, candidate, inputs: np.ndarray, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> Divergence | None:
    """Compare every tensor the two ONNX graphs share by name, in the candidate's node order."""
    expected = onnx_intermediates(reference, inputs)
    got = onnx_intermediates(candidate, inputs)
    pairs = ((node.name or node.op_type, name, expected[name], got[name])
             for node in candidate.graph.node for name in node.output if name in expected and name in got)
    return first_divergence(pairs, tolerance=tolerance)


def module_intermediates(module: torch.nn.Module, inputs: tuple[tuple, dict], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Every module's tensor output on ``inputs`` ((args, kwargs)), by module path, in the order they finish.

    A module called more than once gets ``path#2``, ``path#3``... for its later calls. The random
    generator is reseeded first, so Dropout in train mode draws the same masks in both models.
    """
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
                     seed: int = 0) -> Divergence | None:
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
