"""SimpleCNN from the article, sized from the dataset instead of hard-coding 3x32x32.

    Conv2d 3x3 pad 1 -> BatchNorm2d -> ReLU -> MaxPool 2 -> flatten -> Linear -> classes

The article's version hard-codes ``Conv2d(3, ...)`` and ``view(-1, 16*16*16)``, so it
crashes on MNIST's 1x28x28 digits. Here the in-channels and the Linear's width follow from
``ModelSpec``, and ``flatten(1)`` keeps the batch axis dynamic for export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a SimpleCNN; stored in every checkpoint next to the weights."""

    in_channels: int = 1
    height: int = 28
    width: int = 28
    num_classes: int = 10
    channels: int = 16  # conv1's out-channels, as in the article
    batch_norm: bool = True  # False is the --no-bn variant

    @classmethod
    def for_images(cls, image_shape: tuple[int, int, int], *, num_classes: int = 10, batch_norm: bool = True):
        channels, height, width = image_shape
        return cls(in_channels=channels, height=height, width=width, num_classes=num_classes, batch_norm=batch_norm)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.height, self.width)

    def to_json(self) -> dict:
        return asdict(self)


class SimpleCNN(nn.Module):
    def __init__(self, spec: ModelSpec = ModelSpec()):
        super().__init__()
        if spec.height < 2 or spec.width < 2:
            raise ValueError(f"images must be at least 2x2 for the 2x2 max-pool, got {spec.height}x{spec.width}")
        self.conv1 = nn.Conv2d(spec.in_channels, spec.channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(spec.channels) if spec.batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(spec.channels * (spec.height // 2) * (spec.width // 2), spec.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.max_pool(x)
        x = torch.flatten(x, 1)
        return self.fc1(x)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> SimpleCNN:
    """A fresh SimpleCNN; with ``seed`` its initial weights are reproducible."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SimpleCNN(spec)
    return SimpleCNN(spec)


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(m, BN_TYPES) for m in module.modules())
