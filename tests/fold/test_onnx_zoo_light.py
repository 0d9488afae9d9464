"""The model-zoo graphs that ship inside the onnx wheel (``onnx/backend/test/data/light``).

They are IR version 3 (every initializer is also a graph input) and opset 9, from the
onnx-caffe2 era, and keep each weight as a ConstantOfShape of its shape. Each folds, passes
the full checker, loads in ONNX Runtime, and matches ONNX Runtime on the original. For the
numbers to mean something the test also replaces every ConstantOfShape weight by seeded
random values (an initializer, listed as an input as IR 3 wants), so no channel looks like
another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnexport.fold import fold_onnx
from fold.onnx_oracle import assert_valid, bn_count, relative_errors, run, seeded_feeds

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# BatchNormalization nodes before → after the fold. densenet121's other 62 follow a Concat and
# feed a Relu: no linear layer touches them (onnxsim keeps them too).
EXPECTED_BN = {"resnet50": (53, 0), "densenet121": (121, 62), "inception_v1": (0, 0), "inception_v2": (69, 0),
               "shufflenet": (49, 0), "squeezenet": (0, 0), "vgg19": (0, 0), "bvlc_alexnet": (0, 0), "zfnet512": (0, 0)}
QUICK = {"shufflenet", "squeezenet"}


def light_model(name: str) -> onnx.ModelProto:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"this onnx wheel has no {path.name}")
    return onnx.load(str(path))


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Each ConstantOfShape of a constant shape becomes a seeded random initializer of that shape:
    BN scales and variances in [0.5, 1.5), weights scaled by 1/√fan-in, everything else small.
    The final Softmax's input (the logits) becomes a graph output too."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    roles = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            roles.setdefault(name, (node.op_type, position))
    randomized = onnx.ModelProto()
    randomized.CopyFrom(model)
    kept_nodes = []
    for node in randomized.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in initializers:
            kept_nodes.append(node)
            continue
        shape = tuple(int(d) for d in initializers[node.input[0]])
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
        op, position = roles.get(node.output[0], ("", -1))
        if op == "BatchNormalization" and position in (1, 4):
            data = rng.random(shape) + 0.5
        elif op in ("Conv", "Gemm") and position == 1 and len(shape) >= 2:
            data = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if op == "Conv" else shape[0])
        else:
            data = rng.standard_normal(shape) * 0.1
        tensor = numpy_helper.from_array(data.astype(value.dtype), node.output[0])
        randomized.graph.initializer.append(tensor)
        randomized.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del randomized.graph.node[:]
    randomized.graph.node.extend(kept_nodes)
    # a saturated softmax hides differences: compare the logits as well
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(randomized).graph.value_info}
    for node in kept_nodes:
        if node.op_type == "Softmax" and node.output[0] in {o.name for o in graph.output} and node.input[0] in inferred:
            randomized.graph.output.append(inferred[node.input[0]])
    return randomized


def cases():
    return [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in EXPECTED_BN]


@pytest.mark.parametrize("name", cases())
def test_light_zoo_graph_folds_as_is(name):
    original = light_model(name)
    folded, report = fold_onnx(original, check=False)
    before, after = EXPECTED_BN[name]
    assert (bn_count(original.graph), bn_count(folded.graph)) == (before, after)
    assert len(report.folded) == before - after and len(report.kept) == after
    if not report.folded:
        assert folded == original
    assert {t.name for t in folded.graph.initializer} <= {i.name for i in folded.graph.input}  # IR 3
    assert_valid(folded)
    feeds = seeded_feeds(original)
    assert max(relative_errors(run(original, feeds), run(folded, feeds))) < 1e-5


@pytest.mark.parametrize("name", cases())
def test_light_zoo_graph_with_random_weights_matches_ort(name):
    original = with_random_weights(light_model(name))
    onnx.checker.check_model(original, full_check=True)
    folded, report = fold_onnx(original, check=False)
    before, after = EXPECTED_BN[name]
    assert (bn_count(original.graph), bn_count(folded.graph)) == (before, after)
    assert_valid(folded)
    feeds = seeded_feeds(original, seed=1)
    reference = run(original, feeds)
    assert max(relative_errors(reference, run(folded, feeds))) < 1e-5


# PaddleOCR's ONNX files, as the rapidocr-onnxruntime wheel ships them (optional, not a test extra: its
# dependencies include OpenCV; `pip install --no-deps rapidocr-onnxruntime` is enough here): the
# detector has ConvTranspose → Add(per-channel constant) → BN.
PADDLE_OCR = {"ch_PP-OCRv4_det_infer": ((3, 0), [1, 3, 224, 224]), "ch_PP-OCRv4_rec_infer": ((6, 0), [1, 3, 48, 160]),
              "ch_ppocr_mobile_v2.0_cls_infer": ((35, 0), [1, 3, 48, 192])}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PADDLE_OCR))
def test_paddle_ocr_models_fold(name):
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds the files without importing the package
    path = Path(spec.submodule_search_locations[0]) / "models" / f"{name}.onnx" if spec else None
    if path is None or not path.is_file():
        pytest.skip("rapidocr-onnxruntime is not installed")
    original = onnx.load(str(path))
    folded, report = fold_onnx(original, check=False)
    (before, after), shape = PADDLE_OCR[name]
    assert (bn_count(original.graph), bn_count(folded.graph)) == (before, after)
    assert_valid(folded)
    data = next(i.name for i in original.graph.input)
    feeds = seeded_feeds(original, shapes={data: shape})
    assert max(relative_errors(run(original, feeds), run(folded, feeds))) < 1e-5
