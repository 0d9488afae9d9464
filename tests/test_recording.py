"""The training recorder: what it records, and that recording changes nothing about training."""

import torch

from bnexport.config import TrainConfig
from bnexport.data import make_synthetic
from bnexport.train.recording import MAX_RECORDED_CHANNELS, TrainingRecorder, total_steps, train_twin
from bnexport.train.loop import new_state, train

CONFIG = TrainConfig(dataset="synthetic", epochs=2, max_steps=5, batch_size=32, synthetic_shape=(1, 8, 8))


def dataset():
    return make_synthetic((1, 8, 8), size=512, seed=0)


def test_recorded_statistics_match_the_model():
    data = dataset()
    state = new_state(CONFIG, data)
    recorder = TrainingRecorder(probes=5).attach(state.model, data, total_steps=total_steps(CONFIG, data))
    train(state, data, progress=False, on_step=recorder)
    recorder.close()
    stats = recorder.bn_stats(state.history)
    assert stats.steps == list(range(1, 11)) and stats.epoch_end_step == [5, 10]
    [layer] = stats.layers
    assert layer.name == "bn1" and layer.channels == 16 and layer.momentum == 0.1
    assert len(layer.batch_mean) == 10 and len(layer.batch_mean[0]) == min(16, MAX_RECORDED_CHANNELS)
    torch.testing.assert_close(torch.tensor(layer.running_mean[-1]), state.model.bn1.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(layer.running_var[-1]), state.model.bn1.running_var, rtol=1e-5, atol=1e-6)
    # the running update: r_k = 0.9 r_{k-1} + 0.1 batch_k, with the unbiased batch variance
    for k in range(1, 10):
        expected = [0.9 * r + 0.1 * b for r, b in zip(layer.running_var[k - 1], layer.batch_var[k])]
        torch.testing.assert_close(torch.tensor(layer.running_var[k]), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert recorder.accuracy_steps == [2, 4, 6, 8, 10] and all(0 <= a <= 1 for a in recorder.accuracy_probe)
    assert recorder._handles == []  # hooks removed


def test_recording_leaves_training_unchanged():
    data = dataset()
    plain = train(new_state(CONFIG, data), data, progress=False)
    watched = new_state(CONFIG, data)
    recorder = TrainingRecorder(probes=10).attach(watched.model, data, total_steps=total_steps(CONFIG, data))
    train(watched, data, progress=False, on_step=recorder)
    recorder.close()
    assert plain.history.step_loss == watched.history.step_loss
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, watched.model.state_dict()[key]), key


def test_twin_switches_batchnorm_and_nothing_else():
    data = dataset()
    twin = train_twin(CONFIG, data, progress=False)
    assert twin.batch_norm is False and twin.epoch_end_step == [5, 10] and len(twin.test_accuracy) == 2
    assert twin.train_seconds is not None and twin.accuracy_steps
    again = train_twin(CONFIG, data, progress=False)
    assert again.step_loss == twin.step_loss  # same seed, same run


def test_recorder_follows_a_bn_layer_swapped_during_training():
    """As --sync-bn does: the BN module is replaced after the recorder hooked the original."""
    data = dataset()
    state = new_state(CONFIG, data)
    recorder = TrainingRecorder(probes=5).attach(state.model, data, total_steps=total_steps(CONFIG, data))
    replacement = torch.nn.BatchNorm2d(16)
    replacement.load_state_dict(state.model.bn1.state_dict())
    state.model.bn1 = replacement
    train(state, data, progress=False, on_step=recorder)
    recorder.close()
    [layer] = recorder.bn_stats(state.history).layers
    # the first step ran before the recorder saw the swap; every later one is recorded
    assert len(layer.batch_mean) == 9
    torch.testing.assert_close(torch.tensor(layer.running_mean[-1]), replacement.running_mean, rtol=1e-5, atol=1e-6)
    assert recorder._handles == []


def test_total_steps_counts_one_ranks_shard():
    from bnexport.distributed.process_group import Replicas

    data = dataset()  # 384 training samples
    config = TrainConfig(dataset="synthetic", epochs=2, batch_size=32, synthetic_shape=(1, 8, 8))
    assert total_steps(config, data) == 2 * 12
    assert total_steps(config, data, replicas=Replicas(rank=1, world_size=2)) == 2 * 6
    assert total_steps(config, data, replicas=Replicas(world_size=5)) == 2 * 3  # ceil(384 / 5) = 77 → 3 steps
