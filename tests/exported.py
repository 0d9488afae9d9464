"""Exported files loaded back by their own runtimes, independently of bnexport's parity runners:
each loader gives the file's BatchNorm count and a function from a numpy batch to numpy outputs.

ONNX runs in ONNX Runtime with graph optimisations off, so that the runtime's own Conv+BN
fusion cannot hide a missing fold.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

Run = Callable[..., np.ndarray]  # one numpy array per input, in forward's order → the first output


def onnx_batchnorms(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def torchscript_batchnorms(module: torch.jit.ScriptModule) -> int:
    return sum(node.kind() == "aten::batch_norm" for node in module.inlined_graph.nodes())


def program_batchnorms(program: torch.export.ExportedProgram) -> int:
    # aten.batch_norm or _native_batch_norm_legit_no_training, whichever IR torch.export chose
    return sum(node.op == "call_function" and "batch_norm" in str(node.target) for node in program.graph.nodes)


def ort_session(model: str | Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_export(path: Path) -> tuple[int, Run]:
    """(BatchNorm count, runner) for a .ts, .pt2 or .onnx file with one output; ONNX inputs are fed by position."""
    if path.suffix == ".ts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream
            module = torch.jit.load(str(path)).eval()
        return torchscript_batchnorms(module), lambda *xs: _torch_run(module, xs)
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        module = program.module()
        return program_batchnorms(program), lambda *xs: _torch_run(module, xs)
    if path.suffix == ".onnx":
        session = ort_session(path)
        names = [i.name for i in session.get_inputs()]

        def run(*xs: np.ndarray) -> np.ndarray:
            return session.run(None, dict(zip(names, xs, strict=True)))[0]
        return onnx_batchnorms(onnx.load(str(path))), run
    raise ValueError(f"no loader for {path}")


def _torch_run(module, xs: tuple[np.ndarray, ...]) -> np.ndarray:
    with torch.no_grad():
        return module(*map(torch.from_numpy, xs)).numpy()


def uniform_batch(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded uniform [0, 1) float32: the range of image pixels, reproducible when a check fails."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def max_error_in_scale(expected: np.ndarray, got: np.ndarray) -> float:
    """max |Δ| over max(1, max |expected|): rounding error relative to the outputs' scale."""
    return float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))
