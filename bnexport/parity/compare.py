"""Numerical parity: runners for each runtime, and the comparison that knows no runtime.

A comparison passes when ``max|candidate − reference| <= atol + rtol · scale``, where
``scale = max|reference|``. Measuring error against the output's scale, rather than
element by element, keeps the check honest for nets whose logits are large and for
logits that happen to sit near zero. A model with several outputs is compared output by
output, each against its own scale.

A runner takes one array (fed to a model's only input) or a dict of named feeds, and
returns an array (the first output) or a dict of every output by name. torch is imported
by the torch runners only, so checking ONNX files never loads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import DEFAULT_TOLERANCE, INPUT_NAME, MACHINE_EPSILON, Tolerance
from ..errors import BnexportError, first_line
from ..tables import format_table

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Runner = Callable[[np.ndarray | Feeds], np.ndarray | Outputs]


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
    reference = np.asarray(reference).astype(np.float64)
    candidate = np.asarray(candidate).astype(np.float64)
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


def compare_outputs(name: str, reference, candidate, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> list[ParityResult]:
    """Every output of the candidate against the reference's: by name when both name the same
    outputs, else by position. Each comparison is called ``name`` when there is one output, and
    ``name [output]`` when there are several."""
    expected, got = _as_outputs(reference), _as_outputs(candidate)
    if len(expected) != len(got):
        raise BnexportError(f"{name}: {len(got)} outputs, the reference has {len(expected)}")
    if set(expected) == set(got):
        pairs = [(out, expected[out], got[out]) for out in expected]
    else:
        pairs = [(out, value, other) for (out, value), other in zip(expected.items(), got.values())]
    if len(pairs) == 1:
        return [compare(name, pairs[0][1], pairs[0][2], tolerance=tolerance)]
    return [compare(f"{name} [{out}]", value, other, tolerance=tolerance) for out, value, other in pairs]


def _as_outputs(value) -> Outputs:
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        return {f"output {i}": v for i, v in enumerate(value)}
    return {"output": value}


@dataclass
class ParityReport:
    reference: str
    input_shape: list[int]  # the first input's shape
    seed: int
    results: list[ParityResult] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)  # name, dtype, shape (and guessed_dims) of every input fed

    @property
    def passed(self) -> bool:
        return all(self.results)

    def worst(self) -> ParityResult | None:
        """The failing result furthest over its tolerance, or, when all pass, the largest relative error."""
        failing = [r for r in self.results if not r.passed] or self.results
        return max(failing, key=lambda r: r.max_rel, default=None)

    def to_json(self) -> dict:
        def finite(value: float):  # JSON has no infinity
            return value if np.isfinite(value) else None

        return {
            "reference": self.reference,
            "input_shape": self.input_shape,
            "inputs": self.inputs,
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
        inputs = inputs_text(self.inputs)
        return format_table(rows) + "\n" + footer + ("\n" + inputs if inputs else "")


def inputs_text(inputs: list[dict]) -> str:
    """One line per input fed (a ``Feed.to_json`` each): name, shape, dtype, and the dims that were guessed."""
    lines = []
    for feed in inputs:
        text = f"input {feed['name']}: {'×'.join(map(str, feed['shape'])) or 'scalar'} {feed['dtype']}"
        if feed.get("guessed_dims"):
            text += (f" (dynamic dims {', '.join(map(str, feed['guessed_dims']))} guessed; "
                     f"--input-shape {feed['name']}=... sets them)")
        lines.append(text)
    return "\n".join(lines)


def run_parity(
    reference: Runner,
    candidates: dict[str, Runner],
    inputs: np.ndarray | Feeds,
    *,
    reference_name: str = "reference",
    seed: int = 0,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    described: list[dict] | None = None,
) -> ParityReport:
    """Run every candidate on ``inputs`` (one array, or feeds by input name) and compare each output.

    ``described`` records the inputs in the report (a ``Feed.to_json`` each); by default their
    name, shape and dtype are read off ``inputs``."""
    expected = reference(inputs)
    if described is None:
        feeds = inputs if isinstance(inputs, dict) else {INPUT_NAME: inputs}
        described = [{"name": n, "dtype": _dtype_name(v), "shape": list(np.shape(v))} for n, v in feeds.items()]
    first = next(iter(inputs.values())) if isinstance(inputs, dict) and inputs else inputs
    report = ParityReport(reference=reference_name, input_shape=list(np.shape(first)), seed=seed, inputs=described)
    for name, runner in candidates.items():
        report.results.extend(compare_outputs(name, expected, runner(inputs), tolerance=tolerance))
    return report


def _dtype_name(value) -> str:
    return np.asarray(value).dtype.name


def seeded_input(shape: tuple[int, ...], *, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard-normal input that depends only on (shape, seed): reproducible anywhere."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# Runners ---------------------------------------------------------------------------------

def eager_runner(module) -> Runner:
    """A torch module on CPU. One array, or feeds of one input, go in as its one argument;
    several feeds go in as positional arguments, in order."""
    import torch

    def run(inputs):
        values = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in values))
        if isinstance(result, (tuple, list)):
            return {f"output {i}": r.numpy() for i, r in enumerate(result)}
        return result.numpy()

    return run


def torchscript_runner(path: str | Path) -> Runner:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    return eager_runner(scripted)


def exported_program_runner(path: str | Path) -> Runner:
    import torch

    program = torch.export.load(str(path))
    return eager_runner(program.module())


class NoKernel(BnexportError):
    """ONNX Runtime has no kernel for an op at this dtype, so it cannot run the model at all."""


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
        where = _where(path_or_bytes)
        message = first_line(err)
        missing = "Could not find an implementation for "
        if missing in message:  # e.g. a float64 Conv, or nearly any bfloat16 op on the CPU
            what = message.split(missing, 1)[1]
            raise NoKernel(f"{where}ONNX Runtime has no kernel for {what}, so it cannot run the model to check it; "
                           "convert the model to float32 to check it") from None
        raise BnexportError(f"{where}ONNX Runtime cannot load the model: {message}") from None


def _where(path_or_bytes) -> str:
    """The file an error is about, as its message's prefix; none for a model in memory (the caller names it)."""
    return "" if isinstance(path_or_bytes, bytes) else f"{path_or_bytes}: "


