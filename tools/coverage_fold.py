"""Coverage on models nobody here wrote: which BatchNorms each folding tool removes, and whether its output is right.

    python tools/coverage_fold.py [--quick] [--models REGEX] [--json OUT] [--paddleocr-dir DIR]
    python tools/coverage_fold.py --patterns [--json OUT] [--markdown OUT]

One row per model, one column per tool. A cell reads "BN remaining/BN total" and then

- "ok": the tool's output matches the original within the dtype's tolerance,
- "wrong (max rel err)": it runs but does not match,
- "fails: reason": the tool raised, crashed, timed out, or wrote a model that does not run.

The reference for an ONNX model is ONNX Runtime with graph optimisations off, on the original
file, fed a seeded value of its own dtype and shape for every graph input. The reference for a
torch module is the module itself, in eager mode. The error is max |Δ| / max |reference| over
every output; float32 must be within 1e-5 of scale, float16 within ``tolerance_for("float16")``.

For a torch module, "BN" counts BatchNorm sites actually executed on the input: calls of
``F.batch_norm`` plus calls of BatchNorm modules whose forward does not call it (such as
torchvision's FrozenBatchNorm2d). A BN that a tool leaves registered but unused does not count.

Models:
- timm architectures (random weights; BN statistics and affine parameters randomised from a
  seed), as modules and exported by both ONNX exporters (dynamo, and TorchScript in EVAL mode);
- the model-zoo graphs that ship in the onnx wheel (``onnx/backend/test/data/light``: IR 3,
  opset 9, weights stored as ``ConstantOfShape``), as they are and with seeded random weights;
- float16 conversions (onnxconverter-common) of a few of the above;
- PaddleOCR's detector, recogniser and classifier from the ``rapidocr-onnxruntime`` wheel.

``--patterns`` runs, instead of the models, one small seeded model per fold that no other tool
makes (BN after Concat or Add of convs, BN → Reflection/ReplicationPad2d → Conv, LeViT's token BN
between flatten and reshape, BN inside a model-local ONNX function, DequantizeLinear → Conv → BN)
and LeViT-128, with ONNX Runtime's extended level as one more column, and adds a table with one
row per pattern; there a function's BNs count once per call, and a cell says "weight
dequantized" where a tool turned an int8 weight into a float one.

Each model runs in its own worker process, so a tool that crashes the interpreter or hangs
becomes a cell saying so, and the run goes on. Optional pieces (timm, each baseline tool, AIMET,
the PaddleOCR files) are skipped with a note when they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEED = 0
FLOAT32_RTOL = 1e-5  # of the output's scale
SPATIAL_GUESS = 64  # for a dynamic dim other than the batch
CASE_TIMEOUT_S = 900

TIMM_MODELS = [
    # the architectures of the report, then more families with BatchNorm
    "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "mnasnet_100", "repvgg_a0", "dpn68",
    "cspresnet50", "darknet53", "ese_vovnet19b_dw", "tresnet_m", "fbnetc_100", "hardcorenas_a", "lcnet_050",
    "densenet121", "inception_v3", "mobileone_s0", "ghostnet_100", "xception41", "rexnet_100", "fastvit_t8",
    "repghostnet_050", "mobilevit_xxs", "efficientvit_b0", "resnet18", "resnet50d", "levit_128s", "convnext_atto",
    "mobilenetv2_100", "regnety_002", "tf_efficientnet_b0", "mixnet_s", "dla34", "hrnet_w18_small",
    "selecsls42b", "resnest14d", "gernet_s", "repvit_m1", "mobilenetv4_conv_small",
]
LIGHT_MODELS = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19",
                "bvlc_alexnet", "zfnet512"]
FP16_OF = ["light/resnet50 (random weights)", "light/inception_v2 (random weights)",
           "timm/resnet18 · TorchScript", "timm/efficientnet_b0 · TorchScript", "paddleocr/det"]
PADDLEOCR_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
                   "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
QUICK = ["timm/resnet18", "timm/efficientnet_b0", "timm/mobilevit_xxs", "light/resnet50", "light/shufflenet",
         "fp16/light/resnet50 (random weights)", "paddleocr/det"]
EXPORTERS = ("dynamo", "TorchScript")


# cases: each yields rows; a row is one model in one form (a module, or one ONNX file) ------------

def timm_cases(names: list[str]) -> list[str]:
    return [f"timm/{n}" for n in names]


def all_cases() -> list[str]:
    cases = timm_cases(TIMM_MODELS)
    cases += [f"light/{n}" for n in LIGHT_MODELS]
    cases += [f"light/{n} (random weights)" for n in LIGHT_MODELS]
    cases += [f"fp16/{n}" for n in FP16_OF]
    cases += [f"paddleocr/{n}" for n in PADDLEOCR_FILES]
    return cases


def case_rows(case: str) -> list[tuple[str, str]]:
    """(row name, "torch" or "onnx") for every row the case produces."""
    if case in ONNX_ONLY_PATTERNS:
        return [(f"{case} · {ONNX_ONLY_PATTERNS[case]}", "onnx")]
    if case.startswith(("timm/", "pattern/")):
        return [(case, "torch")] + [(f"{case} · {e}", "onnx") for e in EXPORTERS]
    return [(case, "onnx")]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def randomize_bn(module, seed: int):
    """Seeded running statistics and affine parameters for every BatchNorm, then eval mode."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
    return module.eval()


