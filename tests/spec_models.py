"""Small models as a user's file holds them, for the commands that take `tests/spec_models.py:FACTORY`.

Their BatchNorm statistics and affine parameters are drawn from the seed at construction, so
that a fold or a recalibration moves every number it touches.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from user_models import randomise_batchnorm


class ConvNet(nn.Module):
    """conv → BN → ReLU, twice, pooled into a Linear: 3×H×W images to 5 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TwoInputNet(nn.Module):
    """An image branch (conv → BN) and a vector branch (Linear → BatchNorm1d), concatenated."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_bn = nn.BatchNorm2d(4)
        self.vector = nn.Linear(7, 6)
        self.vector_bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(10, 3)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv_bn(self.conv(image))), 1), 1)
        return self.head(torch.cat([pooled, F.relu(self.vector_bn(self.vector(features)))], dim=1))


class ContiguousBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward: TorchScript cannot script ``super()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


class UnscriptableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = ContiguousBN(4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(images)).mean((2, 3))


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def make() -> nn.Module:
    return randomise_batchnorm(ConvNet(), seed=1)


def make_two_inputs() -> nn.Module:
    return randomise_batchnorm(TwoInputNet(), seed=1)


def make_unscriptable() -> nn.Module:
    return randomise_batchnorm(UnscriptableNet(), seed=1)


def make_without_batchnorm() -> nn.Module:
    return NoBatchNorm()
