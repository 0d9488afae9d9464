"""A short CUDA check of the module fold's multi-layer patterns: the fold runs on the GPU's tensors.

    python tools/gpu_fold_check.py [--device cuda]

For each model (BN after torch.cat of convs, after a sum of convs, BN → reflect pad → Conv,
LeViT's Linear → flatten → BatchNorm1d, and timm's levit_128 when timm is importable) on
CUDA: fold_module with its own check, then the folded copy against the original, both in
eager float64 on the GPU (within 1e-6: the folded weights are rounded once to float32), and
the batch_norm calls left (counted with a patched F.batch_norm). Exit 1 when a fold is
inexact, leaves a BN, or moves a tensor off the GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bnexport.fold import fold_module  # noqa: E402


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(10)

    def forward(self, x):
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1))


class Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv_a(x) + self.conv_b(x))


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(F.pad(self.bn(x), (1, 1, 1, 1), mode="reflect"))


class TokenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(3 * 8, 16, bias=False), nn.BatchNorm1d(16)

    def forward(self, x):
        tokens = self.linear(x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 3 * 8))
        return self.bn(tokens.flatten(0, 1)).reshape_as(tokens)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator))
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.randn(count, generator=generator))
                module.bias.data.copy_(torch.randn(count, generator=generator))
    return model.eval()


def batch_norm_calls(model: nn.Module, x: torch.Tensor) -> int:
    calls = 0
    original = F.batch_norm

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    F.batch_norm = counting
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.batch_norm = original
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA here: nothing to check")
        return 2
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)  # the layers' own initialisation
    generator = torch.Generator().manual_seed(0)
    models = {"concat": (Concat(), (2, 3, 16, 16)), "sum": (Sum(), (2, 3, 16, 16)),
              "reflect pad": (PadConv(), (2, 3, 16, 16)), "token BN": (TokenNorm(), (2, 3, 8, 8))}
    try:
        import timm

        models["timm levit_128"] = (timm.create_model("levit_128", pretrained=False), (2, 3, 224, 224))
    except Exception as err:  # timm is optional; any import failure only skips its model
        print(f"timm not importable ({type(err).__name__}: {err}): levit_128 skipped")
    failed = False
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}")
    for seed, (name, (model, shape)) in enumerate(models.items()):
        model = randomize(model, seed).to(device)
        x = torch.randn(shape, generator=generator).to(device)
        before = batch_norm_calls(model, x)
        folded, report = fold_module(model, example_input=x)
        devices = {t.device.type for t in (*folded.parameters(), *folded.buffers())}
        with torch.no_grad():
            reference = model.double()(x.double())
            got = folded.double()(x.double())
        error = float((reference - got).abs().max() / reference.abs().max())
        left = batch_norm_calls(folded, x.double())
        ok = error < 1e-6 and left == 0 and devices == {device.type} and report.parity.passed
        failed |= not ok
        print(f"{name:<16} BN {before} → {left}, folded {len(report.folded)}, fold check max|Δ| "
              f"{report.parity.results[0].max_abs:.2e}, float64 rel err {error:.1e}, tensors on {sorted(devices)}: "
              f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