def timm_module(name: str):
    """The timm model with random weights and the smallest input of 64, the model's minimum and its default that runs."""
    import timm
    import torch

    torch.manual_seed(SEED)
    module = randomize_bn(timm.create_model(name, pretrained=False), _crc(name))
    config = getattr(module, "pretrained_cfg", {}) or {}
    sizes = [(3, 64, 64), tuple(config.get("min_input_size") or ()), tuple(config.get("input_size") or ())]
    last_error = None
    for size in dict.fromkeys(s for s in sizes if len(s) == 3):
        if size[1] < 64 and size != sizes[0]:
            continue
        x = seeded_tensor((1, *size), _crc(name))
        try:
            with torch.no_grad():
                module(x)
            return module, x
        except Exception as err:  # the model's own shape constraints: try the next size
            last_error = err
    raise RuntimeError(f"runs on none of {sizes}: {first_line(last_error)}")


def seeded_tensor(shape, seed: int):
    import torch

    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def export_onnx(module, x, exporter: str) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).model_proto
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            torch.onnx.export(module, (x,), path, dynamo=False, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.EVAL)
            return onnx.load(path)


def light_path(name: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def with_random_weights(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Replace each ``ConstantOfShape`` of a constant shape by a seeded initializer of that shape.

    The zoo's light graphs store every weight as one repeated value, which hides a fold that
    mixes up channels; a BN variance or scale gets values in [0.5, 1.5).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    positive = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            positive.update(node.input[1:2])
            positive.update(node.input[4:5])
    rng = np.random.default_rng(seed)
    keep, new_inits = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            value = rng.random(shape) + 0.5 if node.output[0] in positive else rng.standard_normal(shape) * 0.5
            if len(shape) == 4:  # conv weights: keep activations of order one
                value = value / math.sqrt(max(1, int(np.prod(shape[1:]))))
            new_inits.append(onnx.numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            keep.append(node)
    used = {i for n in keep for i in n.input}
    del graph.node[:]
    graph.node.extend(keep)
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    if model.ir_version <= 3:  # IR 3: every initializer is also a graph input
        names = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name in names or i.name not in shapes]
        listed = {i.name for i in inputs}
        inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in new_inits if t.name not in listed]
        del graph.input[:]
        graph.input.extend(inputs)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=False)


def paddleocr_dir(given: str | None) -> Path | None:
    candidates = [Path(given)] if given else []
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "models")
    for folder in candidates:
        if (folder / PADDLEOCR_FILES["det"]).is_file():
            return folder
        found = sorted(folder.rglob(PADDLEOCR_FILES["det"])) if folder.is_dir() else []
        if found:
            return found[0].parent
    return None


# patterns: one small seeded model per fold that no other tool makes (--patterns) ----------------
#
# Each torch pattern is a module, run as it is and through both exporters; the ONNX-only ones are
# a TorchScript export with model-local functions and a hand-built graph. LeViT-128 is the real
# model of the token BN.

PATTERNS = {
    "pattern/Concat → BN": "BN after a Concat of two convs (Inception)",
    "pattern/Add → BN": "BN after an Add of two convs",
    "pattern/BN → ReflectionPad2d → Conv": "BN → ReflectionPad2d → Conv2d without padding",
    "pattern/BN → ReplicationPad2d → Conv": "BN → ReplicationPad2d → Conv2d without padding",
    "pattern/Linear → flatten → BatchNorm1d → reshape": "Linear on [B, N, C] → flatten(0, 1) → BatchNorm1d → reshape (LeViT)",
    "timm/levit_128": "LeViT-128 (timm, random weights)",
    "pattern/BN in an ONNX function": "Conv → BN inside a model-local ONNX function, two calls",
    "pattern/DequantizeLinear → Conv → BN": "int8 weight → DequantizeLinear → Conv → BN",
}
ONNX_ONLY_PATTERNS = {"pattern/BN in an ONNX function": "TorchScript functions",
                      "pattern/DequantizeLinear → Conv → BN": "hand-built"}


