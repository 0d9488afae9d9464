"""fold_onnx's check on any input signature: several inputs and dtypes, half precision, dynamic sides.

The oracle is ONNX Runtime with graph optimisations off, fed by the test's own values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from bnexport.config import DEFAULT_TOLERANCE, Tolerance, tolerance_for
from bnexport.errors import BnexportError, CheckFailed
from bnexport.fold import fold_onnx
from bnexport.parity.divergence import first_divergence
from bnexport.parity.runners import NoKernel, onnxruntime_runner
from fold.models import count_bn_nodes, relative_error
from fold.signatures import bfloat16_gemm_model, bfloat16_io_model, conv_bn_model, multi_input_model, relu_model


def ort_outputs(model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_multi_input_model_folds_and_checks_every_input_and_output():
    model = multi_input_model()
    folded, report = fold_onnx(model)
    assert count_bn_nodes(model) == 2 and count_bn_nodes(folded) == 0 and len(report.folded) == 2
    parity = report.parity
    assert [(f["name"], f["dtype"], f["shape"]) for f in parity.inputs] == [
        ("a", "float32", [1, 3, 224, 224]), ("b", "float32", [1, 8, 224, 224]), ("idx", "int64", [128]),
        ("mask", "bool", [1, 1, 224, 224])]
    assert [r.name for r in parity.results] == ["folded [y]", "folded [r]"] and parity.passed
    # the oracle, on values of the test's own
    rng = np.random.default_rng(7)
    feeds = {"a": rng.standard_normal((2, 3, 9, 11)).astype(np.float32), "b": rng.standard_normal((2, 8, 9, 11)).astype(np.float32),
             "idx": np.array([9, 0, 4], np.int64), "mask": rng.random((2, 1, 9, 11)) < 0.3}
    for expected, got in zip(ort_outputs(model, feeds), ort_outputs(folded, feeds)):
        assert relative_error(expected, got) < 1e-5


def test_given_shapes_are_used_and_recorded():
    shapes = {"a": (2, 3, 8, 8), "idx": (3,)}  # b and mask take batch, h and w from a
    _, report = fold_onnx(multi_input_model(), input_shapes=shapes)
    assert [f["shape"] for f in report.parity.inputs] == [[2, 3, 8, 8], [2, 8, 8, 8], [3], [2, 1, 8, 8]]
    assert all(f["guessed_dims"] == [] for f in report.parity.inputs)
    # a bare shape, for a one-input model
    _, report = fold_onnx(conv_bn_model(), input_shapes=(1, 4, 5, 6))
    assert report.parity.inputs[0]["shape"] == [1, 4, 5, 6] and report.parity.input_shape == [1, 4, 5, 6]


def test_dynamic_sides_are_checked_at_a_realistic_size():
    _, report = fold_onnx(conv_bn_model())
    (feed,) = report.parity.inputs
    assert feed["shape"] == [1, 4, 224, 224] and feed["guessed_dims"] == [0, 2, 3]


def test_float16_model_folds_and_passes_at_its_own_tolerance():
    model = conv_bn_model(np.float16, depth=3)
    folded, report = fold_onnx(model)
    assert count_bn_nodes(folded) == 0
    result = report.parity.results[0]
    assert report.parity.inputs[0]["dtype"] == "float16"
    assert result.rtol == tolerance_for("float16").rtol and result.passed
    x = np.random.default_rng(5).standard_normal((2, 4, 12, 12)).astype(np.float16)
    (expected,), (got,) = ort_outputs(model, {"x": x}), ort_outputs(folded, {"x": x})
    assert got.dtype == np.float16
    error = relative_error(expected, got)
    assert 0 < error < tolerance_for("float16").rtol / 4  # a rounding-level change, well inside the tolerance


def test_a_tolerance_too_tight_for_float16_blames_no_layer():
    with pytest.raises(CheckFailed, match="no single layer diverges") as caught:
        fold_onnx(conv_bn_model(np.float16, depth=3), tolerance=Tolerance(atol=0.0, rtol=1e-6))
    assert caught.value.report.divergence is None


def test_a_real_divergence_is_still_named():
    """A layer whose error jumps far past everything before it is named; smooth growth is not."""
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal(100) for _ in range(4)]
    smooth = [r * (1 + 1e-4 * (i + 1)) for i, r in enumerate(ref)]
    assert first_divergence([(f"l{i}", f"t{i}", r, c) for i, (r, c) in enumerate(zip(ref, smooth))],
                            tolerance=DEFAULT_TOLERANCE) is None
    broken = [ref[0] * (1 + 1e-7), ref[1] * 1.05, ref[2] * 1.05, ref[3]]
    divergence = first_divergence([(f"l{i}", f"t{i}", r, c) for i, (r, c) in enumerate(zip(ref, broken))],
                                  tolerance=DEFAULT_TOLERANCE)
    assert divergence.layer == "l1" and divergence.compared == 2
    # a first layer off by a few float16 roundings is not a divergence, even at a float32 tolerance
    half = ref[0].astype(np.float16)
    assert first_divergence([("l0", "t0", half, half * np.float16(1.001))], tolerance=DEFAULT_TOLERANCE) is None


def test_bfloat16_inputs_and_outputs_travel_through_ort_values():
    run = onnxruntime_runner(relu_model(TensorProto.BFLOAT16).SerializeToString())
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    y = run({"x": x})["y"]
    assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(y.astype(np.float32), np.maximum(x.astype(np.float32), 0))  # numpy is the oracle


def test_bfloat16_model_folds_and_checks():
    folded, report = fold_onnx(bfloat16_io_model())
    assert count_bn_nodes(folded) == 0
    assert report.parity.inputs[0]["dtype"] == "bfloat16" and report.parity.passed
    assert report.parity.results[0].rtol == tolerance_for("bfloat16").rtol


@pytest.mark.parametrize("build", [lambda: conv_bn_model(np.float64), bfloat16_gemm_model], ids=["float64", "bfloat16"])
def test_no_kernel_in_onnx_runtime_is_one_line(build):
    model = build()
    with pytest.raises(NoKernel) as caught:
        fold_onnx(model)
    message = str(caught.value)
    assert isinstance(caught.value, BnexportError) and "\n" not in message
    assert "no kernel for" in message and "convert the model to float32" in message
    folded, report = fold_onnx(model, check=False)  # the fold itself needs no kernel
    assert count_bn_nodes(folded) == 0 and report.parity is None
