import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bnexport.config import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from bnexport.errors import BnexportError
from bnexport.parity.compare import compare, compare_outputs, run_parity, seeded_input
from conftest import REPO, assert_one_line_error, run_cli


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


# A model spec against a file: `parity MODEL A.onnx` -------------------------------------

SPEC_FILE = REPO / "tests" / "spec_models.py"
RESNET_SHAPE = (1, 3, 32, 32)


def resnet18_weights(seed: int) -> dict:
    """resnet18 with seeded weights and BatchNorm statistics away from their initial 0 and 1."""
    import torchvision

    from spec_models import randomise_batchnorm

    torch.manual_seed(seed)
    return randomise_batchnorm(torchvision.models.resnet18(weights=None), seed=seed).state_dict()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """(A.onnx, the weights it was exported from, other weights), A exported by torch.onnx directly."""
    import torchvision

    from bnexport.export.writers import save_onnx, to_onnx

    folder = tmp_path_factory.mktemp("resnet18")
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(resnet18_weights(1))
    save_onnx(to_onnx(model.eval(), torch.zeros((2, *RESNET_SHAPE[1:]))), folder / "A.onnx")
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(resnet18_weights(2), folder / "other.pt")
    return folder / "A.onnx", folder / "weights.pt", folder / "other.pt"


def seeded_feed(shape, seed: int = 0, index: int = 0) -> np.ndarray:
    """What parity feeds input ``index``: ``default_rng([seed, index])``'s standard normals (bnexport.parity.inputs)."""
    return np.random.default_rng([seed, index]).standard_normal(shape).astype(np.float32)


def ort_outputs(path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_parity_of_a_torchvision_spec_and_its_onnx_export(resnet18_files):
    onnx_file, weights, other = resnet18_files
    result = run_cli("parity", "torchvision:resnet18", onnx_file, "--weights", weights, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (comparison,) = data["results"]
    assert data["reference"] == "torchvision:resnet18" and data["passed"]
    assert data["inputs"][0]["shape"] == list(RESNET_SHAPE)  # the export's fixed sides, batch 1
    # the oracle: torchvision's model with these weights in eager torch, the file in ONNX Runtime, same input
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    x = seeded_feed(RESNET_SHAPE)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    (got,) = ort_outputs(onnx_file, {"images": x})
    assert comparison["max_abs"] == pytest.approx(float(np.abs(got - expected).max()), rel=1e-3, abs=1e-7)
    assert comparison["scale"] == pytest.approx(float(np.abs(expected).max()), rel=1e-6)
    # the file on the left works the same way
    assert run_cli("parity", onnx_file, "torchvision:resnet18", "--weights", weights).returncode == 0
    # the same architecture with other weights is told apart, either way round
    for args in (("torchvision:resnet18", onnx_file), (onnx_file, "torchvision:resnet18")):
        failed = run_cli("parity", *args, "--weights", other)
        assert failed.returncode == 1, failed.stderr
        assert "FAIL" in failed.stdout
    # without --weights the model's weights are random: not the file's
    assert run_cli("parity", "torchvision:resnet18", onnx_file).returncode == 1


def test_parity_of_a_two_input_spec_and_its_export(tmp_path):
    """Inputs go by position into forward and by name into ONNX; every output is compared."""
    import spec_models

    from bnexport.export.writers import save_onnx, to_onnx

    spec = f"{SPEC_FILE}:make_two_inputs"
    model = spec_models.make_two_inputs().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    example = (torch.zeros(2, 3, 8, 8), torch.zeros(2, 7))
    save_onnx(to_onnx(model, example, input_names=["image", "features"]), tmp_path / "two.onnx")
    result = run_cli("parity", spec, tmp_path / "two.onnx", "--weights", tmp_path / "w.pt", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(f["name"], f["shape"]) for f in data["inputs"]] == [("image", [1, 3, 8, 8]), ("features", [1, 7])]
    assert data["results"][0]["max_rel"] < 1e-5
    # and a spec against a spec: the same module twice, fed the reference's inputs by name
    twice = run_cli("parity", spec, spec, "--input-shape", "image=2,3,5,5", "--input-shape", "features=2,7", "--json")
    assert twice.returncode == 0, twice.stderr
    assert json.loads(twice.stdout)["results"][0]["max_abs"] == 0.0


@pytest.mark.parametrize("args, fragments", [
    (["torchvision:resnet99", "A.onnx"], ["torchvision:resnet99", "no model 'resnet99'", "resnet18"]),
    (["no_such_package.models:make", "A.onnx"], ["no_such_package.models:make", "no module named 'no_such_package'"]),
    (["missing_file.py:make", "A.onnx"], ["missing_file.py", "not found"]),
    ([f"{SPEC_FILE}:nothing", "A.onnx"], ["has no 'nothing'", "make_two_inputs"]),
    (["gone.onnx", "A.onnx"], ["gone.onnx: file not found"]),
    (["a:b:c", "A.onnx"], ["a:b:c: file not found, and not a model spec", "torchvision:NAME"]),
    (["A.onnx", "A.onnx", "--weights", "W.pt"], ["--weights W.pt", "neither", "model spec"]),
    ([f"{SPEC_FILE}:make", "A.onnx", "--weights", "other.pt"], ["--weights", "does not fit", "missing keys"]),
    ([f"{SPEC_FILE}:make", "A.onnx", "--weights", "missing.pt"], ["--weights missing.pt", "not found"]),
    ([f"{SPEC_FILE}:make", f"{SPEC_FILE}:make", "--input-shape", "1,4,8,8"],
     ["--input-shape images=1,4,8,8", "rejects it at conv1 (Conv2d)"]),
    ([f"{SPEC_FILE}:make", f"{SPEC_FILE}:make"], ["--input-shape", "does not say what it takes"]),
])
def test_parity_bad_spec_input_is_one_line(args, fragments, resnet18_files, tmp_path, monkeypatch):
    onnx_file, _, other = resnet18_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A.onnx").symlink_to(onnx_file)
    (tmp_path / "other.pt").symlink_to(other)
    torch.save({"x": torch.zeros(1)}, tmp_path / "W.pt")
    assert_one_line_error(run_cli("parity", *args), *fragments)
