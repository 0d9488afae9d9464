"""Datasets as in-memory tensors: bundled MNIST, torchvision MNIST/FashionMNIST/CIFAR10, synthetic.

Every dataset here is small enough to hold in memory, so images are decoded once into a
float32 tensor in [0, 1] (what the article's ``ToTensor`` gives) and batches are slices of it.
No per-sample PIL conversion happens in the training loop. A user's own ``--data`` (an image
folder or an .npy/.npz file) is read here too: a seeded few samples for the export report's
figures (``load_figure_data``), or every one for ``recalibrate`` (``load_samples``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .config import DATASETS, DEFAULT_SEED, PARITY_BATCH_SIZE, TrainConfig
from .errors import BnexportError

NUM_CLASSES = 10
BUNDLED_FILE = "mnist_5k.npz"


@dataclass
class Dataset:
    """A train/test split held as tensors: images (N, C, H, W) float32, labels (N,) int64."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int = NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "train_size": len(self.train_labels),
            "test_size": len(self.test_labels),
        }


def _to_float_images(uint8_images: np.ndarray | torch.Tensor, *, channels_last: bool) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(uint8_images))
    if images.ndim == 3:  # greyscale (N, H, W)
        images = images.unsqueeze(1)
    elif channels_last:  # (N, H, W, C), as CIFAR-10 stores it
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().to(torch.float32).div_(255.0)


def load_bundled() -> Dataset:
    """The 5,000 real MNIST digits shipped with the package (4,000 train / 1,000 test)."""
    with resources.files("bnexport.assets").joinpath(BUNDLED_FILE).open("rb") as handle:
        arrays = np.load(handle)
        return Dataset(
            name="bundled",
            train_images=_to_float_images(arrays["train_images"], channels_last=False),
            train_labels=torch.as_tensor(arrays["train_labels"]).long(),
            test_images=_to_float_images(arrays["test_images"], channels_last=False),
            test_labels=torch.as_tensor(arrays["test_labels"]).long(),
        )


