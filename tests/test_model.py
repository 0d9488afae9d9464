import pytest
import torch

from bnexport.model import ModelSpec, SimpleCNN, build_model, count_batchnorm


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 9, 13)])
def test_simplecnn_sizes_itself_from_the_dataset(shape):
    model = SimpleCNN(ModelSpec.for_images(shape)).eval()
    assert model.conv1.in_channels == shape[0]
    assert model.fc1.in_features == 16 * (shape[1] // 2) * (shape[2] // 2)
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_article_layer_order():
    model = SimpleCNN()
    names = [name for name, _ in model.named_children()]
    assert names == ["conv1", "bn1", "relu", "max_pool", "fc1"]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.padding == (1, 1)
    assert model.max_pool.kernel_size == 2


def test_no_bn_variant():
    assert count_batchnorm(SimpleCNN(ModelSpec(batch_norm=True))) == 1
    model = SimpleCNN(ModelSpec(batch_norm=False))
    assert count_batchnorm(model) == 0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_build_model_is_seeded_without_touching_global_rng():
    state = torch.get_rng_state()
    a, b = build_model(ModelSpec(), seed=5), build_model(ModelSpec(), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 2x2"):
        SimpleCNN(ModelSpec(height=1, width=5))