# ONNX element types whose values ORT's numpy bridge cannot carry; they travel as OrtValues.
_BFLOAT16 = "tensor(bfloat16)"


def onnxruntime_runner(path_or_bytes: str | Path | bytes, *, optimize: bool = False, providers: list[str] | None = None,
                       threads: int | None = None) -> Runner:
    """ONNX Runtime; ``optimize=False`` disables its graph fusions so they cannot hide a bad fold.

    Called with one array, it feeds the model's only input and returns the first output (the
    form the export pipeline uses); called with feeds by name, it returns every output by name.
    Feeds are matched to the inputs by name, or by position when the names differ but the counts
    agree (two exports of one model). A floating-point feed is cast to its input's own dtype, so a
    float32 reference and its float16 conversion see the same values.
    """
    session = ort_session(path_or_bytes, optimize=optimize, providers=providers, threads=threads)
    where = _where(path_or_bytes)
    inputs = session.get_inputs()
    outputs = session.get_outputs()

    def run(given):
        single = not isinstance(given, dict)
        if single:
            if len(inputs) != 1:
                raise BnexportError(f"{where}the model has {len(inputs)} inputs; feed each by name")
            given = {inputs[0].name: given}
        feeds = _match_feeds(where, inputs, given)
        try:
            values = _run_session(session, feeds, inputs, outputs)
        except Exception as err:  # ORT's own error types: a shape or type the model does not accept
            shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in feeds.items())
            raise BnexportError(f"{where}ONNX Runtime cannot run the model on input {shapes}: {first_line(err)}") from None
        return values[0] if single else dict(zip((o.name for o in outputs), values))

    return run


def _match_feeds(where: str, inputs, given: Feeds) -> Feeds:
    names = [i.name for i in inputs]
    if set(given) != set(names):
        if len(given) != len(names):
            raise BnexportError(f"{where}the model takes {len(names)} inputs ({', '.join(names)}), "
                                f"but {len(given)} were fed ({', '.join(given)})")
        given = dict(zip(names, given.values()))
    feeds = {}
    for spec in inputs:
        value = np.asarray(given[spec.name])
        wanted = _ort_dtype(spec.type)
        if wanted is not None and value.dtype != wanted and _is_float(value.dtype) and _is_float(wanted):
            value = value.astype(wanted)
        feeds[spec.name] = value
    return feeds


def _ort_dtype(type_text: str) -> np.dtype | None:
    """numpy's dtype for ORT's ``tensor(float16)``-style type, when it has one."""
    from .inputs import numpy_dtype

    name = type_text.removeprefix("tensor(").removesuffix(")")
    name = {"float": "float32", "double": "float64"}.get(name, name)
    try:
        return numpy_dtype(name)
    except TypeError:
        return None


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _run_session(session, feeds: Feeds, inputs, outputs) -> list[np.ndarray]:
    """``session.run``, except with bfloat16 in or out: numpy has no bfloat16, so those values go
    through OrtValues and come back as ``ml_dtypes.bfloat16`` arrays."""
    if not any(spec.type == _BFLOAT16 for spec in (*inputs, *outputs)):
        return session.run(None, feeds)
    import onnxruntime as ort
    from onnx import TensorProto

    values = {}
    for name, value in feeds.items():
        if value.dtype.name == "bfloat16":
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), TensorProto.BFLOAT16)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    results = session.run_with_ort_values([o.name for o in outputs], values)
    return [_bfloat16_array(r) if o.type == _BFLOAT16 else r.numpy() for o, r in zip(outputs, results)]


def _bfloat16_array(value) -> np.ndarray:
    """Copy a CPU OrtValue of bfloat16 out through its raw pointer: its ``numpy()`` refuses the type."""
    import ctypes

    from .inputs import numpy_dtype

    shape = tuple(value.shape())
    count = int(np.prod(shape))
    raw = np.zeros(count, np.uint16)
    if count:
        ctypes.memmove(raw.ctypes.data, value.data_ptr(), 2 * count)
    return raw.view(numpy_dtype("bfloat16")).reshape(shape)


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


# The per-layer drill-down: when two models disagree, name the layer where they start to. ----

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


def module_intermediates(module: torch.nn.Module, inputs: tuple[tuple, dict], *, seed: int = 0) -> dict[str, np.ndarray]:
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
