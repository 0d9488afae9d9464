import numpy as np
import pytest

from bnexport.config import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from bnexport.errors import BnexportError
from bnexport.parity.compare import compare, compare_outputs, run_parity, seeded_input


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


def test_every_output_is_compared_by_name_or_position():
    reference = {"logits": np.ones((2, 3)), "features": np.full((2, 4), 10.0)}
    same_names = {"features": np.full((2, 4), 10.0), "logits": np.ones((2, 3)) + 0.5}
    results = compare_outputs("c", reference, same_names)
    assert [r.name for r in results] == ["c [logits]", "c [features]"]
    assert [bool(r) for r in results] == [False, True]  # paired by name, not by order
    renamed = {"out0": np.ones((2, 3)), "out1": np.full((2, 4), 10.0)}
    assert all(compare_outputs("c", reference, renamed))  # another export's names: paired by position
    with pytest.raises(BnexportError, match="1 outputs, the reference has 2"):
        compare_outputs("c", reference, {"only": np.ones((2, 3))})
    # one output either way: one comparison called by the candidate's name alone
    (single,) = compare_outputs("c", np.ones(3), {"y": np.ones(3)})
    assert single.name == "c" and single


def test_report_records_feeds_and_names_the_worst_output():
    feeds = {"a": seeded_input((2, 3), seed=1), "mask": np.array([True, False])}
    report = run_parity(lambda f: {"y": f["a"] * 2, "z": f["a"]},
                        {"cand": lambda f: {"y": f["a"] * 2, "z": f["a"] + 1}}, feeds, seed=1)
    assert [r.name for r in report.results] == ["cand [y]", "cand [z]"] and not report.passed
    assert report.worst().name == "cand [z]"
    data = report.to_json()
    assert data["input_shape"] == [2, 3]
    assert data["inputs"] == [{"name": "a", "dtype": "float32", "shape": [2, 3]}, {"name": "mask", "dtype": "bool", "shape": [2]}]
    assert "input mask: 2 bool" in report.table()


def test_bfloat16_and_integer_outputs_compare_as_numbers():
    import ml_dtypes

    values = np.array([1.0, 2.0, 3.0], dtype=ml_dtypes.bfloat16)
    assert compare("b", values, values).max_abs == 0.0
    assert compare("i", np.array([1, 2]), np.array([1, 3])).max_abs == 1.0
