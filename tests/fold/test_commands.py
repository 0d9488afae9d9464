"""fold, inspect, parity and bench through the command line, and their answers to bad input (in this process;
the few that need a fresh one, for the exit status or what native code writes to stderr, use run_bnexport)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from bnexport.artifacts import sha256_file
from bnexport.cli import main
from bnexport.export.writers import op_counts, save_onnx
from bnexport.train.loop import load_checkpoint, model_from_checkpoint
from conftest import REPO, assert_one_line_error, listed_options, listed_subcommands, run_bnexport, run_cli
from exported import load_export, max_error_in_scale, uniform_batch
from fold.models import bn_initializers, bn_node, onnx_model


def test_fold_onnx_writes_model_and_report(tiny_run, tmp_path):
    source = tiny_run / "model.onnx"
    digest = sha256_file(source)
    out, report_path = tmp_path / "folded.onnx", tmp_path / "report.json"
    result = run_bnexport("fold", source, "-o", out, "--report", report_path)
    assert result.returncode == 0, result.stderr
    assert "1 of 1 BatchNorm folded" in result.stdout and "parity: max |Δ|" in result.stdout
    assert sha256_file(source) == digest  # the input is never touched
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in op_counts(folded)
    report = json.loads(report_path.read_text())
    assert report["folded"] == 1 and report["records"][0]["status"] == "folded"
    assert report["records"][0]["folded_into"] == next(n.name for n in folded.graph.node if n.op_type == "Conv")
    assert report["parity"]["passed"] and report["parity"]["input_shape"] == [1, 1, 28, 28]


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2"])
def test_fold_checkpoint_to_each_format(tiny_run, tmp_path, suffix):
    """Loaded back by its own runtime: no BN left where the run's own export of that format has one,
    and the logits of the checkpoint's eager model."""
    out = tmp_path / f"folded{suffix}"
    result = run_cli("fold", tiny_run / "checkpoint.pt", "-o", out)
    assert result.returncode == 0, result.stderr
    folded_count, run = load_export(out)
    unfolded_count, _ = load_export(tiny_run / f"model{suffix}")
    assert (unfolded_count, folded_count) == (1, 0)
    model, _ = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"))
    x = uniform_batch((3, 1, 28, 28), seed=11)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    got = run(x)
    assert got.shape == (3, 10) and max_error_in_scale(expected, got) <= 1e-5


def test_fold_in_place_and_no_check(tiny_run, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_bytes((tiny_run / "model.onnx").read_bytes())
    assert main(["fold", str(target), "--in-place", "--no-check", "--report", str(tmp_path / "r.json")]) == 0
    assert "BatchNormalization" not in op_counts(onnx.load(str(target)))
    assert json.loads((tmp_path / "r.json").read_text())["parity"] is None


def test_fold_keeps_external_data(tiny_run, tmp_path):
    source = tmp_path / "ext.onnx"
    save_onnx(onnx.load(str(tiny_run / "model.onnx")), source, external_data=True)
    assert main(["fold", str(source), "-o", str(tmp_path / "out.onnx")]) == 0
    assert (tmp_path / "out.onnx.data").stat().st_size > 100_000
    stored = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)


def test_model_without_bn_folds_to_itself(tmp_path, capsys):
    model = onnx_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [1, 3], [1, 3], [])
    save_onnx(model, tmp_path / "plain.onnx")
    assert main(["fold", str(tmp_path / "plain.onnx"), "-o", str(tmp_path / "out.onnx")]) == 0
    assert "has no BatchNorm" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "out.onnx")) == model


def _negative_variance_model(path):
    rng = np.random.default_rng(0)
    variance = rng.random(4) + 0.5
    variance[0] = -2.0
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w"),
             *bn_initializers("suspicious_bn", 4, rng, var=variance)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("suspicious_bn", "c", "y")]
    save_onnx(onnx_model(nodes, [1, 2, 3, 3], [1, 4, 3, 3], inits), path)