def pattern_modules():
    """The torch modules of the patterns, built on first use so that importing this file needs no torch."""
    import torch
    from torch import nn

    class ConcatBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
            self.conv_b = nn.Conv2d(3, 6, 1, bias=False)
            self.bn = nn.BatchNorm2d(10)

        def forward(self, x):
            return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1))

    class AddBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
            self.conv_b = nn.Conv2d(3, 8, 1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv_a(x) + self.conv_b(x))

    class BnPadConv(nn.Module):
        def __init__(self, pad: type):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.pad = pad(1)
            self.conv = nn.Conv2d(3, 8, 3, padding=0)

        def forward(self, x):
            return self.conv(self.pad(self.bn(x)))

    class TokenLinearBn(nn.Module):
        """timm's LeViT ``LinearNorm``: a bias-less Linear on tokens, its BN over (batch·tokens, channels)."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 16, bias=False)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x):
            y = self.linear(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    return {
        "pattern/Concat → BN": (ConcatBn, (1, 3, 8, 8)),
        "pattern/Add → BN": (AddBn, (1, 3, 8, 8)),
        "pattern/BN → ReflectionPad2d → Conv": (lambda: BnPadConv(nn.ReflectionPad2d), (1, 3, 8, 8)),
        "pattern/BN → ReplicationPad2d → Conv": (lambda: BnPadConv(nn.ReplicationPad2d), (1, 3, 8, 8)),
        "pattern/Linear → flatten → BatchNorm1d → reshape": (TokenLinearBn, (2, 5, 8)),
    }


def pattern_module(case: str):
    """The seeded module of a torch pattern (BN statistics randomised) and its input."""
    import torch

    torch.manual_seed(SEED)
    build, shape = pattern_modules()[case]
    return randomize_bn(build(), _crc(case)), seeded_tensor(shape, _crc(case))


def case_module(case: str):
    return timm_module(case[len("timm/"):]) if case.startswith("timm/") else pattern_module(case)


def export_keeping_bn(module, x, exporter: str) -> onnx.ModelProto:
    """``export_onnx``; where the TorchScript exporter in EVAL mode drops a BN, again with PRESERVE."""
    import torch

    model = export_onnx(module, x, exporter)
    if exporter == "TorchScript":
        with torch.no_grad(), counting_batchnorm(module) as counts:
            module(x)
        if count_onnx_bn(model, per_call=True) < counts["functional"] + counts["module_only"]:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), \
                    tempfile.TemporaryDirectory() as folder:
                warnings.simplefilter("ignore")
                path = os.path.join(folder, "model.onnx")
                torch.onnx.export(module, (x,), path, dynamo=False, do_constant_folding=False,
                                  training=torch.onnx.TrainingMode.PRESERVE)
                model = onnx.load(path)
    return model


def function_pattern_onnx() -> onnx.ModelProto:
    """Two ConvBnBlocks, each exported as a call of one model-local ONNX function holding Conv → BN.

    The TorchScript exporter can do this once per process (a second export with
    ``export_modules_as_functions`` trips an internal assertion), which a worker process is.
    """
    import torch
    from torch import nn

    class ConvBnBlock(nn.Module):
        def __init__(self, in_channels: int, out_channels: int):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.bn = nn.BatchNorm2d(out_channels)

        def forward(self, x):
            return self.bn(self.conv(x))

    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = ConvBnBlock(3, 8)
            self.block2 = ConvBnBlock(8, 8)

        def forward(self, x):
            return self.block2(torch.relu(self.block1(x)))

    case = "pattern/BN in an ONNX function"
    torch.manual_seed(SEED)
    module = randomize_bn(TwoBlocks(), _crc(case))
    x = seeded_tensor((1, 3, 8, 8), _crc(case))
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(module, (x,), path, dynamo=False, do_constant_folding=False, opset_version=17,
                          training=torch.onnx.TrainingMode.EVAL, export_modules_as_functions={ConvBnBlock})
        model = onnx.load(path)
    if not model.functions:
        raise RuntimeError("the TorchScript exporter wrote no model-local function")
    return model


def quantized_pattern_onnx() -> onnx.ModelProto:
    """int8 weight (per output channel) → DequantizeLinear → Conv → BatchNormalization, opset 17."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(_crc("pattern/DequantizeLinear → Conv → BN"))
    out_channels, in_channels = 8, 3
    weight_q = rng.integers(-127, 128, (out_channels, in_channels, 3, 3)).astype(np.int8)
    initializers = {
        "w_q": weight_q,
        "w_scale": (rng.random(out_channels) * 0.01 + 0.005).astype(np.float32),
        "w_zero_point": np.zeros(out_channels, np.int8),
        "conv_b": (0.1 * rng.standard_normal(out_channels)).astype(np.float32),
        "bn_scale": (rng.random(out_channels) + 0.5).astype(np.float32),
        "bn_bias": (0.5 * rng.standard_normal(out_channels)).astype(np.float32),
        "bn_mean": (0.5 * rng.standard_normal(out_channels)).astype(np.float32),
        "bn_var": (rng.random(out_channels) + 0.5).astype(np.float32),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w"], axis=0, name="dequantize_w"),
        helper.make_node("Conv", ["x", "w", "conv_b"], ["conv_out"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"],
                         epsilon=1e-5, name="bn"),
    ]
    graph = helper.make_graph(nodes, "dequantize_conv_bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


# counting and comparing ----------------------------------------------------------------------

def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def count_onnx_bn(model: onnx.ModelProto, *, per_call: bool = False) -> int:
    """BatchNormalization nodes in the graph, its subgraphs, and its model-local functions.

    With ``per_call`` a function's BNs count once per node that calls it (the BN sites a run
    executes), else once per function.
    """
    if not per_call:
        nodes = [n for g in _subgraphs(model.graph) for n in g.node]
        nodes += [n for f in model.functions for n in f.node]
        return sum(n.op_type == "BatchNormalization" for n in nodes)
    functions = {(f.domain, f.name): f for f in model.functions}
    memo: dict = {}

    def in_nodes(nodes, seen) -> int:
        count = 0
        for node in nodes:
            count += node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
            key = (node.domain, node.op_type)
            if key in functions and key not in seen:
                if key not in memo:
                    memo[key] = in_nodes(functions[key].node, seen | {key})
                count += memo[key]
            for attr in node.attribute:
                graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                count += sum(in_nodes(g.node, seen) for g in graphs)
        return count

    return in_nodes(model.graph.node, frozenset())


def seeded_feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """A seeded value of its own dtype and shape for every graph input without a default."""
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for index, value in enumerate(i for i in model.graph.input if i.name not in initializers):
        tensor = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                shape.append(1 if axis == 0 else SPATIAL_GUESS)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else np.dtype(np.float32)
        rng = np.random.default_rng(seed + index)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


BOUNDED_OPS = {"Sigmoid", "Softmax", "HardSigmoid"}


def probability_outputs(model: onnx.ModelProto) -> list[bool]:
    """Which graph outputs a Sigmoid or Softmax makes: their scale is 1, whatever the values seen.

    On random input a detector's sigmoid map sits near 0 (PaddleOCR's det: max 4e-6), where a
    rounding difference of 1e-7 in a probability would read as a 3% error of the observed max.
    """
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [producers.get(o.name) in BOUNDED_OPS for o in model.graph.output]


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray], bounded: list[bool] | None = None) -> float:
    """max |Δ| / max |reference|, over every output; infinite when the outputs do not line up.

    A ``bounded`` output (a probability) is measured against a scale of at least 1.
    """
    if len(reference) != len(candidate):
        return math.inf
    worst = 0.0
    for index, (r, c) in enumerate(zip(reference, candidate)):
        r, c = np.asarray(r), np.asarray(c)
        if r.shape != c.shape:
            return math.inf
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(r, c):
                return math.inf
            continue
        r, c = r.astype(np.float64), c.astype(np.float64)
        if not np.isfinite(c).all() and not np.array_equal(np.isfinite(r), np.isfinite(c)):
            return math.inf
        scale = max(float(np.abs(r[np.isfinite(r)]).max(initial=0.0)), 1.0 if bounded and bounded[index] else 1e-30)
        worst = max(worst, float(np.abs(np.nan_to_num(r - c)).max(initial=0.0)) / scale)
    return worst


