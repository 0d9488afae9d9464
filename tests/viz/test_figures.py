"""Each figure function on real or constructed data: files, sizes, formats, and what they compute."""

import numpy as np
import pytest
import torch
from PIL import Image

from bnexport.model import ModelSpec, build_model
from bnexport.train.recording import BNStats, LayerStats, RunCurves
from bnexport.viz import activations, bn_layer, parity_errors as parity, running_stats, training
from bnexport.viz.common import PNG_DPI, save_figure, smooth


@pytest.fixture(scope="module")
def captured():
    model = build_model(ModelSpec(), seed=0).eval()
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, images, activations.capture_bn_activations(model, images)


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_capture_gives_train_and_eval_outputs(captured):
    model, images, layers = captured
    [layer] = layers
    assert layer.name == "bn1" and layer.before.shape == (32, 16, 28, 28)
    with torch.no_grad():
        expected_eval = model.bn1(model.conv1(images)).numpy()
    np.testing.assert_allclose(layer.after_eval, expected_eval, rtol=1e-5, atol=1e-6)
    # train mode normalises with the batch's own statistics: per channel mean β (=0) and std γ (=1)
    np.testing.assert_allclose(layer.after_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(layer.after_train.std(axis=(0, 2, 3)), 1.0, atol=1e-2)
    assert model.bn1.num_batches_tracked.item() == 0  # the model's own statistics were not touched
    assert layer.gap_per_channel().shape == (16,)


def test_bn_layer_figures(captured, tmp_path):
    _, images, [layer] = captured
    width, height = png_size(bn_layer.plot_channel_histograms(layer, tmp_path / "h.png"))
    assert width >= 10 * PNG_DPI and height >= 6 * PNG_DPI
    width, height = png_size(bn_layer.plot_sample_channels(layer, images[0].numpy(), tmp_path / "c.png"))
    assert width >= 10 * PNG_DPI and height >= 2 * PNG_DPI
    png_size(activations.plot_activation_distributions([layer], tmp_path / "a.png"))


def test_no_batchnorm_figures_say_so(tmp_path):
    model = build_model(ModelSpec(batch_norm=False), seed=0).eval()
    assert activations.capture_bn_activations(model, torch.rand(4, 1, 28, 28)) == []
    for draw in (lambda p: bn_layer.plot_channel_histograms(None, p),
                 lambda p: bn_layer.plot_sample_channels(None, None, p),
                 lambda p: activations.plot_activation_distributions([], p)):
        path = draw(tmp_path / "x.svg")
        assert "no BatchNorm layers" in path.read_text()


def test_svg_output_is_text_and_reproducible(captured, tmp_path):
    _, _, [layer] = captured
    first = bn_layer.plot_channel_histograms(layer, tmp_path / "a.svg").read_bytes()
    second = bn_layer.plot_channel_histograms(layer, tmp_path / "b.svg").read_bytes()
    assert first.startswith(b"<?xml") and b"channel" in first
    assert first == second


def test_unknown_format_is_refused(tmp_path):
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="png"):
        save_figure(Figure(), tmp_path / "x.jpg")


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert smooth(np.array([]), 5).size == 0


def curves(batch_norm: bool, accuracies, probe) -> RunCurves:
    return RunCurves(batch_norm=batch_norm, step_loss=list(np.linspace(2.3, 0.1, 40)), epoch_end_step=[20, 40],
                     test_accuracy=accuracies, accuracy_steps=[5, 10, 15, 20, 25, 30, 35, 40], accuracy_probe=probe,
                     train_seconds=1.5)


def test_training_effect_and_curves(tmp_path):
    with_bn = curves(True, [0.93, 0.97], [0.5, 0.8, 0.91, 0.93, 0.95, 0.96, 0.96, 0.97])
    without = curves(False, [0.85, 0.92], [0.3, 0.6, 0.7, 0.85, 0.88, 0.9, 0.91, 0.92])
    effects = training.training_effect([without, with_bn])
    assert [e.batch_norm for e in effects] == [True, False]
    assert effects[0].accuracy_after_epoch_1 == 0.93 and effects[0].steps_to_target == 15
    assert effects[1].steps_to_target == 30 and effects[1].total_steps == 40
    unprobed = RunCurves(batch_norm=True, step_loss=[1.0] * 40, epoch_end_step=[20, 40], test_accuracy=[0.8, 0.95])
    assert unprobed.steps_to_reach(0.9) == 40  # nothing probed: epoch ends decide
    never = curves(False, [0.5, 0.6], [0.1] * 8)
    assert never.steps_to_reach(0.9) is None
    assert "never 90%" in training.describe_effect(training.training_effect([never]))[0]
    width, height = png_size(training.plot_training_curves([with_bn, without], tmp_path / "t.png"))
    assert width >= 11 * PNG_DPI and height >= 5 * PNG_DPI


def test_running_statistics_figure(tmp_path):
    steps = list(range(1, 11))
    layer = LayerStats("bn1", 16, 0.1, batch_mean=[[0.1 * s] * 4 for s in steps], batch_var=[[1.0] * 4 for _ in steps],
                       running_mean=[[0.09 * s] * 4 for s in steps], running_var=[[0.9] * 4 for _ in steps])
    stats = BNStats(steps=steps, epoch_end_step=[5, 10], layers=[layer])
    assert BNStats.from_json(stats.to_json()) == stats
    png_size(running_stats.plot_running_statistics(stats, tmp_path / "r.png"))
    message = running_stats.plot_running_statistics(None, tmp_path / "none.svg", reason="nothing recorded here")
    assert "nothing recorded here" in message.read_text()


def test_parity_comparisons_and_figure(tmp_path):
    reference = np.linspace(-5, 5, 40).reshape(4, 10)
    outputs = {"reference": reference, "same": reference.copy(), "off": reference + 1e-3}
    report = {"results": [
        {"name": "same", "atol": 1e-5, "rtol": 1e-4, "scale": 5.0, "passed": True},
        {"name": "off", "atol": 1e-5, "rtol": 1e-4, "scale": 5.0, "passed": False},
        {"name": "missing", "atol": 1e-5, "rtol": 1e-4, "scale": 5.0, "passed": True},
    ]}
    found = parity.comparisons_from_outputs(report, outputs)
    assert [c.name for c in found] == ["same", "off"]
    assert found[0].abs_diff.max() == 0.0 and found[1].abs_diff.min() == pytest.approx(1e-3)
    assert found[1].threshold == pytest.approx(1e-5 + 1e-4 * 5.0)
    png_size(parity.plot_parity(found, tmp_path / "p.png"))


def test_parity_comparisons_of_several_outputs_take_the_reference_of_the_same_output():
    logits, features = np.arange(8.0).reshape(2, 4), np.arange(32.0).reshape(2, 4, 2, 2)
    outputs = {"reference": logits, "reference [output 0]": logits, "reference [output 1]": features,
               "ort [output 0]": logits + 1e-3, "ort [output 1]": features + 2e-3}
    report = {"results": [
        {"name": "ort [output 0]", "atol": 1e-5, "rtol": 1e-4, "scale": 7.0, "passed": False},
        {"name": "ort [output 1]", "atol": 1e-5, "rtol": 1e-4, "scale": 31.0, "passed": False},
    ]}
    found = parity.comparisons_from_outputs(report, outputs)
    assert [c.abs_diff.size for c in found] == [8, 32]
    assert found[0].abs_diff == pytest.approx(np.full(8, 1e-3))
    assert found[1].abs_diff == pytest.approx(np.full(32, 2e-3))