def _bad_input(kind: str, tmp_path, tiny_run):
    """(input path, fragments the one-line error must contain)."""
    if kind == "missing":
        return tmp_path / "nothing.onnx", ["nothing.onnx", "not found"]
    if kind == "not-onnx":
        path = tmp_path / "notes.onnx"
        path.write_text("these are not the weights you are looking for\n" * 20)
        return path, ["notes.onnx", "not"]
    if kind == "truncated":
        path = tmp_path / "cut.onnx"
        data = (tiny_run / "model.onnx").read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        return path, ["cut.onnx", "not"]
    if kind == "external-data-missing":
        path = tmp_path / "ext.onnx"
        save_onnx(onnx.load(str(tiny_run / "model.onnx")), path, external_data=True)
        (tmp_path / "ext.onnx.data").unlink()
        return path, ["ext.onnx", "external data"]
    if kind == "negative-variance":
        path = tmp_path / "stats.onnx"
        _negative_variance_model(path)
        return path, ["stats.onnx", "suspicious_bn", "negative"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "not-onnx", "truncated", "external-data-missing", "negative-variance"])
def test_fold_bad_input(kind, tmp_path, tiny_run, capsys):
    source, fragments = _bad_input(kind, tmp_path, tiny_run)
    before = sha256_file(source) if source.exists() else None
    out = tmp_path / "out.onnx"
    code = main(["fold", str(source), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(fragment in err for fragment in fragments), err
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()
    assert (sha256_file(source) if source.exists() else None) == before


def test_fold_refuses_to_overwrite_its_input(tiny_run, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes((tiny_run / "model.onnx").read_bytes())
    digest = sha256_file(target)
    result = run_cli("fold", target, "-o", tmp_path / "." / "model.onnx")
    assert_one_line_error(result, "model.onnx", "--in-place")
    assert sha256_file(target) == digest
    assert_one_line_error(run_cli("fold", tiny_run / "checkpoint.pt", "-o", tmp_path / "x.txt"), "checkpoint", ".onnx")


@pytest.mark.parametrize("where", ["report-is-a-folder", "report-folder-missing", "report-is-the-model", "output-is-a-folder"])
def test_fold_refuses_bad_output_paths_before_writing(where, tiny_run, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes((tiny_run / "model.onnx").read_bytes())
    digest = sha256_file(model)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    if where == "report-is-a-folder":
        report, fragments = tmp_path, ["--report", "is a folder"]
    elif where == "report-folder-missing":
        report, fragments = tmp_path / "nowhere" / "r.json", ["--report", "does not exist"]
    elif where == "report-is-the-model":
        report, fragments = model, ["--report", "the model itself"]
    else:
        (tmp_path / "dir.onnx").mkdir()
        out, fragments = tmp_path / "dir.onnx", ["-o", "is a folder"]
    code = main(["fold", str(model), "-o", str(out), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(fragment in err for fragment in fragments), err
    assert sha256_file(model) == digest
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_table_and_json(tiny_run, capsys):
    assert main(["inspect", str(tiny_run / "model.onnx")]) == 0
    table = capsys.readouterr().out
    assert "BatchNormalization" in table and "1 of 1 BatchNormalization foldable" in table and "images" in table
    assert main(["inspect", str(tiny_run / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["op_counts"]["BatchNormalization"] == 1 and info["opsets"][""] == 18
    assert info["inputs"] == [{"name": "images", "dtype": "float", "shape": ["batch", 1, 28, 28]}]
    assert info["outputs"][0]["name"] == "logits"
    assert info["parameters"] == 16 * 9 + 16 + 16 * 4 + 16 * 14 * 14 * 10 + 10  # conv, BN's 4, fc
    (bn,) = info["batchnorms"]
    assert bn["input_from"].startswith("Conv ") and bn["output_to"][0].startswith("Relu ") and bn["foldable"]
    assert bn["module"] == "bn1"  # SimpleCNN's BatchNorm, as the exporter recorded it


def test_parity_exit_codes(tiny_run, tmp_path):
    reference = tiny_run / "model.onnx"
    agree = run_cli("parity", reference, tiny_run / "model.folded.onnx", "--json")
    assert agree.returncode == 0, agree.stderr
    result = json.loads(agree.stdout)
    assert result["passed"] and result["results"][0]["max_rel"] < 1e-5 and result["input_shape"] == [1, 1, 28, 28]
    # a checkpoint against an ONNX file
    assert main(["parity", str(tiny_run / "checkpoint.pt"), str(tiny_run / "model.folded.onnx")]) == 0
    # a model whose conv weights were nudged must be told apart
    nudged = onnx.load(str(reference))
    weight = next(t for t in nudged.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.05, weight.name))
    save_onnx(nudged, tmp_path / "nudged.onnx")
    assert main(["parity", str(reference), str(tmp_path / "nudged.onnx")]) == 1
    assert main(["parity", str(reference), str(tmp_path / "nudged.onnx"), "--rtol", "1"]) == 0
    assert main(["parity", str(reference), str(tmp_path / "missing.onnx")]) == 2


BENCH_ONNX_RUNTIMES = ["ORT unfolded (no graph opt)", "ORT unfolded (default opt)", "ORT folded (no graph opt)",
                       "ORT folded (default opt)"]


def test_bench_json(tiny_run):
    model = tiny_run / "model.onnx"
    min_seconds = 0.02
    threads = torch.get_num_threads() + 1  # not what the process has already
    result = run_cli("bench", model, "--batch", "3", "5", "--min-seconds", min_seconds, "--threads", threads, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == str(model) and report["baseline"] == BENCH_ONNX_RUNTIMES[0]
    assert report["threads"] == threads
    timings = report["timings"]
    # every runtime at every batch asked for (not the default 1 and 64), batch by batch
    assert [(t["name"], t["batch"]) for t in timings] == [(name, b) for b in (3, 5) for name in BENCH_ONNX_RUNTIMES]
    baseline = {t["batch"]: t["median_ms"] for t in timings if t["name"] == report["baseline"]}
    for t in timings:
        assert math.isfinite(t["median_ms"]) and 0 < t["min_ms"] <= t["median_ms"], t
        # timing stops once 10 runs and --min-seconds are both reached: had more than 10 runs been
        # made, the first runs-1 took less than --min-seconds (the 0.5 s default would give thousands)
        assert t["runs"] >= 10 and (t["runs"] == 10 or (t["runs"] - 1) * t["min_ms"] < min_seconds * 1e3), t
        assert t["ratio"] == pytest.approx(t["median_ms"] / baseline[t["batch"]], rel=1e-9), t


@pytest.mark.parametrize("command, options", [
    ("fold", {"-o", "--output", "--report", "--in-place", "--no-check", "--fold-overridable", "--input-shape", "--seed",
              "--atol", "--rtol", "--weights"}),
    ("inspect", {"--json"}),
    ("parity", {"--input-shape", "--seed", "--atol", "--rtol", "--json", "--weights"}),
    ("bench", {"--batch", "--min-seconds", "--threads", "--input-shape", "--seed", "--json", "--weights"}),
    ("recalibrate", {"--data", "--weights", "--input-shape", "--seed", "--batches", "--batch-size", "-o", "--in-place",
                     "--json"}),
])
def test_help_of_the_model_commands(command, options):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and command in listed_subcommands(run_cli("--help").stdout)
    assert options <= listed_options(result.stdout)
    if command != "inspect":  # each MODEL argument says what it accepts: files and model specs
        assert "torchvision:NAME" in result.stdout and "path/to/file.py:callable" in result.stdout


# Any input signature, through the command line ------------------------------------------

def _save(model, path):
    save_onnx(model, path)
    return path


def test_fold_multi_input_model_with_named_shapes(tmp_path):
    from fold.signatures import multi_input_model

    source = _save(multi_input_model(), tmp_path / "multi.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = run_cli("fold", source, "-o", out, "--report", report_path,
                     "--input-shape", "a=2,3,16,12", "--input-shape", "idx=5")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 BatchNorm folded" in result.stdout
    assert "input a: 2×3×16×12 float32" in result.stdout and "input mask: 2×1×16×12 bool" in result.stdout
    assert "guessed" not in result.stdout
    parity = json.loads(report_path.read_text())["parity"]
    assert [f["shape"] for f in parity["inputs"]] == [[2, 3, 16, 12], [2, 8, 16, 12], [5], [2, 1, 16, 12]]
    assert [f["dtype"] for f in parity["inputs"]] == ["float32", "float32", "int64", "bool"]
    assert len(parity["results"]) == 2 and parity["passed"]
    assert "BatchNormalization" not in op_counts(onnx.load(str(out)))


def test_fold_says_which_shape_it_guessed(tmp_path, capsys):
    from fold.signatures import conv_bn_model

    source = _save(conv_bn_model(), tmp_path / "dynamic.onnx")
    assert main(["fold", str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "input x: 1×4×224×224 float32 (dynamic dims 0, 2, 3 guessed" in out
    (feed,) = json.loads((tmp_path / "r.json").read_text())["parity"]["inputs"]
    assert feed == {"name": "x", "dtype": "float32", "shape": [1, 4, 224, 224], "guessed_dims": [0, 2, 3]}
    # the older bare form still works for a one-input model
    assert main(["fold", str(source), "-o", str(tmp_path / "out2.onnx"), "--input-shape", "1,4,9,9"]) == 0
    assert "input x: 1×4×9×9 float32" in capsys.readouterr().out


def test_fold_float16_model_passes_by_default(tmp_path):
    from fold.signatures import conv_bn_model

    source = _save(conv_bn_model(np.float16, depth=3), tmp_path / "half.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = run_cli("fold", source, "-o", out, "--report", report_path)
    assert result.returncode == 0, result.stderr
    parity = json.loads(report_path.read_text())["parity"]
    assert parity["inputs"][0]["dtype"] == "float16" and parity["passed"]
    # parity feeds the float16 model float16, and agrees at the float16 tolerance
    agree = run_cli("parity", source, out, "--json")
    assert agree.returncode == 0, agree.stderr
    data = json.loads(agree.stdout)
    assert data["inputs"][0]["dtype"] == "float16" and data["results"][0]["rtol"] == 2**-10 * 10


@pytest.mark.parametrize("flags, fragments", [
    (["--input-shape", "nope=1,3,8,8"], ["multi.onnx", "--input-shape", "no input 'nope'"]),
    (["--input-shape", "a=1,3,8"], ["multi.onnx", "--input-shape", "rank 3"]),
    (["--input-shape", "a=1,3,8,8"], ["multi.onnx", "--input-shape", "'idx'"]),
    (["--input-shape", "1,3,8,8"], ["multi.onnx", "--input-shape", "names no input"]),
    (["--input-shape", "a=1,3,8,8", "--input-shape", "a=1,3,9,9"], ["--input-shape", "twice"]),
    (["--input-shape", "a=1,0,8,8"], ["--input-shape", "positive"]),
    (["--input-shape", "a=1,x,8"], ["--input-shape", "positive integers"]),
    (["--input-shape", "=1,3"], ["--input-shape", "NAME=DIMS"]),
])
def test_fold_bad_input_shapes(flags, fragments, tmp_path):
    from fold.signatures import multi_input_model

    source = _save(multi_input_model(), tmp_path / "multi.onnx")
    result = run_cli("fold", source, "-o", tmp_path / "out.onnx", *flags)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out.onnx").exists()


def test_no_kernel_is_one_line_with_a_way_out(tmp_path):
    from fold.signatures import conv_bn_model

    source = _save(conv_bn_model(np.float64), tmp_path / "double.onnx")
    result = run_bnexport("fold", source, "-o", tmp_path / "out.onnx")
    assert_one_line_error(result, "double.onnx", "no kernel for Conv", "float32", "--no-check")
    assert not (tmp_path / "out.onnx").exists()
    assert main(["fold", str(source), "-o", str(tmp_path / "out.onnx"), "--no-check"]) == 0
    parity = run_cli("parity", source, tmp_path / "out.onnx")
    assert_one_line_error(parity, "double.onnx", "no kernel for Conv", "float32")
    assert "--no-check" not in parity.stderr  # parity has no such flag


def test_parity_compares_every_output_of_a_multi_input_model(tmp_path):
    from fold.signatures import multi_input_model

    source = _save(multi_input_model(), tmp_path / "multi.onnx")
    assert main(["fold", str(source), "-o", str(tmp_path / "folded.onnx"), "--no-check"]) == 0
    result = run_cli("parity", source, tmp_path / "folded.onnx", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["results"]] == [f"{tmp_path / 'folded.onnx'} [y]", f"{tmp_path / 'folded.onnx'} [r]"]
    assert [f["name"] for f in data["inputs"]] == ["a", "b", "idx", "mask"]
    # a nudged second output is caught, and named
    nudged = onnx.load(str(tmp_path / "folded.onnx"))
    nudged.graph.node.append(helper.make_node("Mul", ["r", "two"], ["r2"], name="nudge"))
    nudged.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "two"))
    nudged.graph.output[1].name = "r2"  # the same output, 1 % larger
    save_onnx(nudged, tmp_path / "nudged.onnx")
    table = run_cli("parity", source, tmp_path / "nudged.onnx", "--input-shape", "a=1,3,8,8", "--input-shape", "idx=2")
    assert table.returncode == 1, table.stderr
    assert "[r]" in table.stdout and "FAIL" in table.stdout and "input idx: 2 int64" in table.stdout


ONNX_ONLY_COMMANDS = """
import sys
from bnexport.cli import main
model, out = sys.argv[1], sys.argv[2]
assert main(["inspect", model]) == 0
assert main(["fold", model, "-o", out]) == 0
assert main(["parity", model, out]) == 0
assert main(["parity", model, "missing.onnx"]) == 2
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
print("torch modules:", len(loaded), loaded[:3])
"""


def test_onnx_only_commands_never_import_torch(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO
    from fold.signatures import conv_bn_model

    source = _save(conv_bn_model(), tmp_path / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ONNX_ONLY_COMMANDS, str(source), str(tmp_path / "out.onnx")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch modules: 0 []" in done.stdout, done.stdout


def test_parity_of_a_model_and_its_float16_copy(tmp_path):
    """The float32 reference's feeds are cast to the float16 copy's inputs; the coarser dtype sets the tolerance."""
    from fold.signatures import conv_bn_model

    single = _save(conv_bn_model(np.float32), tmp_path / "single.onnx")
    half = _save(conv_bn_model(np.float16), tmp_path / "half.onnx")  # the same weights, rounded
    result = run_cli("parity", single, half, "--input-shape", "1,4,32,32", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (comparison,) = data["results"]
    assert comparison["rtol"] == 2**-10 * 10 and 0 < comparison["max_rel"] < 2**-10 * 10
    assert data["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [1, 4, 32, 32], "guessed_dims": []}
    # at float32's tolerance the same pair is told apart
    assert run_cli("parity", single, half, "--input-shape", "1,4,32,32", "--rtol", "1e-5", "--atol", "0").returncode == 1


def test_fold_overridable_flag_folds_bn_parameters_given_as_graph_inputs(tmp_path):
    from fold.test_onnx_graphs import conv_bn_model

    source, kept, folded = tmp_path / "in.onnx", tmp_path / "kept.onnx", tmp_path / "folded.onnx"
    _save(conv_bn_model(bn_inputs_as_graph_inputs=True), source)
    assert run_cli("fold", source, "-o", kept).returncode == 0
    assert op_counts(onnx.load(str(kept))).get("BatchNormalization") == 1
    result = run_cli("fold", source, "-o", folded, "--fold-overridable")
    assert result.returncode == 0, result.stderr
    assert op_counts(onnx.load(str(folded))).get("BatchNormalization", 0) == 0
    assert [i.name for i in onnx.load(str(folded)).graph.input] == [i.name for i in onnx.load(str(source)).graph.input]


# A model spec: `fold MODEL -o OUT`, `bench MODEL` -----------------------------------------

SPEC_FILE = REPO / "tests" / "spec_models.py"


@pytest.fixture
def spec_weights(tmp_path):
    """The spec's model with weights of its own (not the seeded ones), saved as a state dict, and the model."""
    import spec_models

    torch.manual_seed(7)
    model = spec_models.randomise_batchnorm(spec_models.ConvNet(), seed=7).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return tmp_path / "weights.pt", model


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2"])
def test_fold_a_model_spec_to_each_format(spec_weights, tmp_path, suffix):
    weights, model = spec_weights
    out = tmp_path / f"folded{suffix}"
    result = run_cli("fold", f"{SPEC_FILE}:make", "-o", out, "--weights", weights, "--input-shape", "1,3,16,16")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 BatchNorm folded" in result.stdout and f"wrote {out}" in result.stdout
    batchnorms, run = load_export(out)  # the file in its own runtime, ONNX Runtime with optimisations off
    assert batchnorms == 0
    batch = uniform_batch((3, 3, 16, 16), seed=4)  # a batch of 3: the batch axis stays dynamic
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    assert max_error_in_scale(expected, run(batch)) <= 1e-4
    if suffix == ".onnx":
        (graph_input,) = onnx.load(str(out)).graph.input
        assert graph_input.name == "images"  # forward's own name for its input
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "weights.pt"])


def test_fold_a_two_input_spec(tmp_path):
    import onnxruntime as ort
    import spec_models

    out = tmp_path / "two.onnx"
    result = run_cli("fold", f"{SPEC_FILE}:make_two_inputs", "-o", out,
                     "--input-shape", "image=1,3,8,8", "--input-shape", "features=1,7")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 BatchNorm folded" in result.stdout
    # the spec's weights without --weights: the factory's own, drawn under the seed (--seed, default 0)
    torch.manual_seed(0)
    model = spec_models.make_two_inputs().eval()
    image, features = uniform_batch((2, 3, 8, 8), seed=1), uniform_batch((2, 7), seed=2)
    with torch.no_grad():
        expected = model(torch.from_numpy(image), torch.from_numpy(features)).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "features"]
    (got,) = session.run(None, {"image": image, "features": features})
    assert max_error_in_scale(expected, got) <= 1e-4
    assert "BatchNormalization" not in op_counts(onnx.load(str(out)))


@pytest.mark.parametrize("args, fragments", [
    ([f"{SPEC_FILE}:make", "--input-shape", "1,3,8,8"], ["-o", "model spec", ".onnx, .ts, .pt2"]),
    ([f"{SPEC_FILE}:make", "-o", "out.pt", "--input-shape", "1,3,8,8"], ["-o", "model spec", "not out.pt"]),
    ([f"{SPEC_FILE}:make", "--in-place", "--input-shape", "1,3,8,8"], ["--in-place", "model spec", "-o"]),
    ([f"{SPEC_FILE}:make", "-o", "out.onnx"], ["--input-shape", "does not say what it takes", "1,3,224,224"]),
    ([f"{SPEC_FILE}:make", "-o", "out.onnx", "--input-shape", "1,4,8,8"],
     ["--input-shape images=1,4,8,8", "rejects it at conv1 (Conv2d)", "4 channels"]),
    ([f"{SPEC_FILE}:make_two_inputs", "-o", "out.onnx", "--input-shape", "1,3,8,8"], ["--input-shape", "2 inputs", "NAME=DIMS"]),
    ([f"{SPEC_FILE}:make_two_inputs", "-o", "out.onnx", "--input-shape", "image=1,3,8,8", "--input-shape", "x=1,7"],
     ["--input-shape x=...", "no input 'x'"]),
    ([f"{SPEC_FILE}:make", "-o", "out.onnx", "--input-shape", "1,3,8,8", "--weights", "two.pt"],
     ["--weights two.pt does not fit", "missing keys", "unexpected keys"]),
    (["torchvision:no_such_net", "-o", "out.onnx"], ["torchvision:no_such_net", "no model"]),
    (["m.onnx", "-o", "out.onnx", "--weights", "two.pt"], ["--weights two.pt", "m.onnx is an ONNX file"]),
])
def test_fold_bad_spec_input_is_one_line(args, fragments, tmp_path, monkeypatch):
    import spec_models
    from fold.signatures import conv_bn_model

    monkeypatch.chdir(tmp_path)
    _save(conv_bn_model(), tmp_path / "m.onnx")
    torch.save(spec_models.make_two_inputs().state_dict(), tmp_path / "two.pt")
    assert_one_line_error(run_cli("fold", *args), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "two.pt"]  # nothing written


SPEC_RUNTIMES = ["eager unfolded", "eager folded", "TorchScript folded", *BENCH_ONNX_RUNTIMES]


def test_bench_a_model_spec(spec_weights):
    weights, _ = spec_weights
    result = run_cli("bench", f"{SPEC_FILE}:make", "--weights", weights, "--input-shape", "1,3,16,16",
                     "--min-seconds", "0.01", "--batch", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == f"{SPEC_FILE}:make" and report["baseline"] == "eager unfolded"
    assert [(t["name"], t["batch"]) for t in report["timings"]] == [(name, 1) for name in SPEC_RUNTIMES]
    assert all(t["runs"] >= 10 and 0 < t["min_ms"] <= t["median_ms"] for t in report["timings"])
    assert "notes" not in report


def test_bench_a_spec_that_torchscript_cannot_script_or_with_two_inputs():
    traced = run_cli("bench", f"{SPEC_FILE}:make_unscriptable", "--input-shape", "1,3,8,8", "--min-seconds", "0.01",
                     "--batch", "1", "3", "--json")
    assert traced.returncode == 0, traced.stderr
    report = json.loads(traced.stdout)
    assert [(t["name"], t["batch"]) for t in report["timings"]] == [(n, b) for b in (1, 3) for n in SPEC_RUNTIMES]
    (note,) = report["notes"]
    assert "not scriptable" in note and "traced" in note
    two = run_cli("bench", f"{SPEC_FILE}:make_two_inputs", "--input-shape", "image=1,3,8,8", "--input-shape",
                  "features=1,7", "--min-seconds", "0.01", "--batch", "2")
    assert two.returncode == 0, two.stderr
    assert all(name in two.stdout for name in SPEC_RUNTIMES)


def test_bench_bad_spec_input_is_one_line(tmp_path):
    from fold.signatures import conv_bn_model

    onnx_file = _save(conv_bn_model(), tmp_path / "m.onnx")
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    assert_one_line_error(run_cli("bench", onnx_file, "--weights", tmp_path / "w.pt"), "--weights", "m.onnx is an ONNX file")
    assert_one_line_error(run_cli("bench", f"{SPEC_FILE}:make", "--input-shape", "1,5,8,8"),
                          "rejects it at conv1 (Conv2d)")
    assert_one_line_error(run_cli("bench", "nowhere.py:make"), "nowhere.py", "not found")
    assert_one_line_error(run_cli("bench", "model:1"), "model:1", "not a model spec")


def test_fold_of_a_spec_torch_export_refuses_is_one_line(tmp_path):
    """A branch on the data: torch.export prints its partial graph before raising; the command says one line."""
    import user_models

    spec = f"{user_models.__file__}:make_data_dependent"
    result = run_cli("fold", spec, "--input-shape", "1,3,6,6", "-o", tmp_path / "folded.pt2")
    assert_one_line_error(result, spec, "torch.export cannot export it")
    assert not list(tmp_path.iterdir())