def rtol_for(dtype_name: str) -> float:
    """1e-5 of scale for float32; the dtype's own check tolerance (if bnexport has one) when coarser."""
    try:
        from bnexport.config import tolerance_for
    except ImportError:
        eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}.get(dtype_name)
        return max(FLOAT32_RTOL, 10 * eps) if eps else FLOAT32_RTOL
    return max(FLOAT32_RTOL, tolerance_for(dtype_name).rtol) if dtype_name in ("float16", "bfloat16") else FLOAT32_RTOL


def first_line(err) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    # ONNX Runtime's "[ONNXRuntimeError] : 1 : FAIL : /path/file.cc:157 function signature message"
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ", r"\1: ", line)
    line = re.sub(r"\S+\.(cc|h|cpp):\d+ (\S+\([^)]*\)( const)? )?", "", line)
    line = re.sub(r"\s+", " ", line)
    return f"{type(err).__name__}: {line}"[:90] if isinstance(err, BaseException) else line[:90]


# the tools ----------------------------------------------------------------------------------

def _onnx_bnexport(model):
    from bnexport.fold import fold_onnx

    return fold_onnx(model, check=False)[0]


def _onnxsim(model):
    import onnxsim

    return onnxsim.simplify(model)[0]


def _onnxslim(model):
    import onnxslim

    return onnxslim.slim(model)


def _onnxoptimizer(model):
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _ort_fusion(model, level: str = "ORT_ENABLE_BASIC"):
    """ONNX Runtime's rewrites at ``level`` (basic: Conv+BN fusion among them), saved back as ONNX."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _ort_extended(model):
    """ONNX Runtime's extended-level rewrites (the saved model may hold com.microsoft fused ops)."""
    return _ort_fusion(model, "ORT_ENABLE_EXTENDED")


def _aimet_onnx(model):
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    fold_all_batch_norms_to_weight(copy)
    return copy


def _module_bnexport(module, x):
    import inspect

    from bnexport.fold import fold_module

    parameters = inspect.signature(fold_module).parameters
    keyword = {"example_inputs": (x,)} if "example_inputs" in parameters else {"example_input": x}
    return fold_module(module, check=False, **keyword)[0]


def _fx_fuse(module, x):
    from torch.fx.experimental.optimization import fuse

    return fuse(module)


def _aimet_torch(module, x):
    try:
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
    except ImportError:
        from aimet_torch.v2.batch_norm_fold import fold_all_batch_norms
    fold_all_batch_norms(module, tuple(x.shape), dummy_input=x)
    return module


ONNX_TOOLS = {"bnexport": _onnx_bnexport, "onnxsim": _onnxsim, "onnxslim": _onnxslim,
              "onnxoptimizer": _onnxoptimizer, "ORT fusion": _ort_fusion, "aimet_onnx": _aimet_onnx}
TORCH_TOOLS = {"bnexport": _module_bnexport, "fx.fuse": _fx_fuse, "aimet_torch": _aimet_torch}
# --patterns also saves ONNX Runtime's extended level, whose fusions go beyond Conv+BN
PATTERN_ONNX_TOOLS = {"bnexport": _onnx_bnexport, "onnxsim": _onnxsim, "onnxslim": _onnxslim,
                      "onnxoptimizer": _onnxoptimizer, "ORT fusion": _ort_fusion, "ORT extended": _ort_extended,
                      "aimet_onnx": _aimet_onnx}
TOOL_PACKAGES = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer",
                 "ORT fusion": "onnxruntime", "ORT extended": "onnxruntime", "aimet_onnx": "aimet_onnx", "aimet_torch": "aimet_torch",
                 "fx.fuse": "torch", "bnexport": "bnexport"}


def tool_available(name: str) -> str | None:
    """None when the tool can run here, else why not."""
    package = TOOL_PACKAGES[name]
    try:
        if importlib.util.find_spec(package) is None:
            return f"{package} not installed"
    except (ImportError, ValueError) as err:
        return first_line(err)
    return None


# torch: counting the BatchNorms a module executes ----------------------------------------------

@contextlib.contextmanager
def counting_batchnorm(module):
    """Count BN sites executed inside the block: ``F.batch_norm`` calls, plus BN module calls that make none."""
    from torch import nn
    from torch.nn import functional

    counts = {"functional": 0, "module_only": 0}
    original = functional.batch_norm

    def batch_norm(*args, **kwargs):
        counts["functional"] += 1
        return original(*args, **kwargs)

    stack = []

    def pre_hook(mod, args):
        stack.append(counts["functional"])

    def hook(mod, args, output):
        if counts["functional"] == stack.pop():
            counts["module_only"] += 1

    handles = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook)]
    functional.batch_norm = batch_norm
    try:
        yield counts
    finally:
        functional.batch_norm = original
        for h in handles:
            h.remove()


def run_module(module, x) -> tuple[list[np.ndarray], int]:
    """Outputs (flattened) and BN sites executed, on one input."""
    import torch

    with torch.no_grad(), counting_batchnorm(module) as counts:
        output = module(x)
    return [t.detach().float().numpy() for t in _flatten(output)], counts["functional"] + counts["module_only"]


def _flatten(output):
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    return []


# the worker: one case in its own process ---------------------------------------------------------

class Recorder:
    def __init__(self, path: Path):
        self.handle = open(path, "a")

    def write(self, **record):
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()


