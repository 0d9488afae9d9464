"""What a fold decided, per BatchNorm: the object behind the CLI's table and fold.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..tables import format_table

FOLDED = "folded"
KEPT = "kept"


@dataclass
class FoldRecord:
    """One BatchNorm: folded into a neighbour, or kept with the reason."""

    batchnorm: str
    status: str  # FOLDED or KEPT
    folded_into: str | None = None
    reason: str | None = None
    position: str | None = None  # "after" the layer it was folded into (layer → BN), or "before" it (BN → layer)


@dataclass
class FoldReport:
    source: str  # "torch" or "onnx"
    records: list[FoldRecord] = field(default_factory=list)
    parity: dict | None = None  # a ParityReport's JSON when the fold was checked
    divergence: dict | None = None  # the drill-down's first diverging layer when the check failed

    @property
    def folded(self) -> list[FoldRecord]:
        return [r for r in self.records if r.status == FOLDED]

    @property
    def kept(self) -> list[FoldRecord]:
        return [r for r in self.records if r.status == KEPT]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "batchnorm_total": len(self.records),
            "folded": len(self.folded),
            "kept": len(self.kept),
            "records": [asdict(r) for r in self.records],
            "parity": self.parity,
            "divergence": self.divergence,
        }

    def table(self) -> str:
        rows = [("batchnorm", "status", "folded into / reason")]
        rows += [(r.batchnorm, r.status, _decision(r)) for r in self.records]
        if not self.records:
            return "no BatchNorm in the model: nothing to fold"
        return format_table(rows) + f"\n{len(self.folded)} of {len(self.records)} BatchNorm folded"


def _decision(record: FoldRecord) -> str:
    if record.status != FOLDED:
        return record.reason or ""
    return f"{record.folded_into} (BN {record.position} it)" if record.position else str(record.folded_into)

