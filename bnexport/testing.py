"""Parity in a user's own CI: ``assert_parity`` and the ``bnexport_parity`` pytest fixture.

    from bnexport.testing import assert_parity

    def test_exported_model_matches(model):
        assert_parity(model, "model.folded.onnx", input_shape=(1, 3, 224, 224))

The model is the reference, run eagerly on the CPU; the artifact is an ``.onnx`` file (ONNX
Runtime, graph optimisations off), a ``.ts`` or ``.pt2`` file, a bnexport checkpoint, or another
``nn.Module``. The fixture is registered as a pytest plugin when bnexport is installed.
Nothing here imports torch until it is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DEFAULT_SEED

if TYPE_CHECKING:
    from .parity.compare import ParityReport

__all__ = ["assert_parity", "bnexport_parity"]


def assert_parity(model, artifact: Any, *, inputs: Any = None, input_shape: tuple[int, ...] | None = None,
                  atol: float | None = None, rtol: float | None = None, seed: int = DEFAULT_SEED) -> ParityReport:
    """Run ``model`` and ``artifact`` on the same input and raise ``AssertionError`` unless every output agrees.

    ``inputs`` is a tensor or array, a tuple of them (positional arguments) or a dict by input name;
    otherwise ``input_shape`` gives one seeded standard-normal float32 input (same shape and seed,
    same values, anywhere). The tolerance is ``atol + rtol·max|reference|``, by default the
    input dtype's (``bnexport.config.tolerance_for``). The error message is the parity table; when
    the artifact is a module, it also names the first layer where the two part, if one does.
    The model runs in eval mode and is put back in the mode it was in. Returns the ParityReport.
    """
    import torch

    from .parity.compare import run_parity, tolerance_given
    from .parity.runners import eager_runner, runner_for

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"assert_parity: model must be a torch.nn.Module, not {type(model).__name__}")
    if (inputs is None) == (input_shape is None):
        raise TypeError("assert_parity: pass one of inputs and input_shape")
    feeds = _feeds(inputs) if inputs is not None else _seeded(tuple(input_shape), seed=seed)
    first = next(iter(feeds.values()))
    tolerance = tolerance_given(first.dtype.name, atol=atol, rtol=rtol)
    is_module = isinstance(artifact, torch.nn.Module)
    name = type(artifact).__name__ if is_module else Path(artifact).name
    candidate = eager_runner(artifact) if is_module else runner_for(artifact)
    modes = [(m, m.training) for m in ([model, artifact] if is_module else [model])]
    try:
        for module, _ in modes:
            module.eval()
        report = run_parity(eager_runner(model), {name: candidate}, feeds, reference_name="eager", seed=seed,
                            tolerance=tolerance)
        if report.passed:
            return report
        message = f"{name} differs from the eager model\n{report.table()}"
        if is_module:
            message += _divergence_text(model, artifact, feeds, tolerance=tolerance, seed=seed)
    finally:
        for module, training in modes:
            module.train(training)
    raise AssertionError(message)


def _feeds(inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        return {str(key): _array(value) for key, value in inputs.items()}
    values = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if not values:
        raise TypeError("assert_parity: inputs is empty")
    return {f"input {i}": _array(value) for i, value in enumerate(values)}


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def _seeded(shape: tuple[int, ...], *, seed: int) -> dict[str, np.ndarray]:
    from .parity.compare import seeded_input

    return {"input": seeded_input(shape, seed=seed)}


def _divergence_text(model, artifact, feeds: dict[str, np.ndarray], *, tolerance, seed: int) -> str:
    import torch

    from .parity.divergence import module_drilldown

    args = tuple(torch.from_numpy(value) for value in feeds.values())
    divergence = module_drilldown(model, artifact, (args, {}), tolerance=tolerance, seed=seed)
    if divergence is None:
        return "\nno single layer diverges: the error accumulated"
    return (f"\nfirst diverging layer: {divergence.layer} (max |Δ| {divergence.result.max_abs:.3g}, "
            f"{divergence.result.max_rel:.3g} of scale)")


try:  # the fixture exists only where pytest does; bnexport itself does not need it
    import pytest
except ImportError:  # pragma: no cover
    pass
else:
    @pytest.fixture
    def bnexport_parity():
        """``assert_parity``, as a fixture: ``def test_onnx(bnexport_parity): bnexport_parity(model, "m.onnx", input_shape=...)``."""
        return assert_parity