def _cell(remaining, total, error, rtol, reason=None, checker=None) -> dict:
    result = {"remaining": remaining, "total": total}
    if reason:
        result.update(status="fails", reason=reason)
    elif error <= rtol:
        result.update(status="ok", rel_err=error)
    else:
        result.update(status="wrong", rel_err=error)
    if checker:
        result["checker"] = checker
    return result


def run_onnx_row(row: str, model: onnx.ModelProto, tools: list[str], rec: Recorder, *, torch_total: int | None = None,
                 per_call: bool = False):
    total = count_onnx_bn(model, per_call=per_call)
    dequantize = _count_op(model, "DequantizeLinear")
    feeds = seeded_feeds(model, SEED)
    info = {"bn": total, "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()}, "ir": model.ir_version,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}
    if torch_total is not None:
        info["bn_in_module"] = torch_total
    try:
        reference = ort_run(model, feeds)
    except Exception as err:
        rec.write(row=row, kind="onnx", info={**info, "error": f"reference does not run: {first_line(err)}"})
        return
    float_outputs = [r.dtype for r in reference if np.issubdtype(r.dtype, np.floating)]
    dtype = str(float_outputs[0]) if float_outputs else "float32"
    info["dtype"] = dtype
    rtol = rtol_for(dtype)
    rec.write(row=row, kind="onnx", info=info)
    serialized = model.SerializeToString()
    bounded = probability_outputs(model)
    for tool in tools:
        # a copy each: some tools edit their input
        ran = _run_tool(rec, row, tool, total, lambda: PATTERN_ONNX_TOOLS[tool](onnx.ModelProto.FromString(serialized)))
        if ran is None:
            continue
        output, seconds = ran
        remaining = count_onnx_bn(output, per_call=per_call)
        checker = None
        try:
            onnx.checker.check_model(output, full_check=True)
        except Exception as err:
            checker = first_line(err)
        try:
            candidate = ort_run(output, feeds)
        except Exception as err:
            rec.write(row=row, tool=tool, result=_cell(remaining, total, 0, rtol, reason=f"output does not run in ORT: "
                                                                                            f"{first_line(err)}", checker=checker))
            continue
        result = _cell(remaining, total, relative_error(reference, candidate, bounded), rtol, checker=checker)
        result["seconds"] = seconds
        if dequantize and _count_op(output, "DequantizeLinear") < dequantize:
            result["dequantized"] = True  # a quantized weight became a float one: no longer an int8 model
        rec.write(row=row, tool=tool, result=result)


def _count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for g in _subgraphs(model.graph) for n in g.node)


def _run_tool(rec: "Recorder", row: str, tool: str, total: int, fold):
    """(the tool's output, its seconds), or None after recording the failure as the tool's cell."""
    rec.write(row=row, tool=tool, start=True)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            output = fold()
    except BaseException as err:  # noqa: BLE001 a baseline failing is a finding, whatever it raises
        rec.write(row=row, tool=tool, result={"status": "fails", "reason": first_line(err), "total": total})
        return None
    return output, time.perf_counter() - started


def run_torch_row(row: str, module, x, tools: list[str], rec: Recorder) -> int:
    import copy

    reference, total = run_module(module, x)
    rtol = rtol_for("float32")
    rec.write(row=row, kind="torch", info={"bn": total, "inputs": {"x": [list(x.shape), "float32"]}, "dtype": "float32"})
    for tool in tools:
        ran = _run_tool(rec, row, tool, total, lambda: TORCH_TOOLS[tool](copy.deepcopy(module), x))
        if ran is None:
            continue
        output, seconds = ran
        try:
            candidate, remaining = run_module(output, x)
        except Exception as err:
            rec.write(row=row, tool=tool, result={"status": "fails", "total": total,
                                                  "reason": f"output does not run: {first_line(err)}"})
            continue
        result = _cell(remaining, total, relative_error(reference, candidate), rtol)
        result["seconds"] = seconds
        rec.write(row=row, tool=tool, result=result)
    return total


def onnx_source(case: str, args, module_cache: dict) -> onnx.ModelProto:
    """The ONNX model of a non-timm row (a fp16 row converts its base model)."""
    if case.startswith("fp16/"):
        return to_fp16(onnx_source(case[len("fp16/"):], args, module_cache))
    if case.startswith("light/"):
        name = case[len("light/"):].replace(" (random weights)", "")
        model = onnx.load(str(light_path(name)))
        return with_random_weights(model, _crc(name)) if case.endswith("(random weights)") else model
    if case.startswith("paddleocr/"):
        folder = paddleocr_dir(args.paddleocr_dir)
        if folder is None:
            raise FileNotFoundError("PaddleOCR files not found (pass --paddleocr-dir)")
        return onnx.load(str(folder / PADDLEOCR_FILES[case.split("/")[1]]))
    if case == f"pattern/BN in an ONNX function · {ONNX_ONLY_PATTERNS['pattern/BN in an ONNX function']}":
        return function_pattern_onnx()
    if case == f"pattern/DequantizeLinear → Conv → BN · {ONNX_ONLY_PATTERNS['pattern/DequantizeLinear → Conv → BN']}":
        return quantized_pattern_onnx()
    if case.startswith("pattern/"):  # "pattern/NAME · EXPORTER"
        name, exporter = case.split(" · ")
        if name not in module_cache:
            module_cache[name] = pattern_module(name)
        return export_keeping_bn(*module_cache[name], exporter)
    if case.startswith("timm/"):  # "timm/NAME · EXPORTER"
        name, exporter = case[len("timm/"):].split(" · ")
        if name not in module_cache:
            module_cache[name] = timm_module(name)
        module, x = module_cache[name]
        return export_onnx(module, x, exporter)
    raise ValueError(f"unknown case {case}")


