"""Small models for the fold tests, and the helpers that give them trained-looking statistics."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(module: nn.Module, seed: int = 0, *, var_low: float = 0.5, gamma_scale: float = 1.0) -> nn.Module:
    """Non-trivial running statistics, as a trained net would have; returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + var_low)
                if m.affine:
                    m.weight.copy_((torch.rand(m.num_features, generator=g) + 0.5) * gamma_scale)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return module.eval()


def export_torchscript_onnx(module: nn.Module, example: torch.Tensor, *, opset: int = 18,
                            dynamic_batch: bool = False) -> onnx.ModelProto:
    """The TorchScript exporter with constant folding off, which keeps every BatchNormalization.

    A dynamic batch is off by default: this exporter cannot write a BN without running
    statistics for an unknown batch size.
    """
    buffer = io.BytesIO()
    dynamic_axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, do_constant_folding=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buffer.getvalue())


def export_dynamo_onnx(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The dynamo exporter with optimize=False: BatchNormalization kept, Shape/Expand/CastLike bias for bias-less convs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.eval(), (example,), dynamo=True, optimize=False, verbose=False).model_proto


EXPORTERS = {"torchscript": export_torchscript_onnx, "dynamo": export_dynamo_onnx}


def count_bn_nodes(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def relative_error(reference, candidate) -> float:
    """max |Δ| / max |reference|: random-weight nets have huge outputs, so absolute error misleads."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(np.abs(reference - candidate).max() / max(np.abs(reference).max(), 1e-30))


class Everything(nn.Module):
    """Every foldable pattern once, plus the ones that must be kept."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(4)  # BN → Conv without padding: folded into conv_a
        self.conv_a = nn.Conv2d(4, 8, 3, groups=2, bias=False)
        self.bn_a = nn.BatchNorm2d(8)  # Conv → BN
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6, affine=False)  # ConvTranspose → BN, affine=False
        self.relu = nn.ReLU()
        self.bn_relu = nn.BatchNorm2d(6)  # ReLU → BN → padded Conv: kept
        self.conv_pad = nn.Conv2d(6, 4, 3, padding=1)
        self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics: kept
        self.pool = nn.AvgPool2d(7, stride=7)  # 15×15 → 2×2
        self.fc = nn.Linear(16, 5)
        self.bn_fc = nn.BatchNorm1d(5)  # Linear → BN1d
        self.bn_head = nn.BatchNorm1d(5)  # BN1d → Linear (after bn_fc was folded, Linear → BN again)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.bn_a(self.conv_a(self.bn_in(x)))
        x = self.relu(self.bn_up(self.up(x)))
        x = self.bn_batch(self.conv_pad(self.bn_relu(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.bn_head(self.bn_fc(self.fc(x))))


EVERYTHING_INPUT = (2, 4, 9, 9)


def bn_initializers(prefix: str, channels: int, rng: np.random.Generator, *, var=None) -> list[onnx.TensorProto]:
    """γ, β, μ, σ² for an ONNX BatchNormalization, named PREFIX_{g,b,m,v}."""
    from onnx import numpy_helper

    values = {"g": rng.random(channels) + 0.5, "b": rng.standard_normal(channels), "m": rng.standard_normal(channels),
              "v": rng.random(channels) + 0.5 if var is None else np.asarray(var)}
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()]


def bn_node(prefix: str, source: str, output: str, **attrs) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node("BatchNormalization", [source, *(f"{prefix}_{k}" for k in "gbmv")], [output], name=prefix, **attrs)


def onnx_model(nodes, input_shape, output_shape, initializers, *, input_name="x", output_name="y", opset=18) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_run(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    """ONNX Runtime with graph optimisations off: the independent reference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


class CountBatchNorm(TorchFunctionMode):
    """Counts the batch_norm calls a forward executes, however they are reached."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.batch_norm, torch.batch_norm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


# a block people write: YOLOv5's CSP bottleneck normalises the concatenation of two bias-less convs

class Bottleneck(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.SiLU())
        self.cv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                 nn.SiLU())

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class BottleneckCSP(nn.Module):
    """y1 = cv3(m(cv1(x))), y2 = cv2(x), then cv4(act(bn(cat(y1, y2)))): the BN after the cat is the one to split."""

    def __init__(self, c1: int = 4, c2: int = 6, hidden: int = 3):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(c1, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.cv2 = nn.Conv2d(c1, hidden, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.cv4 = nn.Sequential(nn.Conv2d(2 * hidden, c2, 1, bias=False), nn.BatchNorm2d(c2), nn.SiLU())
        self.bn = nn.BatchNorm2d(2 * hidden)
        self.act = nn.LeakyReLU(0.1)
        self.m = nn.Sequential(Bottleneck(hidden))

    def forward(self, x):
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), dim=1))))
