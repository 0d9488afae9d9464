"""``fold_module``: fold every exact BatchNorm of a torch module, and check the copy against it."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import DEFAULT_SEED, Tolerance, tolerance_for
from ..errors import BnexportError
from .checks import raise_check_failed
from .report import FoldReport
from .torch_fold import fold_module as _fold_module

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

    The copy is an instance of the module's own class (see ``torch_fold``). The inputs come
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
    folded, report, equivalent = _fold_module(module, example=example)
    if check and report.folded:
        if example is None:
            raise BnexportError("fold_module(check=True) needs example_inputs, example_input or input_shape, or check=False")
        tolerance = tolerance or tolerance_for(dtype_name(module, example))
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


def dtype_name(module: torch.nn.Module, example: Example) -> str:
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


def seeded_inputs(example: Example, *, seed: int) -> Example:
    """The example's structure with each float tensor redrawn from N(0, 1), input i with seed ``seed + i``."""
    counter = iter(range(1 << 30))

    def redraw(value):
        if isinstance(value, torch.Tensor):
            index = next(counter)
            if not value.is_floating_point():
                return value.clone()
            data = np.random.default_rng(seed + index).standard_normal(tuple(value.shape))
            return torch.from_numpy(data).to(dtype=value.dtype, device=value.device)
        if isinstance(value, dict):
            return {k: redraw(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            items = [redraw(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    args, kwargs = example
    return tuple(redraw(a) for a in args), {k: redraw(v) for k, v in kwargs.items()}


def run_outputs(module: torch.nn.Module, example: Example, *, seed: int) -> list[torch.Tensor]:
    """Every tensor the module outputs; the random generator is reseeded first, so Dropout in train mode repeats."""
    args, kwargs = example
    devices = sorted({t.device.index or 0 for t in input_tensors(example) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return input_tensors(module(*args, **kwargs))


def _check_module(module, folded, report: FoldReport, example: Example, equivalent: dict, *, seed: int,
                  tolerance: Tolerance) -> None:
    from ..parity import ParityReport, compare, module_drilldown

    inputs = seeded_inputs(example, seed=seed)
    expected, got = run_outputs(module, inputs, seed=seed), run_outputs(folded, inputs, seed=seed)
    if len(expected) != len(got):
        raise BnexportError(f"the folded module returns {len(got)} tensors, the original {len(expected)}")
    shapes = [list(t.shape) for t in input_tensors(inputs)]
    parity = ParityReport(reference="unfolded", input_shape=shapes[0] if len(shapes) == 1 else shapes, seed=seed)
    for index, (reference, candidate) in enumerate(zip(expected, got)):
        name = "folded" if len(expected) == 1 else f"folded output {index}"
        parity.results.append(compare(name, _numpy(reference), _numpy(candidate), tolerance=tolerance))
    report.parity = parity.to_json()
    if not parity.passed:
        divergence = module_drilldown(module, folded, inputs, equivalent=equivalent, tolerance=tolerance, seed=seed)
        failing = [r for r in parity.results if not r.passed]
        raise_check_failed(report, dataclasses.replace(parity, results=failing + [r for r in parity.results if r.passed]),
                           divergence)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
