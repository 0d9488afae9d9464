"""``fold_module``: fold every exact BatchNorm of a torch module, and check the copy against it."""

from __future__ import annotations

import copy

import torch

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, Tolerance
from ..errors import BnexportError
from .checks import raise_check_failed
from .report import FoldReport
from .torch_fold import EQUIVALENT_NODES, trace
from .torch_fold import fold_module as _fold_module


def fold_module(
    module: torch.nn.Module,
    *,
    check: bool = True,
    example_input: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> tuple[torch.nn.Module, FoldReport]:
    """Fold every BatchNorm of an eval-mode module that folds exactly.

    The input shape comes from ``example_input`` (only its shape is used) or ``input_shape``.
    It lets Linear ↔ BatchNorm1d be folded (their exactness depends on the tensor's rank),
    and with ``check`` the folded copy is compared with the original on seeded normal input
    of that shape.
    """
    if example_input is None and input_shape is not None:
        example_input = torch.zeros(input_shape)
    folded, report = _fold_module(module, example_input=example_input)
    if check and report.folded:
        if example_input is None:
            raise BnexportError("fold_module(check=True) needs example_input or input_shape, or check=False")
        _check_module(module, folded, report, tuple(example_input.shape), seed=seed, tolerance=tolerance)
    return folded, report


def _check_module(module, folded, report: FoldReport, shape: tuple[int, ...], *, seed: int, tolerance: Tolerance) -> None:
    from ..parity import eager_runner, module_drilldown, run_parity, seeded_input

    inputs = seeded_input(shape, seed=seed)
    parity = run_parity(eager_runner(module), {"folded": eager_runner(folded)}, inputs,
                        reference_name="unfolded", seed=seed, tolerance=tolerance)
    report.parity = parity.to_json()
    if not parity.passed:
        divergence = module_drilldown(trace(copy.deepcopy(module)), folded, inputs,
                                      equivalent=folded.meta.get(EQUIVALENT_NODES), tolerance=tolerance)
        raise_check_failed(report, parity, divergence)
