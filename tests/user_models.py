"""Models as a user's own file would hold them, for `bnexport export tests/user_models.py:FACTORY`.

Every BatchNorm here follows a conv or a Linear. The factories below the models are the spec's
callables; the broken ones feed the bad-input tests.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MyBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward, as projects write them (a switch that keeps
    the statistics frozen while fine-tuning): not scriptable, as TorchScript has no ``super()``."""

    def __init__(self, num_features: int, *, frozen: bool = False):
        super().__init__(num_features)
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen and self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ResidualNet(nn.Module):
    """stem conv → MyBN, a residual block x + BN(conv(relu(MyBN(conv(x))))), pooled into Linear → BatchNorm1d."""

    def __init__(self, channels: int = 8, hidden: int = 12, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.stem_bn = MyBN(channels)
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_a = MyBN(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, hidden)
        self.fc_bn = nn.BatchNorm1d(hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(images)))
        x = F.relu(x + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x))))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(F.relu(self.fc_bn(self.fc(x))))


class TwoInputNet(nn.Module):
    """An image branch (conv → BN) and a vector branch (Linear → BatchNorm1d), concatenated."""

    def __init__(self, channels: int = 6, features: int = 7, hidden: int = 10, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.conv_bn = nn.BatchNorm2d(channels)
        self.vector = nn.Linear(features, hidden)
        self.vector_bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(channels + hidden, classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv_bn(self.conv(image))), 1), 1)
        return self.head(torch.cat([pooled, F.relu(self.vector_bn(self.vector(features)))], dim=1))


class EigenvalueNet(nn.Module):
    """Runs in eager; complex eigenvalues are beyond both ONNX exporters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(images))
        return torch.linalg.eigvals(x).abs()


class DataDependentNet(nn.Module):
    """A branch on the data: torch.export (and so the dynamo ONNX exporter) cannot decide it,
    TorchScript scripts it, and the TorchScript ONNX exporter traces the branch taken. torch.fx
    cannot trace it either, so the torch fold keeps its BN; the ONNX fold sees conv → BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(images))
        if x.abs().sum() >= 0:  # always true, which only the data can tell
            x = F.relu(x)
        return torch.flatten(x, 1)


class NestedOutputNet(nn.Module):
    """Returns pooled logits and a dict holding the feature map: outputs of different shapes, nested."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: torch.Tensor):
        features = F.relu(self.bn(self.conv(images)))
        return features.mean((2, 3)), {"features": features}


def make_residual() -> nn.Module:
    return ResidualNet()


def make_two_inputs() -> nn.Module:
    return TwoInputNet()


def make_eigenvalues() -> nn.Module:
    return EigenvalueNet()


def make_data_dependent() -> nn.Module:
    return DataDependentNet()


def make_nested_output() -> nn.Module:
    return NestedOutputNet()


def make_half() -> nn.Module:
    return ResidualNet().half()


def make_raising() -> nn.Module:
    raise ValueError("no config for this model")


def make_not_a_module():
    return {"conv": nn.Conv2d(3, 4, 1)}


def randomise_batchnorm(model: nn.Module, *, seed: int) -> nn.Module:
    """Running statistics, γ and β drawn at random, so that folding moves every number it touches."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                uniform(module.running_mean, -1.0, 1.0)
                uniform(module.running_var, 0.25, 4.0)
                uniform(module.weight, 0.25, 2.0)
                uniform(module.bias, -1.0, 1.0)
    return model
