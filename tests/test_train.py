import pytest
import torch

from bnexport.artifacts import sha256_file
from bnexport.config import TrainConfig
from bnexport.data import make_synthetic
from bnexport.errors import BnexportError
from bnexport.train.loop import (History, learning_rate, load_checkpoint, model_from_checkpoint, new_state, resume_state,
                            save_checkpoint, train)

SMALL = dict(dataset="synthetic", synthetic_shape=(1, 12, 12), synthetic_size=512, batch_size=32)


def small_run(epochs=2, **overrides):
    config = TrainConfig(**{**SMALL, "epochs": epochs, **overrides})
    data = make_synthetic(config.synthetic_shape, size=config.synthetic_size, seed=config.seed)
    return config, data


def test_training_learns_and_records_history():
    config, data = small_run(epochs=3)
    state = train(new_state(config, data), data, progress=False)
    history = state.history
    assert len(history.step_loss) == 3 * 12  # 384 train samples / 32
    assert history.epoch_end_step == [12, 24, 36]
    assert len(history.test_accuracy) == 3
    assert history.test_accuracy[-1] > 0.8  # chance is 0.1
    assert sum(history.step_loss[-5:]) < sum(history.step_loss[:5])
    assert not state.model.training


def test_same_seed_same_checkpoint(tmp_path):
    config, data = small_run()
    paths = []
    for run in range(2):
        state = train(new_state(config, data), data, progress=False)
        paths.append(save_checkpoint(state, tmp_path / f"run{run}.pt"))
    a, b = (load_checkpoint(p) for p in paths)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["history"] == b["history"]
    assert sha256_file(paths[0]) == sha256_file(paths[1])  # byte-identical files
    other = train(new_state(TrainConfig(**{**SMALL, "epochs": 2, "seed": 1}), data), data, progress=False)
    assert not torch.equal(other.model.state_dict()["conv1.weight"], a["state_dict"]["conv1.weight"])


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    config, data = small_run(epochs=3)  # cosine schedule: the rate depends on the global step
    straight = train(new_state(config, data), data, progress=False)

    def save_then_crash(state):
        save_checkpoint(state, tmp_path / "ckpt.pt")
        raise Interrupted

    with pytest.raises(Interrupted):
        train(new_state(config, data), data, progress=False, on_epoch_end=save_then_crash)
    resumed = resume_state(load_checkpoint(tmp_path / "ckpt.pt"), config, data, path=tmp_path / "ckpt.pt")
    assert resumed.epoch == 1
    train(resumed, data, progress=False)
    assert resumed.history.step_loss == straight.history.step_loss
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_checkpoint_resume_continues_step_for_step(tmp_path):
    config, data = small_run(epochs=3, schedule="constant")
    straight = train(new_state(config, data), data, progress=False)

    half = new_state(small_run(epochs=1, schedule="constant")[0], data)
    train(half, data, progress=False)
    save_checkpoint(half, tmp_path / "ckpt.pt")
    resumed = resume_state(load_checkpoint(tmp_path / "ckpt.pt"), config, data, path=tmp_path / "ckpt.pt")
    train(resumed, data, progress=False)
    assert resumed.epoch == 3
    assert resumed.history.step_loss == straight.history.step_loss
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_cosine_schedule():
    config = TrainConfig(lr=0.01)
    assert learning_rate(config, 0, 100) == pytest.approx(0.01)
    assert learning_rate(config, 50, 100) == pytest.approx(0.005)
    assert learning_rate(config, 100, 100) == pytest.approx(0.0)
    assert learning_rate(TrainConfig(lr=0.01, schedule="constant"), 70, 100) == 0.01


def test_checkpoint_holds_what_rebuilds_the_model(tmp_path):
    config, data = small_run(epochs=1)
    state = train(new_state(config, data), data, progress=False)
    payload = load_checkpoint(save_checkpoint(state, tmp_path / "c.pt"))
    assert payload["config"]["seed"] == 0 and payload["config"]["dataset"] == "synthetic"
    assert payload["model_spec"] == {"in_channels": 1, "height": 12, "width": 12, "num_classes": 10,
                                     "channels": 16, "batch_norm": True}
    assert payload["versions"]["torch"] == torch.__version__
    model, spec = model_from_checkpoint(payload)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x), state.model.eval()(x))
    assert History.from_json(payload["history"]) == state.history


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(BnexportError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(BnexportError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(BnexportError, match="not a readable checkpoint"):
        load_checkpoint(evil)
    assert "code ran" not in capsys.readouterr().out


def test_mismatched_resume_is_refused(tmp_path):
    config, data = small_run(epochs=1)
    state = train(new_state(config, data), data, progress=False)
    save_checkpoint(state, tmp_path / "c.pt")
    payload = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(BnexportError, match="batch_norm"):
        resume_state(payload, TrainConfig(**{**SMALL, "batch_norm": False}), data, path="c.pt")
    other = make_synthetic((3, 12, 12), size=128, seed=0)
    with pytest.raises(BnexportError, match="does not fit dataset"):
        resume_state(payload, config, other, path="c.pt")
    torch.save({"format": 1}, tmp_path / "partial.pt")
    with pytest.raises(BnexportError, match="not a bnexport checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")
