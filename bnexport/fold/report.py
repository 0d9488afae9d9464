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


@dataclass
class FoldReport:
    source: str  # "torch" or "onnx"
    records: list[FoldRecord] = field(default_factory=list)
    parity: dict | None = None  # a ParityResult's JSON when the fold was checked

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
        }

    def table(self) -> str:
        rows = [("batchnorm", "status", "folded into / reason")]
        rows += [(r.batchnorm, r.status, r.folded_into if r.status == FOLDED else (r.reason or "")) for r in self.records]
        return format_table(rows) + f"\n{len(self.folded)} of {len(self.records)} BatchNorm folded"