def worker(case: str, todo: list[tuple[str, str]], out: Path, args) -> None:
    """Run the (row, tool) pairs of ``todo`` for one case, recording each before and after."""
    rec = Recorder(out)
    rows: dict[str, list[str]] = {}
    for row, tool in todo:
        rows.setdefault(row, []).append(tool)
    modules: dict = {}
    torch_total = None
    for row, kind in case_rows(case):
        if row not in rows:
            continue
        rec.write(row=row, setup=True)
        try:
            if kind == "torch":
                import torch

                torch.set_num_threads(1)
                name = case[len("timm/"):] if case.startswith("timm/") else case
                modules[name] = case_module(case)
                torch_total = run_torch_row(row, *modules[name], rows[row], rec)
                continue
            if case.startswith(("timm/", "pattern/")):
                import torch

                torch.set_num_threads(1)
            model = onnx_source(row, args, modules)
        except BaseException as err:  # noqa: BLE001 a model that cannot be built or exported is a row saying so
            rec.write(row=row, kind=kind, info={"error": first_line(err)})
            traceback.print_exc(file=sys.stderr)
            continue
        run_onnx_row(row, model, rows[row], rec, torch_total=torch_total if kind_of_case(case) == "module" else None,
                     per_call=case in PATTERNS)


def kind_of_case(case: str) -> str:
    """"module" where the ONNX rows are exports of the case's torch module."""
    return "module" if case.startswith("timm/") or (case.startswith("pattern/") and case not in ONNX_ONLY_PATTERNS) \
        else "onnx"


# the driver --------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a worker killed mid-line
            pass
    return records


def run_case(case: str, tools: dict[str, list[str]], args, log) -> list[dict]:
    """Run one case in worker processes until every (row, tool) has a record; crashes and timeouts become cells."""
    todo = [(row, tool) for row, kind in case_rows(case) for tool in tools[kind]]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "records.jsonl"
        while True:
            done = {(r["row"], r["tool"]) for r in read_records(out) if "result" in r}
            failed_setup = {r["row"] for r in read_records(out) if "info" in r and "error" in r["info"]}
            pending = [(row, tool) for row, tool in todo if (row, tool) not in done and row not in failed_setup]
            if not pending:
                break
            command = [sys.executable, __file__, "--worker", case, "--todo", json.dumps(pending), "--out", str(out)]
            if args.paddleocr_dir:
                command += ["--paddleocr-dir", args.paddleocr_dir]
            try:
                finished = subprocess.run(command, stdout=log, stderr=log, timeout=args.timeout, env=_worker_env())
                why = None if finished.returncode == 0 else _exit_reason(finished.returncode)
            except subprocess.TimeoutExpired:
                why = f"timed out after {args.timeout} s"
            if why is None:
                continue
            records = read_records(out)
            started = [r for r in records if r.get("start")]
            finished_pairs = {(r["row"], r["tool"]) for r in records if "result" in r}
            culprit = next(((r["row"], r["tool"]) for r in reversed(started)
                            if (r["row"], r["tool"]) not in finished_pairs), None)
            with open(out, "a") as handle:
                if culprit is not None:
                    handle.write(json.dumps({"row": culprit[0], "tool": culprit[1],
                                             "result": {"status": "fails", "reason": why}}) + "\n")
                else:  # died while building or exporting the model: the row in setup fails
                    setups = [r["row"] for r in records if r.get("setup")]
                    row = setups[-1] if setups else pending[0][0]
                    kind = dict(case_rows(case))[row]
                    handle.write(json.dumps({"row": row, "kind": kind, "info": {"error": f"setup {why}"}}) + "\n")
        return read_records(out)


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"crashed ({signal.Signals(-code).name})"
        except ValueError:
            return f"crashed (signal {-code})"
    return f"worker exited {code}"


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def collect(records: list[dict], case: str) -> dict[str, dict]:
    rows = {}
    for row, kind in case_rows(case):
        rows[row] = {"model": row, "kind": kind, "info": {}, "tools": {}}
    for r in records:
        if r["row"] not in rows:
            continue
        if "info" in r:
            rows[r["row"]]["info"].update(r["info"])
        if "result" in r:
            rows[r["row"]]["tools"][r["tool"]] = r["result"]
    return rows


def cell_text(result: dict | None, info: dict) -> str:
    if result is None:
        return ""
    total = result.get("total", info.get("bn", "?"))
    if result["status"] == "fails":
        head = f"{result['remaining']}/{total} " if "remaining" in result else ""
        return f"{head}fails: {result['reason']}"
    count = f"{result['remaining']}/{total}"
    invalid = ", fails onnx.checker" if result.get("checker") else ""
    invalid += ", weight dequantized" if result.get("dequantized") else ""
    if result["status"] == "ok":
        return f"{count} ok{invalid}"
    return f"{count} wrong ({result['rel_err']:.1e}){invalid}"