def _torchvision_split(name: str, root: Path, *, train: bool, download: bool):
    from torchvision import datasets  # imported late: only these datasets need it

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(root=str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise BnexportError(f"--dataset {name}: download into {root} failed: {err}") from None
        raise BnexportError(
            f"--dataset {name}: not found under --data-root {root}; "
            f"run again with --download to fetch it (needs network access)"
        ) from None
    except OSError as err:
        raise BnexportError(f"--dataset {name}: cannot read {root}: {err.strerror or err}") from None


def load_torchvision(name: str, root: str | Path, *, download: bool = False) -> Dataset:
    """MNIST, FashionMNIST or CIFAR-10 through torchvision; downloads only when asked."""
    root = Path(root)
    splits = [_torchvision_split(name, root, train=train, download=download) for train in (True, False)]
    channels_last = name == "cifar10"
    images = [_to_float_images(split.data, channels_last=channels_last) for split in splits]
    labels = [torch.as_tensor(np.asarray(split.targets)).long() for split in splits]
    return Dataset(name, images[0], labels[0], images[1], labels[1])


def make_synthetic(
    shape: tuple[int, int, int] = (1, 28, 28),
    *,
    size: int = 2048,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
) -> Dataset:
    """A learnable dataset of any shape: each class is a fixed smooth random template plus noise.

    Templates are upsampled from a coarse grid, so small shifts (the default augmentation)
    keep a class recognisable. A quarter of the samples form the test split. The same seed
    gives the same tensors.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise BnexportError(f"synthetic shape must be three positive sizes C,H,W, got {shape}")
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand((num_classes, channels, max(2, height // 4), max(2, width // 4)), generator=generator)
    templates = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    noise = torch.rand((size, *shape), generator=generator)
    images = (0.6 * templates[labels] + 0.4 * noise).contiguous()
    n_test = max(1, size // 4)
    return Dataset(
        "synthetic",
        images[n_test:].clone(), labels[n_test:].clone(),
        images[:n_test].clone(), labels[:n_test].clone(),
        num_classes=num_classes,
    )


def load_dataset(
    name: str,
    *,
    data_root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (1, 28, 28),
    synthetic_size: int = 2048,
) -> Dataset:
    if name == "bundled":
        return load_bundled()
    if name == "synthetic":
        return make_synthetic(synthetic_shape, size=synthetic_size, seed=seed)
    if name in DATASETS:
        return load_torchvision(name, data_root, download=download)
    raise BnexportError(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_for_config(config: TrainConfig, *, download: bool | None = None) -> Dataset:
    """The dataset a run's config names; ``download`` overrides the config's own switch."""
    return load_dataset(config.dataset, data_root=config.data_root,
                        download=config.download if download is None else download, seed=config.seed,
                        synthetic_shape=config.synthetic_shape, synthetic_size=config.synthetic_size)


def epoch_generator(*, seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(num_samples: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, a function of (seed, epoch) alone.

    Deriving it afresh each epoch, rather than from a generator that carries state across
    epochs, is what makes a resumed run identical to an uninterrupted one.
    """
    return torch.randperm(num_samples, generator=epoch_generator(seed=seed, epoch=epoch))


def random_shift(images: torch.Tensor, max_shift: int, *, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels, zero-filled.

    Shifts are the cheapest augmentation that helps a one-conv net on 4,000 digits; they are
    done on the whole batch with one gather, not per sample.
    """
    if max_shift <= 0:
        return images
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(height)).view(n, 1, height, 1)
    cols = (dx + torch.arange(width)).view(n, 1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(channels).view(1, channels, 1, 1), rows, cols]


def parity_batch(dataset: Dataset, *, seed: int = DEFAULT_SEED, size: int = PARITY_BATCH_SIZE) -> torch.Tensor:
    """One fixed, seeded batch from the test split: the input of every parity check."""
    generator = torch.Generator().manual_seed(seed)
    size = min(size, len(dataset.test_labels))
    index = torch.randperm(len(dataset.test_labels), generator=generator)[:size]
    return dataset.test_images[index].clone()


# Figure data for a user's model (`bnexport export --data/--dataset`) -----------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class FigureData:
    """A batch of model inputs for the report's figures, and where it came from."""

    inputs: tuple[torch.Tensor, ...]  # one tensor per positional input of the model
    description: str
    synthetic: bool
    source: dict = field(default_factory=dict)  # load_figure_data's arguments: what reads the same samples again


@dataclass
class Samples:
    """Every sample of a user's data, as model inputs, and where they came from."""

    inputs: tuple[torch.Tensor, ...]  # one tensor per positional input of the model, samples along dim 0
    description: str

    @property
    def count(self) -> int:
        return len(self.inputs[0])


def load_figure_data(shapes: dict[str, tuple[int, ...]], *, data: str | Path | None = None, dataset: str | None = None,
                     seed: int = DEFAULT_SEED, size: int = 8, data_root: str | Path = "data",
                     download: bool = False) -> FigureData:
    """``size`` samples shaped as ``shapes`` (input name → N,C,H,W...) for the figures.

    ``data`` is a folder of images in class folders (torchvision's ``ImageFolder``; resized to the
    input's H×W, scaled to [0, 1]) or an .npy/.npz file of samples (uint8 is scaled to [0, 1]; an
    .npz holds one array per input name, or a single array); ``dataset`` a name of ``DATASETS``,
    its test split. With neither, seeded standard-normal input, and the figures say so.
    """
    if data is not None and dataset is not None:
        raise BnexportError("--data and --dataset: give one or the other")
    source = {"data": None if data is None else str(data), "dataset": dataset, "seed": seed, "size": size,
              "data_root": str(data_root)}
    if data is None and dataset is None:
        from .model_spec import seeded_tensors

        inputs = seeded_tensors(shapes, seed=seed, batch=size)
        dims = ", ".join("×".join(map(str, (size, *s[1:]))) for s in shapes.values())
        return FigureData(inputs, f"seeded synthetic input ({dims}, standard normal, seed {seed})", synthetic=True,
                          source=source)
    if dataset is not None:
        figures = _dataset_figure_data(shapes, dataset, seed=seed, size=size, data_root=data_root, download=download)
        figures.source = source
        return figures
    inputs, description = _read_data(shapes, _data_path(data), pick=lambda count: _seeded_pick(count, size, seed).numpy())
    return FigureData(inputs, description, synthetic=False, source=source)


def load_samples(shapes: dict[str, tuple[int, ...]], data: str | Path, *, limit: int | None = None) -> Samples:
    """Every sample of ``data``, in its own order (the first ``limit`` only, when given), shaped as
    ``shapes`` (input name → N,C,H,W...): an image folder or an .npy/.npz file, read as
    ``load_figure_data`` reads them."""
    def first(count: int) -> np.ndarray:
        return np.arange(count if limit is None else min(count, limit))

    return Samples(*_read_data(shapes, _data_path(data), pick=first))


def array_shapes(data: str | Path, names: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """The shape of one sample (batch 1) of each input, by name, as an .npy/.npz file holds them;
    None for a folder of images, whose size the model must give."""
    path = _data_path(data)
    if path.is_dir():
        return None
    flag = f"--data {path}"
    by_input = _arrays_by_input(_read_arrays(path), names, flag)
    return {name: (1, *np.shape(by_input[name])[1:]) for name in names}


def _data_path(data: str | Path) -> Path:
    path = Path(data)
    if not path.exists():
        raise BnexportError(f"--data {path}: not found")
    if not path.is_dir() and path.suffix.lower() not in (".npy", ".npz"):
        raise BnexportError(f"--data {path}: expected a folder of images or an .npy/.npz file")
    return path


Pick = Callable[[int], np.ndarray]  # the sample count → the indices of the samples to read


def _read_data(shapes, path: Path, *, pick: Pick) -> tuple[tuple[torch.Tensor, ...], str]:
    if path.is_dir():
        return _image_folder_inputs(shapes, path, pick=pick)
    return _array_inputs(shapes, path, pick=pick)


def _only_input(shapes: dict[str, tuple[int, ...]], flag: str) -> tuple[str, tuple[int, ...]]:
    if len(shapes) != 1:
        raise BnexportError(f"{flag}: images feed a model with one input; this one takes {', '.join(shapes)} "
                            "(give an .npz with one array per input name)")
    name, shape = next(iter(shapes.items()))
    if len(shape) != 4:
        raise BnexportError(f"{flag}: images need a 4-D input N,C,H,W; {name} is {list(shape)}")
    return name, shape


def _seeded_pick(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size]


def _dataset_figure_data(shapes, name: str, *, seed: int, size: int, data_root, download: bool) -> FigureData:
    flag = f"--dataset {name}"
    input_name, shape = _only_input(shapes, flag)
    loaded = load_dataset(name, data_root=data_root, download=download, seed=seed)
    if tuple(loaded.image_shape) != tuple(shape[1:]):
        raise BnexportError(f"{flag}: its images are {list(loaded.image_shape)}, {input_name} takes {list(shape[1:])}")
    images = loaded.test_images[_seeded_pick(len(loaded.test_labels), size, seed)].clone()
    return FigureData((images,), f"{loaded.name} test split ({len(images)} samples)", synthetic=False)


def _image_folder_inputs(shapes, path: Path, *, pick: Pick) -> tuple[tuple[torch.Tensor, ...], str]:
    from torchvision import datasets, transforms

    flag = f"--data {path}"
    _, shape = _only_input(shapes, flag)
    channels, height, width = shape[1:]
    if channels not in (1, 3):
        raise BnexportError(f"{flag}: images give 1 or 3 channels; the model takes {channels}")
    steps = [transforms.Resize((height, width)), transforms.ToTensor()]
    if channels == 1:
        steps.insert(0, transforms.Grayscale(1))
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as err:
        raise BnexportError(f"{flag}: not an image folder ({str(err).splitlines()[0]})") from None
    picked = [int(i) for i in pick(len(folder))]
    try:
        images = torch.stack([folder[i][0] for i in picked])
    except OSError as err:
        raise BnexportError(f"{flag}: cannot read an image ({err})") from None
    return (images,), f"{len(images)} images from {path.name}/ (resized to {height}×{width})"


def _read_arrays(path: Path) -> dict:
    try:
        if path.suffix.lower() == ".npy":
            return {None: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise BnexportError(f"--data {path}: not a readable numpy file ({err})") from None


def _arrays_by_input(arrays: dict, names, flag: str) -> dict:
    """The array of each input name: a file's only array feeds a one-input model, else arrays go by name."""
    names = list(names)
    if len(arrays) == 1:
        by_input = {names[0]: next(iter(arrays.values()))} if len(names) == 1 else {}
    else:
        by_input = {name: arrays[name] for name in names if name in arrays}
    missing = [name for name in names if name not in by_input]
    if missing:
        raise BnexportError(f"{flag}: no array for input {missing[0]!r}; an .npz needs one array per input name "
                            f"({', '.join(names)}), it has {', '.join(str(k) for k in arrays)}")
    counts = {len(a) if np.ndim(a) else 0 for a in by_input.values()}
    if len(counts) != 1 or not counts.pop():
        raise BnexportError(f"{flag}: every array needs the same number of samples, at least 1")
    return by_input


def _array_inputs(shapes, path: Path, *, pick: Pick) -> tuple[tuple[torch.Tensor, ...], str]:
    flag = f"--data {path}"
    by_input = _arrays_by_input(_read_arrays(path), shapes, flag)
    index = pick(len(next(iter(by_input.values()))))
    tensors = []
    for name, shape in shapes.items():
        array = np.asarray(by_input[name])
        if array.ndim == len(shape) - 1 and shape[1] == 1:  # greyscale N,H,W for an N,1,H,W input
            array = array[:, None]
        if tuple(array.shape[1:]) != tuple(shape[1:]):
            raise BnexportError(f"{flag}: samples of {name} are {list(array.shape[1:])}, the model takes {list(shape[1:])}")
        values = array[index]
        tensor = torch.from_numpy(values.astype(np.float32) / 255.0 if values.dtype == np.uint8 else values.astype(np.float32))
        tensors.append(tensor)
    return tuple(tensors), f"{len(index)} samples from {path.name}"
