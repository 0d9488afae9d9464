"""Recalibration: exact BatchNorm statistics, in the library and through ``bnexport recalibrate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnexport.artifacts import sha256_file
from bnexport.distributed.bn_statistics import recompute_running_stats, training_batches
from bnexport.cli import main
from bnexport.config import TrainConfig
from bnexport.data import epoch_order, make_synthetic
from bnexport.errors import BnexportError
from bnexport.model import ModelSpec, build_model
from bnexport.distributed.recalibrate import recalibrate_checkpoint
from bnexport.train.loop import load_checkpoint, model_from_checkpoint, new_state, save_checkpoint, train
from conftest import assert_one_line_error, run_bnexport, run_cli

SHAPE = (1, 10, 10)
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--batch-size", "32", "--quiet", "--device", "cpu"]


def exact_statistics(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The BN input's per-channel mean and unbiased variance over all ``images`` at once."""
    with torch.no_grad():
        activations = model.conv1(images).double()
    return activations.mean((0, 2, 3)), activations.var((0, 2, 3), unbiased=True)


def test_recalibrate_gives_the_exact_dataset_statistics():
    images = make_synthetic(SHAPE, size=300, seed=1).train_images  # 225 images: batches of 64 leave 33 over
    model = build_model(ModelSpec.for_images(SHAPE), seed=0)
    report = recompute_running_stats(model, training_batches(images, torch.arange(len(images)), batch_size=64))
    mean, var = exact_statistics(model, images)
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-6, atol=1e-7)
    assert report.samples == 225 and report.batches == 4 and int(model.bn1.num_batches_tracked) == 4
    layer = report.layers["bn1"]
    assert layer.values_per_channel == 225 * 100
    # PyTorch's momentum=None average of batch variances is close, but not the exact answer
    assert 0 < layer.cumulative_average_var_error < 0.05
    assert model.bn1.momentum == 0.1 and model.training  # settings restored


def test_swa_update_bn_is_what_the_cumulative_average_gives():
    """The independent oracle for the momentum=None half: torch.optim.swa_utils.update_bn."""
    images = make_synthetic(SHAPE, size=300, seed=1).train_images
    ours = build_model(ModelSpec.for_images(SHAPE), seed=0)
    theirs = build_model(ModelSpec.for_images(SHAPE), seed=0)
    batches = list(training_batches(images, torch.arange(len(images)), batch_size=64))
    report = recompute_running_stats(ours, batches)
    torch.optim.swa_utils.update_bn(batches, theirs)
    # update_bn's mean is a plain average of batch means: off only through the short last batch
    torch.testing.assert_close(theirs.bn1.running_mean, ours.bn1.running_mean, rtol=0.05, atol=0.05)
    error = ((theirs.bn1.running_var.double() - ours.bn1.running_var.double()).abs() / ours.bn1.running_var.double()).max()
    assert float(error) == pytest.approx(report.layers["bn1"].cumulative_average_var_error, rel=1e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recalibrate")
    result = run_cli("train", *TINY, "--epochs", "1", "--max-steps", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    return out / "checkpoint.pt"


def test_recalibrate_command_writes_a_new_checkpoint(trained):
    before = sha256_file(trained)
    result = run_cli("recalibrate", trained)
    assert result.returncode == 0, result.stderr
    output = trained.with_name("checkpoint.recalibrated.pt")
    assert sha256_file(trained) == before  # the input is never touched
    assert "bn1" in result.stdout and f"written {output}" in result.stdout
    payload = load_checkpoint(output)
    model, _ = model_from_checkpoint(payload)
    data = make_synthetic(SHAPE, size=2048, seed=0)
    mean, var = exact_statistics(model, data.train_images)
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    record = payload["bn_recalibration"]
    assert record["samples"] == len(data.train_images) and record["batches"] == 48
    # three training steps leave the running statistics far from the data's: recalibration helps
    assert record["test_accuracy_after"] > record["test_accuracy_before"]
    old = load_checkpoint(trained)["state_dict"]
    assert torch.equal(old["conv1.weight"], payload["state_dict"]["conv1.weight"])  # weights untouched


def test_recalibrate_over_n_batches(trained, tmp_path):
    output = tmp_path / "two.pt"
    result = recalibrate_checkpoint(trained, output, batches=2)
    assert result.recalibration.batches == 2 and result.recalibration.samples == 64  # the checkpoint's batch size, 32
    model, _ = model_from_checkpoint(load_checkpoint(output))
    data = make_synthetic(SHAPE, size=2048, seed=0)
    first_two = data.train_images[epoch_order(len(data.train_images), seed=0, epoch=0)[:64]]
    mean, var = exact_statistics(model, first_two)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert load_checkpoint(output)["bn_recalibration"]["batches"] == 2


def test_recalibrate_refuses_to_overwrite_its_input_unless_asked(trained, tmp_path):
    copy = tmp_path / "c.pt"
    copy.write_bytes(trained.read_bytes())
    before = sha256_file(copy)
    assert_one_line_error(run_cli("recalibrate", copy, "-o", copy), "--in-place")
    assert sha256_file(copy) == before
    recalibrate_checkpoint(copy, batches=1, in_place=True)
    assert sha256_file(copy) != before and load_checkpoint(copy)["bn_recalibration"]["batches"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left


def test_recalibrate_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert_one_line_error(run_bnexport("recalibrate", bad), "not a readable checkpoint")  # a fresh process, once
    with pytest.raises(BnexportError, match="not found"):
        recalibrate_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(BnexportError, match="does not exist"):
        recalibrate_checkpoint(bad, tmp_path / "no" / "such" / "folder.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["recalibrate", str(bad), "--batches", "0"])
    assert exit_info.value.code == 2 and "--batches" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_recalibrate_a_model_without_batchnorm(tmp_path):
    config = TrainConfig(dataset="synthetic", synthetic_shape=SHAPE, batch_norm=False, epochs=1, max_steps=1)
    data = make_synthetic(SHAPE, size=config.synthetic_size, seed=0)
    save_checkpoint(train(new_state(config, data), data, progress=False), tmp_path / "c.pt")
    with pytest.raises(BnexportError, match="no BatchNorm"):
        recalibrate_checkpoint(tmp_path / "c.pt")


def test_recalibrate_bn_at_the_end_of_a_one_process_run():
    from bnexport.distributed.process_group import Replicas

    config = TrainConfig(dataset="synthetic", synthetic_shape=SHAPE, synthetic_size=400, epochs=1, max_steps=2)
    data = make_synthetic(SHAPE, size=config.synthetic_size, seed=0)
    replicas = Replicas(recalibrate_bn=True)
    state = train(new_state(config, data), data, progress=False, replicas=replicas)
    mean, var = exact_statistics(state.model, data.train_images)  # shifts are for training only
    torch.testing.assert_close(state.model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert replicas.to_json()["recalibration"]["samples"] == 300 and replicas.to_json()["bn_statistics"] == "recalibrated"
