"""The command end to end (one real run per session), its --help, and its answers to bad input."""

import os
import stat

import onnx
import pytest
import torch

from bnexport.artifacts import sha256_file
from conftest import assert_one_line_error, listed_options, listed_subcommands, read_json, run_bnexport, run_cli

EXPORTS = ["model.ts", "model.folded.ts", "model.pt2", "model.onnx", "model.folded.onnx"]


def test_train_and_export_writes_every_artifact(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    expected = {"checkpoint.pt", "history.json", "parity.json", "summary.json", "manifest.json", "fold.json", *EXPORTS}
    assert expected <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left behind


def test_summary_and_parity(tiny_run):
    summary = read_json(tiny_run / "summary.json")
    assert summary["dataset"]["name"] == "bundled" and summary["epochs"] == 2
    assert summary["batchnorm_layers"] == 1 and summary["batchnorm_folded"] == 1
    assert summary["parity"] == "pass"
    assert set(summary["stage_seconds"]) == {"data", "train", "compare", "export", "parity", "visualize"}
    assert summary["onnx_ops"]["model.onnx"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in summary["onnx_ops"]["model.folded.onnx"]
    assert summary["versions"]["torch"] == torch.__version__
    assert 0.1 < summary["test_accuracy"] <= 1.0

    parity = read_json(tiny_run / "parity.json")
    names = [r["name"] for r in parity["results"]]
    assert names[:4] == ["eager folded", "TorchScript", "TorchScript folded", "torch.export"]
    assert "ORT model.onnx (no graph opt)" in names and "ORT model.folded.onnx (no graph opt)" in names
    assert parity["passed"] and parity["input_shape"] == [64, 1, 28, 28]
    for r in parity["results"]:
        assert r["max_abs"] <= r["atol"] + r["rtol"] * r["scale"]
        assert r["top1_agreement"] == 1.0
    # unfolded TorchScript and torch.export run the very same kernels as eager
    assert parity["results"][1]["max_abs"] == 0.0


def test_fold_json_names_each_batchnorm_by_module_and_node(tiny_run):
    fold = read_json(tiny_run / "fold.json")
    nodes = {node.op_type: node.name for node in onnx.load(str(tiny_run / "model.onnx")).graph.node}
    folded = {"status": "folded", "reason": None, "position": "after", "reason_code": None,
              "split_over": None, "split_over_modules": None, "through": None, "into_scale": False}
    assert fold["torch"]["records"] == [{"batchnorm": "bn1", "folded_into": "conv1", "module": "bn1",
                                         "folded_into_module": "conv1", **folded}]
    assert fold["onnx"]["records"] == [{"batchnorm": nodes["BatchNormalization"], "folded_into": nodes["Conv"],
                                        "module": "bn1", "folded_into_module": "conv1", **folded}]


def test_history_and_manifest(tiny_run):
    history = read_json(tiny_run / "history.json")
    assert len(history["step_loss"]) == 16 and history["epoch_end_step"] == [8, 16]
    assert len(history["test_accuracy"]) == 2
    manifest = read_json(tiny_run / "manifest.json")
    files = {entry["file"]: entry for entry in manifest["files"]}
    assert set(EXPORTS) <= set(files)
    for name, entry in files.items():
        assert entry["sha256"] == sha256_file(tiny_run / name)
        assert entry["bytes"] == (tiny_run / name).stat().st_size
        assert entry["description"]


def test_terminal_ends_with_a_summary_table(tiny_run):
    stdout = (tiny_run / "stdout.txt").read_text()
    assert "TorchScript folded" in stdout and "test accuracy" in stdout and "parity" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("artifacts in")


def test_train_only_and_resume(tmp_path):
    args = ["--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--quiet", "--max-steps", "3", "--out", tmp_path]
    first = run_cli("train", "--epochs", "1", *args)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "history.json", "summary.json", "manifest.json"}
    resumed = run_cli("train", "--epochs", "2", "--resume", tmp_path / "checkpoint.pt", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert read_json(tmp_path / "history.json")["epoch_end_step"] == [3, 6]


# what the README documents; a command added or dropped must show up here
SUBCOMMANDS = ["train", "train-and-export", "export", "fold", "inspect", "parity", "bench", "visualize", "view", "recalibrate"]


def test_help_lists_the_subcommands():
    result = run_bnexport("--help")  # the entry point itself, once, in a fresh process
    assert result.returncode == 0 and result.stderr == ""
    assert listed_subcommands(result.stdout) == SUBCOMMANDS


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_listed_subcommand_has_its_own_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bnexport {command} ")
    assert {"-h", "--help"} <= listed_options(result.stdout)


def test_train_and_export_keeps_its_flags():
    options = listed_options(run_cli("train-and-export", "--help").stdout)
    assert {"--dataset", "--data-root", "--download", "--synthetic-shape", "--epochs", "--batch-size", "--lr",
            "--schedule", "--shift", "--seed", "--no-bn", "--max-steps", "--resume", "--out", "--quiet", "--device",
            "--sync-bn", "--recalibrate-bn", "--dist-timeout", "--atol", "--rtol", "--skip-no-bn"} <= options
    assert "--skip-no-bn" not in listed_options(run_cli("train", "--help").stdout)  # train makes no comparison run


def test_an_unknown_subcommand_is_one_line():
    assert_one_line_error(run_cli("frobnicate"), "invalid choice", "frobnicate")


@pytest.mark.parametrize("args, fragments", [
    (["--dataset", "svhn"], ["--dataset", "invalid choice"]),
    (["--epochs", "0"], ["--epochs", "positive integer"]),
    (["--batch-size", "-3"], ["--batch-size", "positive integer"]),
    (["--lr", "nan"], ["--lr"]),
    (["--atol", "-1"], ["--atol"]),
])
def test_bad_flags(tmp_path, args, fragments):
    out = tmp_path / "out"
    result = run_bnexport("train-and-export", *args, "--out", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    out = tmp_path / "out"
    result = run_cli("train", "--dataset", "mnist", "--data-root", tmp_path / "nothing", "--out", out)
    assert_one_line_error(result, "mnist", "--download")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_non_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    assert_one_line_error(run_cli("train", "--out", locked / "x"), "--out")


def test_unwritable_out_even_for_root():
    # /proc accepts no new folders, whoever asks
    result = run_bnexport("train", "--out", "/proc/bnexport-out/run")
    assert_one_line_error(result, "--out", "/proc/bnexport-out/run", "not writable")


def test_out_that_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    result = run_cli("train", "--out", target / "sub")
    assert_one_line_error(result, "--out", "file.txt")
    assert target.read_text() == "keep me"


def test_resume_from_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    result = run_cli("train", "--resume", bad, "--out", out, "--quiet")
    assert_one_line_error(result, "bad.pt", "not a readable checkpoint")
    assert list(out.iterdir()) == []
    assert bad.read_bytes() == b"\x00" * 100


def test_resume_from_mismatched_checkpoint(tmp_path):
    common = ["--quiet", "--max-steps", "2", "--epochs", "1"]
    made = run_cli("train", "--dataset", "synthetic", "--synthetic-shape", "3,8,8", *common, "--out", tmp_path / "a")
    assert made.returncode == 0, made.stderr
    result = run_cli("train", "--dataset", "synthetic", "--synthetic-shape", "1,8,8", *common,
                     "--resume", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "b")
    assert_one_line_error(result, "--resume", "does not fit")
    assert list((tmp_path / "b").iterdir()) == []