def markdown_table(rows: list[dict], tools: list[str], kind: str) -> str:
    header = ["model", "input", "BN", *tools]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        if row["kind"] != kind:
            continue
        info = row["info"]
        shape = ", ".join(f"{'×'.join(map(str, s))} {d}" for s, d in info.get("inputs", {}).values())
        if "error" in info and not row["tools"]:
            cells = [f"not run: {info['error']}"] + [""] * (len(tools) - 1)
            bn = ""
        else:
            bn = str(info.get("bn", "?"))
            if info.get("bn_in_module") is not None:
                bn += f" (module {info['bn_in_module']})"
            cells = [cell_text(row["tools"].get(t), info) for t in tools]
        escaped = [c.replace("|", "\\|") for c in [row["model"], shape, bn, *cells]]
        lines.append("| " + " | ".join(escaped) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], tools: list[str], kind: str) -> str:
    """Per tool, over the models with BN: right outputs with every, some or no BN folded, wrong ones, failures."""
    header = ["tool", "models with BN", "right, every BN folded", "right, some", "right, none", "wrong output", "fails",
              "BN folded (right outputs)", "seconds in the tool"]
    if kind == "onnx":
        header.insert(5, "of the right, fail onnx.checker")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for tool in tools:
        cells = [r["tools"][tool] for r in rows if r["kind"] == kind and r["tools"].get(tool)]
        cells = [c for c in cells if c.get("total") != 0]
        if not cells:
            continue
        ok = [c for c in cells if c["status"] == "ok"]
        total = sum(c["total"] for c in cells if isinstance(c.get("total"), int))
        timed = [c["seconds"] for c in cells if "seconds" in c]
        values = [tool, len(cells), sum(c["remaining"] == 0 for c in ok), sum(0 < c["remaining"] < c["total"] for c in ok),
                  sum(c["remaining"] == c["total"] for c in ok), sum(c["status"] == "wrong" for c in cells),
                  sum(c["status"] == "fails" for c in cells),
                  f"{sum(c['total'] - c['remaining'] for c in ok)} of {total}", f"{sum(timed):.1f} ({len(timed)} models)"]
        if kind == "onnx":
            values.insert(5, sum(bool(c.get("checker")) for c in ok))
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines)


def module_gaps(rows: list[dict]) -> list[str] | None:
    """Models whose module fold removes fewer BN than bnexport's ONNX fold of either export (None: nothing to compare)."""
    by_name = {r["model"]: r for r in rows}
    gaps, compared = [], 0
    for row in rows:
        if row["kind"] != "torch" or not row["info"].get("bn"):
            continue
        module = row["tools"].get("bnexport", {})
        exports = [by_name.get(f"{row['model']} · {e}", {}).get("tools", {}).get("bnexport", {}) for e in EXPORTERS]
        exports = [c for c in exports if c.get("status") == "ok"]
        if not exports:
            continue
        compared += 1
        module_folded = module["total"] - module["remaining"] if module.get("status") == "ok" else 0
        onnx_folded = max(c["total"] - c["remaining"] for c in exports)
        if module_folded < onnx_folded:
            gaps.append(f"{row['model'].split('/', 1)[1]} ({module_folded} < {onnx_folded})")
    return gaps if compared else None


def pattern_table(rows: list[dict], tools: dict, *, compact: bool = False) -> str:
    """One row per pattern, one column per tool; an ONNX cell is "TorchScript / dynamo" (or its one file)."""
    by_name = {r["model"]: r for r in rows}
    torch_tools, onnx_tools = tools["torch"], tools["onnx"]
    header = ["pattern", "BN"]
    header += [f"{t} module" if t == "bnexport" else t for t in torch_tools]
    header += [f"{t} ONNX" if t == "bnexport" else t for t in onnx_tools]
    if compact:  # bnexport's two columns first; ORT's two levels in one column
        header = header[:2] + sorted((h for h in header[2:] if h != "ORT extended"),
                                     key=lambda h: not h.startswith("bnexport"))
    shown = [COMPACT_NAMES.get(h, h) for h in header] if compact else header
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in header) + "|"]
    cell = _compact_cell if compact else cell_text
    for case, title in PATTERNS.items():
        if not any(r == case or r.startswith(f"{case} · ") for r in by_name):
            continue
        module = by_name.get(case) if case not in ONNX_ONLY_PATTERNS else None
        names = sorted((name for name, kind in case_rows(case) if kind == "onnx"), key=lambda n: "dynamo" in n)
        files = [by_name[name] for name in names if name in by_name]  # TorchScript first
        cells = {}
        for tool in torch_tools:
            cells[f"{tool} module" if tool == "bnexport" else tool] = (
                "n/a" if module is None else _not_run(module) or cell(module["tools"].get(tool), module["info"]))
        for tool in onnx_tools:
            cells[f"{tool} ONNX" if tool == "bnexport" else tool] = " / ".join(
                _not_run(f) or cell(f["tools"].get(tool), f["info"]) for f in files)
        extended = cells.pop("ORT extended", None) if compact else None
        if extended is not None and cells.get("ORT fusion") != extended:
            cells["ORT fusion"] += f" (extended: {extended})"
        bn = module["info"].get("bn", "?") if module else " / ".join(str(f["info"].get("bn", "?")) for f in files)
        values = [title if compact else f"{title} (`{case}`)", str(bn)]
        values += [cells[h] for h in header[len(values):]]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines)


COMPACT_NAMES = {"aimet_torch": "AIMET torch", "aimet_onnx": "AIMET onnx", "ORT fusion": "ORT"}


def _not_run(row: dict) -> str:
    info = row["info"]
    return f"not run: {info['error']}" if "error" in info and not row["tools"] else ""


def _compact_cell(result: dict | None, info: dict) -> str:
    """BN remaining (the total is the row's), with "wrong" or "fails" where the output is not right."""
    if result is None:
        return ""
    if result["status"] == "fails":
        return "fails"
    text = str(result["remaining"])
    if result["status"] == "wrong":
        text += " **wrong**"
    return text + (" (dequantized)" if result.get("dequantized") else "")


