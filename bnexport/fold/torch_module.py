"""``fold_module``: fold every exact BatchNorm of a torch module, and check the copy against it."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from ..config import DEFAULT_SEED, MACHINE_EPSILON, Tolerance, tolerance_for
from ..errors import BnexportError
from .checks import raise_check_failed
from .fold_report import FoldReport
from .torch_rewrite import rewrite_module

Example = tuple[tuple, dict]  # (args, kwargs) of one call


def fold_module(
    module: torch.nn.Module,
    *,
    check: bool = True,
    example_inputs: torch.Tensor | tuple | list | dict | None = None,
    example_input: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance | None = None,
) -> tuple[torch.nn.Module, FoldReport]:
    """Fold every BatchNorm of an eval-mode module that folds exactly; return (folded copy, report).

    The copy is an instance of the module's own class (see ``torch_rewrite``). The inputs come
    from ``example_inputs``: one tensor, a tuple of positional arguments, or a dict of keyword
    arguments (``example_input`` is the single-tensor form; ``input_shape`` a float input of
    the module's dtype and device). Only their shapes, dtypes and devices are used, plus the
    values of integer and bool inputs. They let Linear ↔ BatchNorm1d fold (exactness depends
    on the tensor's rank), and with ``check`` the copy is compared with the original on seeded
    normal input of the same shapes: input i drawn with seed ``seed + i``, every tensor output
    compared, at ``tolerance`` or, by default, the tolerance of the module's dtype
    (``bnexport.config.tolerance_for``). Integer and bool inputs keep the example's values.
    """
    example = _example(module, example_inputs, example_input, input_shape)
    folded, report, equivalent = rewrite_module(module, example=example)
    if check and report.folded:
        if example is None:
            raise BnexportError("fold_module(check=True) needs example_inputs, example_input or input_shape, or check=False")
        tolerance = tolerance or tolerance_for(module_dtype_name(module, example))
        _check_module(module, folded, report, example, equivalent, seed=seed, tolerance=tolerance)
    return folded, report


def _example(module, example_inputs, example_input, input_shape) -> Example | None:
    given = [v for v in (example_inputs, example_input, input_shape) if v is not None]
    if len(given) > 1:
        raise BnexportError("fold_module: pass one of example_inputs, example_input and input_shape")
    if example_input is not None:
        example_inputs = example_input
    if input_shape is not None:
        reference = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
        example_inputs = torch.zeros(tuple(input_shape), dtype=reference.dtype if reference is not None else torch.float32,
                                     device=reference.device if reference is not None else "cpu")
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise BnexportError(f"fold_module: example_inputs must be a tensor, a tuple or a dict, not {type(example_inputs).__name__}")


def module_dtype_name(module: torch.nn.Module, example: Example) -> str:
    """The floating dtype the module computes in: its first floating parameter's, else its first float input's."""
    for tensor in (*module.parameters(), *module.buffers(), *input_tensors(example)):
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "float32"


def input_tensors(value) -> list[torch.Tensor]:
    """Every tensor in a call's arguments or a module's output, in order (tuples, lists and dict values)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in input_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in input_tensors(v)]
    return []


def map_tensors(example: Example, convert) -> Example:
    """The example's structure (tuples, lists, named tuples, dicts) with each tensor replaced by ``convert(tensor)``,
    called in order."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            return convert(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            items = [walk(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    args, kwargs = example
    return tuple(walk(a) for a in args), {k: walk(v) for k, v in kwargs.items()}


def seeded_inputs(example: Example, *, seed: int) -> Example:
    """The example's structure with each float tensor redrawn from N(0, 1), input i with seed ``seed + i``."""
    counter = iter(range(1 << 30))

    def redraw(value: torch.Tensor) -> torch.Tensor:
        index = next(counter)
        if not value.is_floating_point():
            return value.clone()
        data = np.random.default_rng(seed + index).standard_normal(tuple(value.shape))
        return torch.from_numpy(data).to(dtype=value.dtype, device=value.device)

    return map_tensors(example, redraw)


def run_outputs(module: torch.nn.Module, example: Example, *, seed: int) -> list[torch.Tensor]:
    """Every tensor the module outputs; the random generator is reseeded first, so Dropout in train mode repeats."""
    args, kwargs = example
    devices = sorted({t.device.index or 0 for t in input_tensors(example) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return input_tensors(module(*args, **kwargs))


def _check_module(module, folded, report: FoldReport, example: Example, equivalent: dict, *, seed: int,
                  tolerance: Tolerance) -> None:
    from ..parity.compare import ParityReport, compare
    from ..parity.divergence import module_drilldown

    inputs = seeded_inputs(example, seed=seed)
    expected, got = run_outputs(module, inputs, seed=seed), run_outputs(folded, inputs, seed=seed)
    if len(expected) != len(got):
        raise BnexportError(f"the folded module returns {len(got)} tensors, the original {len(expected)}")
    shapes = [list(t.shape) for t in input_tensors(inputs)]
    parity = ParityReport(reference="unfolded", input_shape=shapes[0] if len(shapes) == 1 else shapes, seed=seed)
    for index, (reference, candidate) in enumerate(zip(expected, got)):
        name = "folded" if len(expected) == 1 else f"folded output {index}"
        parity.results.append(compare(name, _numpy(reference), _numpy(candidate), tolerance=tolerance))
    report.parity = parity
    if not parity.passed and _within_own_rounding(module, report, example, inputs, expected, got, seed=seed):
        return
    if not parity.passed:
        divergence = module_drilldown(module, folded, inputs, equivalent=equivalent, tolerance=tolerance, seed=seed)
        failing = [r for r in parity.results if not r.passed]
        raise_check_failed(report, dataclasses.replace(parity, results=failing + [r for r in parity.results if r.passed]),
                           divergence)


# The float64 fold must match the float64 model to FLOAT64_FOLD_RTOL of its output's scale, or, for a
# model that amplifies rounding by A (its own error in its dtype over that dtype's ε), to 100·A·ε64,
# but never looser than FLOAT64_FOLD_RTOL_MAX: a wrong fold misses by a good part of the scale.
FLOAT64_FOLD_RTOL = 1e-9
FLOAT64_FOLD_RTOL_MAX = 1e-6


def _within_own_rounding(module, report: FoldReport, example: Example, inputs: Example, expected, got, *,
                         seed: int) -> bool:
    """Whether a fold that missed the tolerance is exact, and the miss is the model's own rounding.

    Some models (deep nets with random weights, above all) amplify rounding so much that their
    float32 output is itself far from what the same model computes in float64; the folded copy,
    whose weights are rounded differently, then differs from the unfolded one by as much, and
    no tolerance tells a wrong fold from that. So: the same fold is made on a float64 copy and
    must match it (same BatchNorms folded, to the tolerance above), and the folded
    copy must be no further from the float64 model than twice the unfolded one is. Both hold
    for an exact fold; a wrong one fails the first. ``report.parity`` records the numbers.
    """
    from ..parity.compare import compare

    if module_dtype_name(module, example) == "float64":
        return False
    try:
        model64 = copy.deepcopy(module).double()
        inputs64 = _as_float64(inputs)
        folded64, report64, _ = rewrite_module(model64, example=_as_float64(example))
        exact = run_outputs(model64, inputs64, seed=seed)
        exact_folded = run_outputs(folded64, inputs64, seed=seed)
    except Exception:  # a module that cannot run in float64 (a custom kernel, a dtype-specific op): no verdict
        return False
    if [r.batchnorm for r in report64.folded] != [r.batchnorm for r in report.folded] or len(exact) != len(got):
        return False
    rows = []
    for reference, unfolded, candidate, candidate64 in zip(exact, expected, got, exact_folded):
        ref = _numpy(reference)
        fold_error = compare("float64 fold", ref, _numpy(candidate64)).max_rel
        own_error = compare("unfolded", ref, _numpy(unfolded)).max_rel
        folded_error = compare("folded", ref, _numpy(candidate)).max_rel
        amplification = own_error / MACHINE_EPSILON.get(module_dtype_name(module, example), MACHINE_EPSILON["float32"])
        allowed = min(FLOAT64_FOLD_RTOL_MAX, max(FLOAT64_FOLD_RTOL, 100 * amplification * MACHINE_EPSILON["float64"]))
        if not fold_error <= allowed or not folded_error <= 2 * own_error:
            return False
        rows.append({"float64_fold_vs_float64": fold_error, "unfolded_vs_float64": own_error,
                     "folded_vs_float64": folded_error})
    report.parity.within_own_rounding = rows  # the report passes on this evidence
    worst = max(rows, key=lambda row: row["unfolded_vs_float64"])
    report.notes.append(
        f"the model amplifies rounding: unfolded, it is {worst['unfolded_vs_float64']:.2g} of scale from the same model "
        f"in float64, and the folded copy {worst['folded_vs_float64']:.2g}; the same fold in float64 matches to "
        f"{worst['float64_fold_vs_float64']:.1g}, so the fold is exact and the difference is rounding")
    return True


def _as_float64(example: Example) -> Example:
    return map_tensors(example, lambda t: t.double() if t.is_floating_point() else t)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
