"""What a failed fold check raises: the parity numbers and the first layer that diverges."""

from __future__ import annotations

from ..errors import CheckFailed
from .report import FoldReport


def raise_check_failed(report: FoldReport, parity, divergence) -> None:
    report.divergence = divergence.to_json() if divergence else None
    result = parity.results[0]
    where = (f"; first diverging layer: {divergence.layer} (max |Δ| {divergence.result.max_abs:.3g}, "
             f"{divergence.result.max_rel:.3g} of scale)") if divergence else "; no single layer exceeds the tolerance"
    raise CheckFailed(f"folded model differs from the original: max |Δ| {result.max_abs:.3g} "
                      f"= {result.max_rel:.3g} of scale > atol {result.atol:g} + rtol {result.rtol:g}{where}", report)
