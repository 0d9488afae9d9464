"""Coverage on models nobody here wrote: which BatchNorms each folding tool removes, and whether its output is right.

    python tools/coverage_fold.py [--quick] [--models REGEX] [--json OUT] [--paddleocr-dir DIR]

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
    if case.startswith("timm/"):
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


def count_onnx_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs, and its model-local functions."""
    nodes = [n for g in _subgraphs(model.graph) for n in g.node]
    nodes += [n for f in model.functions for n in f.node]
    return sum(n.op_type == "BatchNormalization" for n in nodes)


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


def _ort_fusion(model):
    """ONNX Runtime's basic-level rewrites (Conv+BN fusion among them), saved back as ONNX."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


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
TOOL_PACKAGES = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer",
                 "ORT fusion": "onnxruntime", "aimet_onnx": "aimet_onnx", "aimet_torch": "aimet_torch",
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


def run_onnx_row(row: str, model: onnx.ModelProto, tools: list[str], rec: Recorder, *, torch_total: int | None = None):
    total = count_onnx_bn(model)
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
        ran = _run_tool(rec, row, tool, total, lambda: ONNX_TOOLS[tool](onnx.ModelProto.FromString(serialized)))
        if ran is None:
            continue
        output, seconds = ran
        remaining = count_onnx_bn(output)
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
        rec.write(row=row, tool=tool, result=result)


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
                name = case[len("timm/"):]
                modules[name] = timm_module(name)
                torch_total = run_torch_row(row, *modules[name], rows[row], rec)
                continue
            if case.startswith("timm/"):
                import torch

                torch.set_num_threads(1)
            model = onnx_source(row, args, modules)
        except BaseException as err:  # noqa: BLE001 a model that cannot be built or exported is a row saying so
            rec.write(row=row, kind=kind, info={"error": first_line(err)})
            traceback.print_exc(file=sys.stderr)
            continue
        run_onnx_row(row, model, rows[row], rec, torch_total=torch_total if case.startswith("timm/") else None)


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
            gaps.append(f"{row['model'][len('timm/'):]} ({module_folded} < {onnx_folded})")
    return gaps if compared else None


def select_cases(args) -> tuple[list[str], list[str]]:
    notes = []
    cases = QUICK if args.quick else all_cases()
    if args.models:
        pattern = re.compile(args.models)
        cases = [c for c in all_cases() if pattern.search(c)]
    if importlib.util.find_spec("timm") is None:
        notes.append("timm not installed: its models skipped")
        cases = [c for c in cases if "timm/" not in c]
    else:
        import timm

        unknown = [c for c in cases if c.startswith("timm/") and not timm.is_model(c[len("timm/"):])]
        if unknown:
            notes.append(f"not in this timm ({timm.__version__}): {', '.join(unknown)}")
        cases = [c for c in cases if c not in unknown]
    if importlib.util.find_spec("onnxconverter_common") is None:
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
        print(report(data["rows"], data["tools"], data["notes"], data.get("seconds"), data.get("load_average")))
        return 0
    cases, notes = select_cases(args)
    if args.list:
        print("\n".join(cases))
        return 0
    wanted = set(args.tools.split(",")) if args.tools else None
    tools, missing = {"torch": [], "onnx": []}, {}
    for kind, registry in (("torch", TORCH_TOOLS), ("onnx", ONNX_TOOLS)):
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
            write_json(args.json, rows, tools, notes, partial=True)
    elapsed = time.perf_counter() - started

    text = report(rows, tools, notes, elapsed, os.getloadavg())
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        write_json(args.json, rows, tools, notes, partial=False, seconds=elapsed)
    return 0


def report(rows: list[dict], tools: dict, notes: list[str], seconds: float | None, load) -> str:
    """The Markdown tables and summaries of a run."""
    text = []
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


def write_json(path: Path, rows: list[dict], tools: dict, notes: list[str], *, partial: bool, seconds: float | None = None):
    data = {"versions": versions(), "notes": notes, "tools": tools, "partial": partial, "seconds": seconds,
            "load_average": os.getloadavg(), "rows": rows}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
