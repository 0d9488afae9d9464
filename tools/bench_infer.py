"""Benchmark: what folding BatchNorm buys at inference, on SimpleCNN and resnet18.

    python tools/bench_infer.py [--batch 1 64] [--min-seconds 1] [--json out.json]

For each model and batch size: eager unfolded (the baseline), eager folded, TorchScript
folded, and ONNX Runtime (CPU) on the unfolded and the folded ONNX, each with graph
optimisations disabled and at their default. BN statistics are randomized, weights are
random (resnet18 with weights=None, on 3×64×64 input to keep the run short on a CPU).
Each figure is the median of repeated calls, on one thread by default for both torch and
ONNX Runtime; ``python -m bnexport bench`` runs the same measurement on a user's own
checkpoint (all rows) or ONNX file (the ONNX Runtime rows only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnexport.bench import bench, module_runners  # noqa: E402
from bnexport.config import BENCH_BATCHES  # noqa: E402
from bnexport.model import ModelSpec, build_model  # noqa: E402


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "SimpleCNN 1×28×28": (randomize_bn(build_model(ModelSpec(), seed=0)), (1, 1, 28, 28)),
        "resnet18 3×64×64": (randomize_bn(torchvision.models.resnet18(weights=None)), (1, 3, 64, 64)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=list(BENCH_BATCHES))
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and ONNX Runtime (default 1: steadier figures on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name, (module, shape) in models().items():
        runners = module_runners(module, torch.zeros((2, *shape[1:])), threads=args.threads)
        report = bench(runners, shape, batches=tuple(args.batch), model=name, min_seconds=args.min_seconds)
        print(report.table(), "\n")
        results.append(report.to_json())
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