def select_cases(args) -> tuple[list[str], list[str]]:
    notes = []
    every = list(PATTERNS) if args.patterns else all_cases()
    cases = every if args.patterns or not args.quick else QUICK
    if args.models:
        pattern = re.compile(args.models)
        cases = [c for c in every if pattern.search(c)]
    if importlib.util.find_spec("timm") is None:
        notes.append("timm not installed: its models skipped")
        cases = [c for c in cases if "timm/" not in c]
    else:
        import timm

        unknown = [c for c in cases if c.startswith("timm/") and not timm.is_model(c[len("timm/"):])]
        if unknown:
            notes.append(f"not in this timm ({timm.__version__}): {', '.join(unknown)}")
        cases = [c for c in cases if c not in unknown]
    if any(c.startswith("fp16/") for c in cases) and importlib.util.find_spec("onnxconverter_common") is None:
        notes.append("onnxconverter-common not installed: fp16 rows skipped")
        cases = [c for c in cases if not c.startswith("fp16/")]
    if any("paddleocr/" in c for c in cases) and paddleocr_dir(args.paddleocr_dir) is None:
        notes.append("PaddleOCR's ONNX files not found (install rapidocr-onnxruntime or pass --paddleocr-dir): skipped")
        cases = [c for c in cases if "paddleocr/" not in c]
    return cases, notes


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for package in ("bnexport", "torch", "onnx", "onnxruntime", "timm", "onnxsim", "onnxslim", "onnxoptimizer",
                    "onnxconverter_common", "aimet_torch", "aimet_onnx"):
        try:
            from importlib.metadata import version

            found[package] = version(package.replace("_", "-"))
        except Exception:  # not installed, or installed from source without metadata
            pass
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a small subset: {', '.join(QUICK)}")
    parser.add_argument("--patterns", action="store_true",
                        help="instead of the models: one small model per fold no other tool makes, and LeViT-128")
    parser.add_argument("--models", default=None, metavar="REGEX", help="only the cases whose name matches (e.g. 'timm/res|light/')")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every row as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables as Markdown")
    parser.add_argument("--paddleocr-dir", default=None, help="folder with PaddleOCR's ONNX files (default: the installed rapidocr_onnxruntime)")
    parser.add_argument("--tools", default=None, help="comma-separated tool names to run (default: every installed one)")
    parser.add_argument("--timeout", type=int, default=CASE_TIMEOUT_S, help="seconds per model (default: %(default)s)")
    parser.add_argument("--log", type=Path, default=None, help="worker output goes here (default: discarded)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                        help="print the tables of an earlier run's --json, without running anything")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--todo", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, [tuple(p) for p in json.loads(args.todo)], args.out, args)
        return 0

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print(report(data["rows"], data["tools"], data["notes"], data.get("seconds"), data.get("load_average"),
                     patterns=data.get("mode") == "patterns"))
        return 0
    cases, notes = select_cases(args)
    if args.list:
        print("\n".join(cases))
        return 0
    wanted = set(args.tools.split(",")) if args.tools else None
    tools, missing = {"torch": [], "onnx": []}, {}
    for kind, registry in (("torch", TORCH_TOOLS), ("onnx", PATTERN_ONNX_TOOLS if args.patterns else ONNX_TOOLS)):
        for name in registry:
            if wanted is not None and name not in wanted:
                continue
            why = tool_available(name)
            if why:
                missing[f"{kind}: {name}"] = why
            else:
                tools[kind].append(name)
    notes += [f"{tool} skipped: {why}" for tool, why in missing.items()]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    from tqdm import tqdm

    rows: list[dict] = []
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    started = time.perf_counter()
    for case in tqdm(cases, desc="coverage", unit="model", file=sys.stderr):
        tqdm.write(f"  {case}", file=sys.stderr)
        if log is not subprocess.DEVNULL:
            log.write(f"==== {case}\n")
            log.flush()
        rows += collect(run_case(case, tools, args, log), case).values()
        if args.json:  # rows so far, so that an interrupted run still leaves its findings
            write_json(args.json, rows, tools, notes, partial=True, patterns=args.patterns)
    elapsed = time.perf_counter() - started

    text = report(rows, tools, notes, elapsed, os.getloadavg(), patterns=args.patterns)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        write_json(args.json, rows, tools, notes, partial=False, seconds=elapsed, patterns=args.patterns)
    return 0


def report(rows: list[dict], tools: dict, notes: list[str], seconds: float | None, load, *, patterns: bool = False) -> str:
    """The Markdown tables and summaries of a run."""
    text = []
    if patterns:
        text += ["Patterns (BN remaining/total; ONNX cells: TorchScript export / dynamo export):", "",
                 pattern_table(rows, tools), "",
                 "Compact (BN remaining of BN; ONNX cells: TorchScript / dynamo; ORT: basic level, and the extended "
                 "level where it differs):", "",
                 pattern_table(rows, tools, compact=True), ""]
    if any(r["kind"] == "torch" for r in rows):
        text += ["Torch modules (eager is the reference; BN = BatchNorm sites executed):", "",
                 markdown_table(rows, tools["torch"], "torch"), "", summary(rows, tools["torch"], "torch"), ""]
    gaps = module_gaps(rows)
    if gaps is not None:
        text += [f"bnexport's module fold removes fewer BN than its ONNX fold of the same model's exports in "
                 f"{len(gaps)} models" + (f": {', '.join(gaps)}" if gaps else ""), ""]
    if any(r["kind"] == "onnx" for r in rows):
        text += ["ONNX models (ONNX Runtime, optimisations off, on the original is the reference):", "",
                 markdown_table(rows, tools["onnx"], "onnx"), "", summary(rows, tools["onnx"], "onnx"), ""]
    text += [f"note: {n}" for n in notes]
    if seconds is not None:
        text.append(f"{len(rows)} rows in {seconds:.0f} s; load average at the end "
                    f"{' '.join(f'{v:.1f}' for v in load)}")
    return "\n".join(text)


def write_json(path: Path, rows: list[dict], tools: dict, notes: list[str], *, partial: bool, seconds: float | None = None,
               patterns: bool = False):
    data = {"versions": versions(), "notes": notes, "tools": tools, "partial": partial, "seconds": seconds,
            "load_average": os.getloadavg(), "rows": rows}
    if patterns:
        data["mode"] = "patterns"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
