"""``runner_for``: one runner per kind of model file, each checked against the eager module it came from."""

from __future__ import annotations

import numpy as np
import pytest

from bnexport.errors import BnexportError
from bnexport.parity.compare import seeded_input
from bnexport.parity.runners import eager_runner, runner_for
from bnexport.parity.sources import load_source
from bnexport.train.loop import load_checkpoint, model_from_checkpoint


@pytest.mark.parametrize("name", ["model.ts", "model.pt2", "model.onnx", "model.folded.onnx", "checkpoint.pt"])
def test_runner_for_each_kind_of_file_matches_eager(tiny_run, name):
    module, _ = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"), path=tiny_run / "checkpoint.pt")
    x = seeded_input((3, 1, 28, 28), seed=5)
    expected = eager_runner(module.eval())(x)  # the oracle: the checkpoint's module in eager torch
    got = runner_for(tiny_run / name)(x)
    assert got.shape == expected.shape == (3, 10)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.array_equal(runner_for(load_source(tiny_run / "model.onnx"))(x), runner_for(tiny_run / "model.onnx")(x))


@pytest.mark.parametrize("name", ["missing.ts", "missing.onnx"])
def test_runner_for_a_missing_file_names_it(tmp_path, name):
    with pytest.raises(BnexportError, match=f"{name}: file not found"):
        runner_for(tmp_path / name)
