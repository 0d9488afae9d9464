"""Run by tests/test_distributed.py under torchrun: the real all-reduce merge and recalibration.

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR

Each rank builds the same seeded SimpleCNN and its own batch, sets its BN running
statistics to that batch's exact mean and unbiased variance, pools them across ranks,
then recalibrates over its part of a small image set. It saves what it saw and what it
ended with to OUT_DIR/rank{R}.pt; the test pools the raw data itself and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bnexport.distributed.process_group import process_group
from bnexport.model import ModelSpec, build_model

SPEC = ModelSpec(in_channels=2, height=6, width=6, channels=4)
BATCH = 5


def main(out: Path) -> None:
    with process_group(device="cpu", timeout_s=60) as replicas:
        model = build_model(SPEC, seed=0)
        generator = torch.Generator().manual_seed(100 + replicas.rank)
        # ranks see differently distributed data, so pooling has real work to do
        images = torch.randn((BATCH, *SPEC.input_shape), generator=generator) * (1 + replicas.rank) + replicas.rank
        with torch.no_grad():
            activations = model.conv1(images)
            model.bn1.running_mean.copy_(activations.mean((0, 2, 3)))
            model.bn1.running_var.copy_(activations.var((0, 2, 3), unbiased=True))
        spread = replicas.merge_over_ranks(model, batch_size=BATCH, input_shape=SPEC.input_shape)
        merged = {k: v.clone() for k, v in model.bn1.state_dict().items()}

        dataset = torch.randn((23, *SPEC.input_shape), generator=torch.Generator().manual_seed(7)) * 2 + 1
        report = replicas.recompute_over_ranks(model, dataset, batch_size=4)
        torch.save({"activations": activations, "merged": merged, "spread": spread,
                    "recalibrated": {k: v.clone() for k, v in model.bn1.state_dict().items()},
                    "dataset": dataset, "report": report.to_json()}, out / f"rank{replicas.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
