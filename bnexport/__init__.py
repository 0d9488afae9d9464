"""bnexport: train a BatchNorm CNN, fold BatchNorm, export it and prove parity.

``fold_module``, ``fold_onnx`` and ``fold_file`` are imported on first use, so that ``import bnexport``
(and the command line's start-up) does not load torch and onnx before they are needed.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "fold_file", "fold_module", "fold_onnx"]


def __getattr__(name: str):
    if name in ("fold_file", "fold_module", "fold_onnx"):
        from . import fold

        return getattr(fold, name)
    raise AttributeError(f"module 'bnexport' has no attribute {name!r}")
