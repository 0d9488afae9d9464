"""Benchmark: the viz stage (every figure and report.html) on torchvision models exported as given.

    python tools/bench_viz.py [--models resnet50 densenet121] [--side 224] [--batch 8] [--repeat 3]

For each model (random weights, weights=None): the fold, the ONNX export and a parity check
are done once, untimed, the way the export pipeline does them; then ``visualize`` runs
``--repeat`` times on a seeded synthetic batch of ``--batch`` images, and each run's wall time
is printed with the load average it started under, with the peak resident memory at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnexport.export.writers import to_onnx  # noqa: E402
from bnexport.fold import fold_module, fold_onnx  # noqa: E402
from bnexport.parity.compare import run_parity  # noqa: E402
from bnexport.parity.runners import eager_runner  # noqa: E402
from bnexport.viz.visualize import VisualizeInputs, visualize  # noqa: E402


def export_inputs(name: str, side: int, batch: int) -> VisualizeInputs:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    example = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    folded, torch_report = fold_module(model, check=False)
    before = to_onnx(model, example)
    after, onnx_report = fold_onnx(before, check=False)
    outputs = {}

    def keeping(key, runner):
        def run(x):
            outputs[key] = runner(x)
            return outputs[key]
        return run

    parity = run_parity(keeping("reference", eager_runner(model)),
                        {"eager folded": keeping("eager folded", eager_runner(folded))}, example.numpy())
    figures = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    return VisualizeInputs(
        model=model, figure_inputs=(figures,), figure_data=f"seeded synthetic input ({batch}×3×{side}×{side})",
        synthetic=True, parity=parity.to_json(), parity_outputs=outputs,
        fold={"torch": torch_report.to_json(), "onnx": onnx_report.to_json()}, onnx_models=(before, after),
        summary={"model": {"spec": f"torchvision:{name}", "random_weights": True}},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--format", default="png")
    args = parser.parse_args()
    for name in args.models:
        inputs = export_inputs(name, args.side, args.batch)
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.repeat):
                load = os.getloadavg()[0]
                started = time.perf_counter()
                result = visualize(out, inputs=inputs, figure_format=args.format)
                print(f"{name} {args.batch}×3×{args.side}×{args.side}: {time.perf_counter() - started:.1f} s for "
                      f"{len(result.figures)} figures and report.html ({len(result.health)} BN layers; load average "
                      f"{load:.1f}, {torch.get_num_threads()} torch threads)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the whole process: {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
