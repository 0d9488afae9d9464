__version__ = "0.1.0"

from .fold import fold_module, fold_onnx  # noqa: E402  (after __version__, which submodules read)

__all__ = ["__version__", "fold_module", "fold_onnx"]
