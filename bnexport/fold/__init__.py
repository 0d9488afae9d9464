"""Fold BatchNorm into neighbouring linear layers, in torch modules and ONNX graphs.

``fold_module`` and ``fold_onnx`` return a folded copy and a ``FoldReport``. With
``check=True`` (the default) the copy is run against the original on seeded input and
``report.parity`` holds the result (a ``ParityReport``); when they disagree a per-layer
drill-down names the first layer that diverges (``report.divergence``) and ``CheckFailed`` is
raised, so a wrong model is never returned. ``fold_file`` does the same from a file to a file.

The ONNX side (``fold_onnx``, ``load_onnx``, ``fold_file`` of an ONNX file) never imports torch;
``fold_module`` loads it on first use.
"""

from __future__ import annotations

from ..errors import CheckFailed
from .onnx_file import fold_onnx, load_onnx, model_input_shape, uses_external_data
from .fold_report import FOLDED, KEPT, REASON_CODES, FoldRecord, FoldReport


def __getattr__(name: str):
    if name == "fold_module":
        from .torch_module import fold_module

        return fold_module
    if name == "fold_file":  # imported on first use: it needs the parity package, which needs this one
        from .files import fold_file

        return fold_file
    raise AttributeError(f"module 'bnexport.fold' has no attribute {name!r}")


__all__ = ["FOLDED", "KEPT", "REASON_CODES", "CheckFailed", "FoldRecord", "FoldReport", "fold_file", "fold_module", "fold_onnx",
           "load_onnx", "model_input_shape", "uses_external_data"]
