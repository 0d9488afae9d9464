import numpy as np
import pytest

from bnexport.config import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from bnexport.errors import BnexportError
from bnexport.parity import compare, run_parity, seeded_input


def test_metrics_on_a_constructed_case():
    reference = np.array([[10.0, 0.0, -2.0], [1.0, 3.0, 0.5]])
    candidate = reference.copy()
    candidate[0, 1] += 0.004  # max |Δ| = 0.004, scale 10
    candidate[1, 0] += 3.0  # flips row 1's argmax... too big on purpose below
    result = compare("c", reference, candidate, tolerance=Tolerance(atol=0.0, rtol=1e-3))
    assert result.max_abs == pytest.approx(3.0)
    assert result.scale == 10.0 and result.max_rel == pytest.approx(0.3)
    assert result.top1_agreement == 0.5
    assert not result and result.required_rtol == pytest.approx(0.3)


def test_pass_threshold_is_atol_plus_rtol_times_scale():
    reference = np.full((2, 4), 100.0)
    just_inside = reference + (1e-5 + 1e-4 * 100) * 0.99
    just_outside = reference + (1e-5 + 1e-4 * 100) * 1.01
    assert compare("in", reference, just_inside)
    assert not compare("out", reference, just_outside)
    assert compare("in", reference, just_inside).atol == DEFAULT_ATOL
    assert compare("in", reference, just_inside).rtol == DEFAULT_RTOL


def test_nan_fails_and_shapes_must_match():
    reference = np.zeros((2, 3))
    candidate = reference.copy()
    candidate[0, 0] = np.nan
    assert not compare("nan", reference, candidate)
    with pytest.raises(BnexportError, match="shape"):
        compare("s", reference, np.zeros((3, 2)))


def test_report_passes_only_when_all_pass():
    x = seeded_input((4, 3), seed=1)
    report = run_parity(lambda a: a * 2, {"same": lambda a: a * 2, "off": lambda a: a * 2 + 1}, x, seed=1)
    assert [bool(r) for r in report.results] == [True, False]
    assert not report.passed
    data = report.to_json()
    assert data["passed"] is False and data["seed"] == 1 and data["input_shape"] == [4, 3]
    assert "FAIL" in report.table()


def test_seeded_input_is_reproducible():
    assert np.array_equal(seeded_input((2, 3), seed=5), seeded_input((2, 3), seed=5))
    assert not np.array_equal(seeded_input((2, 3), seed=5), seeded_input((2, 3), seed=6))
    assert seeded_input((2, 3)).dtype == np.float32
