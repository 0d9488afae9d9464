"""Numerical parity: the comparison, which knows no runtime, and the report it fills.

A comparison passes when ``max|candidate − reference| <= atol + rtol · scale``, where
``scale = max|reference|``. Measuring error against the output's scale, rather than
element by element, keeps the check honest for nets whose logits are large and for
logits that happen to sit near zero. A model with several outputs is compared output by
output, each against its own scale.

A runner (``bnexport.parity.runners``) takes one array (fed to a model's only input) or a
dict of named feeds, and returns an array (the first output) or a dict of every output by
name. When two models disagree, ``bnexport.parity.divergence`` names the layer where they part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, INPUT_NAME, Tolerance, tolerance_for
from ..errors import BnexportError
from ..tables import format_table

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Runner = Callable[[np.ndarray | Feeds], np.ndarray | Outputs]


def tolerance_given(dtype_name: str = "float32", *, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The tolerance of a model computing in ``dtype_name`` (``tolerance_for``), with ``atol`` and ``rtol`` where given."""
    default = tolerance_for(dtype_name)
    return Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)


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
    """Every candidate's results against one reference on one seeded input (parity.json, a fold's check)."""

    reference: str
    input_shape: list  # the first input's shape; a torch module fold with several inputs lists each one's
    seed: int
    results: list[ParityResult] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)  # name, dtype, shape (and guessed_dims) of every input fed
    # A torch fold that missed the tolerance but is exact: the float64 evidence, one row per output
    # (see ``bnexport.fold.torch_module``); the report then passes although a result failed.
    within_own_rounding: list[dict] | None = None

    @property
    def passed(self) -> bool:
        return all(self.results) or self.within_own_rounding is not None

    def worst(self) -> ParityResult | None:
        """The failing result furthest over its tolerance, or, when all pass, the largest relative error."""
        failing = [r for r in self.results if not r.passed] or self.results
        return max(failing, key=lambda r: r.max_rel, default=None)

    def to_json(self) -> dict:
        def finite(value: float):  # JSON has no infinity
            return value if np.isfinite(value) else None

        data = {
            "reference": self.reference,
            "input_shape": self.input_shape,
            "inputs": self.inputs,
            "seed": self.seed,
            "passed": self.passed,
            "results": [{k: finite(v) if isinstance(v, float) else v for k, v in r.to_json().items()} for r in self.results],
        }
        if self.within_own_rounding is not None:
            data["within_own_rounding"] = self.within_own_rounding
        return data

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
    seed: int = DEFAULT_SEED,
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


def seeded_input(shape: tuple[int, ...], *, seed: int = DEFAULT_SEED, dtype=np.float32) -> np.ndarray:
    """Standard-normal input that depends only on (shape, seed): reproducible anywhere."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
