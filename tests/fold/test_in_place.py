"""``fold --in-place`` on a model with external data: at no moment may the model file and the data it reads disagree."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnexport.export import writers
from bnexport.export.writers import save_onnx
from bnexport.fold import fold_file
from fold.models import bn_initializers, bn_node, onnx_model, ort_run


def _conv_bn_model() -> onnx.ModelProto:
    """A conv whose weights (16·8·3·3 floats) are large enough to go to the data file, so folding changes that file."""
    rng = np.random.default_rng(3)
    weights = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("bn", "c", "y")]
    return onnx_model(nodes, [1, 8, 6, 6], [1, 16, 6, 6], [weights, *bn_initializers("bn", 16, rng)])


def _output_on_disk(path, x) -> np.ndarray:
    return ort_run(onnx.load(str(path)), x)  # onnx.load reads the external data and refuses a short file


def test_every_step_of_an_in_place_fold_leaves_a_model_that_reads_its_own_data(tmp_path, monkeypatch):
    model = _conv_bn_model()
    path = tmp_path / "model.onnx"
    save_onnx(model, path, external_data=True)
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = ort_run(model, x)  # the oracle: the unfolded model in ONNX Runtime, graph optimisations off
    scale = float(np.abs(expected).max())

    seen = []
    replace = os.replace

    def observe(src, dst):  # every rename the fold makes, then the model file as a reader would find it
        replace(src, dst)
        seen.append(float(np.abs(_output_on_disk(path, x) - expected).max()) / scale)

    monkeypatch.setattr(writers.os, "replace", observe)
    report = fold_file(path, in_place=True)
    monkeypatch.undo()

    assert max(seen) < 1e-5
    assert len(report.folded) == 1 and len(seen) >= 3  # the data replaced under a model that reads it, and the model twice
    stored = onnx.load(str(path), load_external_data=False)
    assert "BatchNormalization" not in {n.op_type for n in stored.graph.node}
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # nothing staged is left
    assert np.abs(_output_on_disk(path, x) - expected).max() / scale < 1e-5
