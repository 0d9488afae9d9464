"""Fold BatchNormalization in an ONNX graph: ``fold_graph`` and the names other modules use.

``onnx_graph`` says what counts as a constant and who reads each tensor; ``onnx_patterns``
holds the patterns that fold and the driver that walks every graph.
"""

from __future__ import annotations

from .onnx_graph import CONSTANT_OPS, GraphIndex, attribute, node_label
from .onnx_patterns import ABSORBED_PREFIX, Folder, bn_parameters, fold_graph

__all__ = ["ABSORBED_PREFIX", "CONSTANT_OPS", "Folder", "GraphIndex", "attribute", "bn_parameters", "fold_graph",
           "node_label"]
