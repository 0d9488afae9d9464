"""What a fold decided, per BatchNorm: the object behind the CLI's table and fold.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..tables import format_table

if TYPE_CHECKING:  # annotations only: the report is built and read without the parity code
    from ..parity.compare import ParityReport
    from ..parity.divergence import Divergence

FOLDED = "folded"
KEPT = "kept"

# Why a BatchNorm was kept, as a stable code beside the human sentence (fold.json's ``reason_code``).
# Codes are never renamed once shipped; add new ones instead.
REASON_CODES = {
    "multiple_consumers": "the neighbouring layer's output, or the BN's, feeds more than the pair",
    "not_constant": "a weight, bias or BN parameter is computed in the graph",
    "overridable_input": "a parameter is also a graph input, which a caller may override (IR >= 4)",
    "zero_padding": "BN before a zero-padded conv: the padded border is not shifted",
    "training_mode": "the BN uses batch statistics (training mode, no running statistics)",
    "spatial0": "BatchNormalization with spatial=0 normalises per element, not per channel",
    "no_linear_neighbour": "neither the producer nor the consumer is a layer it folds into",
    "shape_mismatch": "channel counts, ranks or axes do not line up for an exact fold",
    "graph_output": "the BN's input or output is a graph output that must keep its value",
    "in_function": "the BN sits inside a model-local function that this fold cannot rewrite at that call site",
    "unsupported_layer": "the neighbour is a linear layer whose fold would be inexact (e.g. BN before ConvTranspose)",
    "dtype": "the tensor's dtype has no exact fold here",
    "untraceable": "torch.fx cannot trace the forward that calls the BN (or the BN's own), so its neighbours are unknown",
}


@dataclass
class FoldRecord:
    """One BatchNorm: folded into a neighbour, or kept with the reason."""

    batchnorm: str
    status: str  # FOLDED or KEPT
    folded_into: str | None = None
    reason: str | None = None
    position: str | None = None  # "after" the layer it was folded into (layer → BN), or "before" it (BN → layer)
    reason_code: str | None = None  # a key of REASON_CODES when kept
    # torch module paths (``layer1.0.bn1``, ``layer1.0.conv1``) where known, None otherwise. On the torch
    # side they repeat the two names above; on the ONNX side those are graph nodes, and these the modules
    # the exporter made them from (``onnx_names``), so an F.batch_norm call there is named after the module
    # whose forward calls it, or None at the top level, while the torch side has no module for it
    module: str | None = None  # the BN's module
    folded_into_module: str | None = None  # the module of the layer it was folded into
    # a fold over several layers (BN after a Concat or an Add of layers): every one of them, in input order,
    # as nodes (or module paths on the torch side) and as module paths where known; folded_into is the first
    split_over: list[str] | None = None
    split_over_modules: list[str] | None = None
    through: str | None = None  # the op between the BN and its layer(s): "Concat", "Add", "Pad", "Reshape", ...
    into_scale: bool = False  # a quantized layer: the BN's scale went into its DequantizeLinear scale, q unchanged

    @property
    def name(self) -> str:
        """What a reader calls this BN: its module path, else its node or call."""
        return self.module or self.batchnorm


@dataclass
class FoldReport:
    source: str  # "torch" or "onnx"
    records: list[FoldRecord] = field(default_factory=list)
    parity: ParityReport | None = None  # the check of the folded copy against the original, when it ran
    divergence: Divergence | None = None  # the drill-down's first diverging layer, when the check failed
    notes: list[str] = field(default_factory=list)  # what a reader should know that no record says (one line each)

    @property
    def folded(self) -> list[FoldRecord]:
        return [r for r in self.records if r.status == FOLDED]

    @property
    def kept(self) -> list[FoldRecord]:
        return [r for r in self.records if r.status == KEPT]

    @property
    def shows_nodes(self) -> bool:
        """Whether node names say something the module paths do not: an ONNX fold of an exported model."""
        return any(r.module is not None and r.module != r.batchnorm for r in self.records)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "batchnorm_total": len(self.records),
            "folded": len(self.folded),
            "kept": len(self.kept),
            "records": [asdict(r) for r in self.records],
            "parity": self.parity.to_json() if self.parity is not None else None,
            "divergence": self.divergence.to_json() if self.divergence is not None else None,
            "notes": self.notes,
        }

    def table(self, *, limit: int | None = None) -> str:
        """One row per BN; an "ONNX node" column beside the module path when some BN has both.
        With more than ``limit`` BNs, only the kept ones get a row (fold.json lists every one)."""
        if not self.records:
            return "no BatchNorm in the model: nothing to fold"
        shown = self.records if limit is None or len(self.records) <= limit else self.kept
        if self.shows_nodes:
            rows = [("batchnorm", "ONNX node", "status", "folded into / reason")]
            rows += [(r.name, r.batchnorm, r.status, _decision(r)) for r in shown]
        else:
            rows = [("batchnorm", "status", "folded into / reason")]
            rows += [(r.name, r.status, _decision(r)) for r in shown]
        total = f"{len(self.folded)} of {len(self.records)} BatchNorm folded"
        if len(shown) < len(self.records):
            total += f" ({len(self.records) - len(shown)} folded not listed here; fold.json has every one)"
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return (format_table(rows) + "\n" if shown else "") + total + notes


def _decision(record: FoldRecord) -> str:
    return describe_decision(asdict(record))


def describe_decision(record: dict) -> str:
    """What happened to one BN, in words, from a fold.json record (older files lack the newer keys):
    "layer1.0.conv1 (BN after it)", "conv (BN before it, through Pad)", "conv (BN after it, into its dequantize scale)",
    "split over layer3.conv_a, layer3.conv_b (Concat)", or the reason it was kept."""
    if record.get("status") != FOLDED:
        return record.get("reason") or ""
    through = record.get("through")
    layers = record.get("split_over_modules") or record.get("split_over")
    if layers and len(layers) > 1:
        return f"split over {', '.join(layers)}" + (f" ({through})" if through else "")
    into = record.get("folded_into_module") or record.get("folded_into")
    how = [f"BN {record['position']} it"] if record.get("position") else []
    how += [f"through {through}"] if through else []
    how += ["into its dequantize scale"] if record.get("into_scale") else []
    return f"{into} ({', '.join(how)})" if how else str(into)

