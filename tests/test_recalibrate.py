"""Recalibration: exact BatchNorm statistics, in the library and through ``bnexport recalibrate``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
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
from conftest import REPO, assert_one_line_error, run_bnexport, run_cli

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


# A model spec: `recalibrate MODEL --data ... -o OUT.pt` ---------------------------------

SPEC_FILE = REPO / "tests" / "spec_models.py"


def batchnorm_inputs_in_eval(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Every BatchNorm's input over all samples at once, the model in eval mode and in float64."""
    model = copy.deepcopy(model).double().eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
             for name, module in model.named_modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(*(t.double() for t in inputs))
    for hook in hooks:
        hook.remove()
    return seen


def per_channel(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = values.transpose(0, 1).reshape(values.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def assert_statistics_are_their_inputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """The fixed point a recalibrated model must be at: in eval mode, each BatchNorm's running mean and
    variance are those of its own input, with every BatchNorm normalising by its running statistics."""
    layers = dict(model.named_modules())
    observed = batchnorm_inputs_in_eval(model, inputs)
    assert observed, "no BatchNorm was called"
    for name, values in observed.items():
        mean, var = per_channel(values)
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.fixture
def spec_run(tmp_path):
    """The spec's model with weights of its own, saved as a state dict, and 45 samples away from zero mean."""
    import spec_models

    torch.manual_seed(3)
    model = spec_models.randomise_batchnorm(spec_models.ConvNet(), seed=3)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    samples = (np.random.default_rng(5).standard_normal((45, 3, 10, 10)) * 2 + 0.5).astype(np.float32)
    np.save(tmp_path / "samples.npy", samples)
    return tmp_path / "weights.pt", tmp_path / "samples.npy", model


def recalibrated_model(path: Path):
    import spec_models

    model = spec_models.ConvNet()
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    model.load_state_dict(state)
    return model.eval(), state


def test_recalibrate_a_model_spec_over_user_data(spec_run, tmp_path):
    weights, samples, original = spec_run
    before = sha256_file(weights)
    outputs = {}
    for batch_size in (7, 64):  # 45 samples: batches of 7 leave 3 over; 64 takes them all at once
        out = tmp_path / f"new{batch_size}.pt"
        result = run_cli("recalibrate", f"{SPEC_FILE}:make", "--data", samples, "--weights", weights, "-o", out,
                         "--batch-size", batch_size)
        assert result.returncode == 0, result.stderr
        assert "bn1" in result.stdout and "bn2" in result.stdout and f"written {out}" in result.stdout
        outputs[batch_size] = recalibrated_model(out)
    assert sha256_file(weights) == before
    data = (torch.from_numpy(np.load(samples)),)
    model, state = outputs[7]
    assert_statistics_are_their_inputs(model, data)
    other, other_state = outputs[64]
    for name in ("bn1", "bn2"):  # the same numbers, whatever the batch size
        for buffer in ("running_mean", "running_var"):
            torch.testing.assert_close(state[f"{name}.{buffer}"], other_state[f"{name}.{buffer}"], rtol=1e-6, atol=1e-7)
    # every other tensor is the --weights file's
    kept = {k: v for k, v in original.state_dict().items() if "running" not in k and "num_batches" not in k}
    for key, value in kept.items():
        assert torch.equal(state[key], value), key
    assert not torch.allclose(state["bn2.running_var"], original.bn2.running_var)  # the statistics did move
    # the file is a --weights for any command
    from bnexport.model_spec import load_model

    loaded = load_model(f"{SPEC_FILE}:make", weights=tmp_path / "new7.pt")
    assert torch.equal(loaded.module.bn2.running_mean, state["bn2.running_mean"])


def test_recalibrate_a_two_input_spec_over_an_npz(tmp_path):
    import spec_models

    rng = np.random.default_rng(8)
    arrays = {"image": rng.standard_normal((20, 3, 6, 6)).astype(np.float32) + 1,
              "features": rng.random((20, 7)).astype(np.float32)}
    np.savez(tmp_path / "data.npz", **arrays)
    result = run_cli("recalibrate", f"{SPEC_FILE}:make_two_inputs", "--data", tmp_path / "data.npz",
                     "-o", tmp_path / "new.pt", "--batch-size", "6", "--batches", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 18 and report["batches"] == 3 and report["data"] == "18 samples from data.npz"
    assert "test_accuracy_before" not in report
    model = spec_models.TwoInputNet()
    model.load_state_dict(torch.load(tmp_path / "new.pt", weights_only=True))
    assert_statistics_are_their_inputs(model.eval(), tuple(torch.from_numpy(arrays[k][:18]) for k in ("image", "features")))


def test_recalibrate_in_place_replaces_only_a_plain_state_dict(spec_run, tmp_path):
    weights, samples, _ = spec_run
    before = sha256_file(weights)
    result = run_cli("recalibrate", f"{SPEC_FILE}:make", "--data", samples, "--weights", weights, "--in-place")
    assert result.returncode == 0, result.stderr
    assert sha256_file(weights) != before
    model, _ = recalibrated_model(weights)
    assert_statistics_are_their_inputs(model, (torch.from_numpy(np.load(samples)),))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": torch.load(weights, weights_only=True), "epoch": 3}, wrapped)
    kept = sha256_file(wrapped)
    assert_one_line_error(run_cli("recalibrate", f"{SPEC_FILE}:make", "--data", samples, "--weights", wrapped,
                                  "--in-place"), "--in-place", "more than a state dict", "-o")
    assert sha256_file(wrapped) == kept


@pytest.mark.parametrize("args, fragments", [
    (["--data", "samples.npy", "--weights", "weights.pt"], ["-o OUT.pt is required", "model spec"]),
    (["--data", "samples.npy", "--weights", "weights.pt", "-o", "weights.pt"], ["-o weights.pt", "the --weights file"]),
    (["--data", "samples.npy", "--in-place"], ["--in-place", "no --weights file"]),
    (["-o", "new.pt"], ["--data", "give the samples"]),
    (["--data", "missing.npy", "-o", "new.pt"], ["--data missing.npy", "not found"]),
    (["--data", "samples.txt", "-o", "new.pt"], ["--data samples.txt", "folder of images or an .npy/.npz"]),
    (["--data", "samples.npy", "-o", "new.pt", "--input-shape", "1,3,12,12"],
     ["--data samples.npy", "samples of images are [3, 10, 10]", "[3, 12, 12]"]),
    (["--data", "narrow.npy", "-o", "new.pt"], ["rejects it at conv1 (Conv2d)"]),
    (["--data", "samples.npy", "-o", "new.pt", "--weights", "junk.pt"], ["--weights junk.pt", "cannot read it"]),
    (["--data", "samples.npy", "-o", "no/such/new.pt"], ["-o no/such/new.pt", "does not exist"]),
])
def test_recalibrate_bad_spec_input_is_one_line(args, fragments, spec_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.txt").write_text("1 2 3")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    np.save(tmp_path / "narrow.npy", np.zeros((4, 2, 10, 10), np.float32))
    present = sorted(p.name for p in tmp_path.iterdir())
    before = sha256_file(tmp_path / "weights.pt")
    assert_one_line_error(run_cli("recalibrate", f"{SPEC_FILE}:make", *args), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == present and sha256_file(tmp_path / "weights.pt") == before


def test_recalibrate_spec_errors_name_the_spec(spec_run, tmp_path):
    _, samples, _ = spec_run
    assert_one_line_error(run_cli("recalibrate", f"{SPEC_FILE}:make_without_batchnorm", "--data", samples,
                                  "-o", tmp_path / "n.pt"), "make_without_batchnorm", "no BatchNorm")
    assert_one_line_error(run_cli("recalibrate", "torchvision:resnet_eighteen", "--data", samples, "-o", tmp_path / "n.pt"),
                          "torchvision:resnet_eighteen", "no model")
    assert not (tmp_path / "n.pt").exists()


def test_recalibrate_checkpoint_refuses_spec_flags(trained, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 10, 10), np.float32))
    assert_one_line_error(run_cli("recalibrate", trained, "--data", tmp_path / "x.npy"),
                          "--data", "bnexport checkpoint", "its own training data")
