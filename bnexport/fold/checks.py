"""What a failed fold check raises: the parity numbers and the layer where the models part, if one does."""

from __future__ import annotations

from ..errors import CheckFailed
from .fold_report import FoldReport


def raise_check_failed(report: FoldReport, parity, divergence) -> None:
    report.divergence = divergence
    result = parity.worst()
    output = f" at {result.name}" if len(parity.results) > 1 else ""
    if divergence:
        where = (f"; first diverging layer: {divergence.layer} (max |Δ| {divergence.result.max_abs:.3g}, "
                 f"{divergence.result.max_rel:.3g} of scale)")
    else:
        where = ("; no single layer diverges: the error grows layer by layer, as rounding does, "
                 "so the tolerance may be too tight for this model")
    raise CheckFailed(f"folded model differs from the original{output}: max |Δ| {result.max_abs:.3g} "
                      f"= {result.max_rel:.3g} of scale > atol {result.atol:g} + rtol {result.rtol:g}{where}", report)
