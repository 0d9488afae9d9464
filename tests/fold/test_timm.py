"""timm architectures (random weights, randomised BN statistics): the module fold against eager.

Every test here is slow (``pytest -m slow``) and skipped without timm. Each model is folded
with ``fold_module``; the copy must match the unfolded model in eager mode at 1e-5 of the
output's scale (the unfolded model run in float64, so that float32's own rounding in the
reference does not count against the fold), and must execute no batch_norm for a BN it reports folded. For a subset, the
module fold must remove at least as many BNs as bnexport's ONNX fold removes from the same
model's dynamo export (``optimize=False`` keeps every BatchNormalization).

``python tests/fold/test_timm.py [--onnx] [NAME ...]`` prints the table of BN totals, folds and
kept reasons, with ``--onnx`` the ONNX fold's count beside each.
"""

from __future__ import annotations

import collections
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

if __name__ == "__main__":  # run as a script: make `fold.models` importable as under pytest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnexport.fold import fold_module, fold_onnx  # noqa: E402
from fold.models import (EXPORTERS, CountBatchNorm, count_bn_nodes, export_dynamo_onnx, ort_run,  # noqa: E402
                         randomize_bn, relative_error)

MODELS = [
    "resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100", "regnetx_002",
    "regnety_002", "mnasnet_100", "repvgg_a0", "dpn68", "cspresnet50", "cspdarknet53", "darknet53", "vovnet39a",
    "ese_vovnet19b_dw", "tresnet_m", "fbnetc_100", "hardcorenas_a", "lcnet_050", "densenet121", "inception_v3",
    "mobileone_s0", "ghostnet_100", "xception41", "rexnet_100", "fastvit_t8", "repghostnet_050", "mobilevit_xxs",
    "efficientvit_b0", "convnext_atto", "levit_128s", "mixnet_s", "dla34",
]
# the ONNX comparison runs on these in the test (exports are slow); the script runs it on all
ONNX_SUBSET = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "repvgg_a0", "lcnet_050",
               "ghostnet_100", "mobilevit_xxs", "efficientvit_b0", "levit_128s"]
# where 3×64×64 is too small: levit's attention biases are sized for 224
INPUTS = {"levit_128s": (1, 3, 224, 224), "inception_v3": (1, 3, 75, 75)}
REL_TOL = 1e-5


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False), seed=1)


def example(name: str, seed: int = 5) -> torch.Tensor:
    shape = INPUTS.get(name, (1, 3, 64, 64))
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def executed_batch_norms(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with torch.no_grad(), CountBatchNorm() as counter:
        output = module(x)
    return counter.calls, output


def fold_row(name: str) -> dict:
    model = build(name)
    x = example(name)
    folded, report = fold_module(model, example_input=x, check=False)
    before, expected = executed_batch_norms(model, x)
    after, got = executed_batch_norms(folded, x)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    return {"name": name, "total": len(report.records), "folded": len(report.folded), "report": report,
            "kept": collections.Counter(r.reason_code for r in report.kept), "executed_before": before,
            "executed_after": after, "rel": relative_error(exact.numpy(), got.numpy()),
            "rel32": relative_error(expected.numpy(), got.numpy()), "noise32": relative_error(exact.numpy(), expected.numpy()),
            "model": model, "x": x}


def onnx_folded(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(BatchNormalization nodes in the dynamo export, how many bnexport's ONNX fold removes)."""
    exported = export_dynamo_onnx(model, x)
    folded, _ = fold_onnx(exported, check=False)
    return count_bn_nodes(exported), count_bn_nodes(exported) - count_bn_nodes(folded)


def _row_text(row: dict, onnx: tuple[int, int] | None = None) -> str:
    kept = ", ".join(f"{code}: {n}" for code, n in sorted(row["kept"].items())) or "-"
    text = (f"{row['name']:22s} {row['total']:5d} {row['folded']:6d}   {kept:28s} {row['rel']:.1e}  {row['rel32']:.1e}"
            f"  {row['noise32']:.1e}")
    return text + (f"   onnx {onnx[1]}/{onnx[0]}" if onnx else "")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_module_fold(name):
    row = fold_row(name)
    print("\n" + _row_text(row))
    report = row["report"]
    assert all(r.reason_code for r in report.kept), report.table()
    # against the unfolded model run in float64: the float32 model itself is a few 1e-6 of scale off
    # on these random-weight nets, so folded and unfolded float32 differ by up to twice that
    assert row["rel"] <= REL_TOL, report.table()
    assert row["rel32"] <= 2 * REL_TOL, report.table()
    # every folded site is gone from the forward; the kept ones still run
    assert row["executed_after"] == row["executed_before"] - row["folded"], report.table()
    if name == "convnext_atto":
        assert row["total"] == 0 and row["executed_before"] == 0
    else:
        assert row["folded"] > 0
    # the only BNs kept have no layer they could fold into, or sit where a fold would be inexact
    assert set(row["kept"]) <= {"no_linear_neighbour", "zero_padding", "multiple_consumers", "shape_mismatch"}, report.table()
    if name in ONNX_SUBSET:
        exported, removed = onnx_folded(row["model"], row["x"])
        assert row["folded"] >= removed, f"ONNX fold removes {removed} of {exported}, the module fold {row['folded']}"


@pytest.mark.slow
@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("name", MODELS)
def test_timm_onnx_fold(name, exporter):
    """Each exporter's file keeps one BatchNormalization per BN the model executes; bnexport's ONNX
    fold of it matches eager (run in float64) at 1e-5 of scale, and the module fold removes at least
    as many BNs as the ONNX fold does."""
    model, x = build(name), example(name)
    executed, _ = executed_batch_norms(model, x)
    try:
        exported = EXPORTERS[exporter](model, x)
    except Exception as err:  # an exporter's own limit, not bnexport's: say which
        pytest.skip(f"{exporter} exporter cannot export {name}: {str(err).splitlines()[0][:120]}")
    assert count_bn_nodes(exported) == executed
    folded, report = fold_onnx(exported, check=False)
    removed = count_bn_nodes(exported) - count_bn_nodes(folded)
    assert removed == len(report.folded) and all(r.reason_code for r in report.kept), report.table()
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    got = ort_run(folded, x.numpy())
    assert relative_error(exact, got) <= REL_TOL, report.table()
    assert relative_error(ort_run(exported, x.numpy()), got) <= 2 * REL_TOL, report.table()
    module_folded = fold_module(model, example_input=x, check=False)[1].folded
    assert len(module_folded) >= removed, f"ONNX fold removes {removed}, the module fold {len(module_folded)}"


def main(argv: list[str]) -> None:
    with_onnx = "--onnx" in argv
    names = [a for a in argv if not a.startswith("--")] or MODELS
    print(f"{'model':22s} {'BNs':>5s} {'folded':>6s}   {'kept by reason_code':28s} {'vs f64':7s}  {'vs f32':7s}  "
          f"{'f32 noise':9s}" + ("   onnx removed/BNs" if with_onnx else ""))
    for name in names:
        try:
            row = fold_row(name)
            onnx = onnx_folded(row["model"], row["x"]) if with_onnx else None
            print(_row_text(row, onnx), flush=True)
        except Exception as err:  # report and go on: the table is the point
            print(f"{name:22s} error: {type(err).__name__}: {str(err).splitlines()[0][:150]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
