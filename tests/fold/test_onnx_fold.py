import numpy as np
import onnx
import pytest
import torch

from bnexport.errors import BnexportError
from bnexport.export import onnx_bytes, op_counts
from bnexport.fold import fold_onnx, input_shape
from bnexport.fold.onnx_fold import ABSORBED_PREFIX
from bnexport.parity import onnxruntime_runner, seeded_input


def test_simplecnn_onnx_folds_exactly(tiny_run):
    original = onnx.load(str(tiny_run / "model.onnx"))
    before = onnx.ModelProto()
    before.CopyFrom(original)
    folded, report = fold_onnx(original)
    assert original == before  # the input model is untouched
    assert op_counts(original)["BatchNormalization"] == 1
    assert "BatchNormalization" not in op_counts(folded)
    assert report.to_json()["folded"] == 1 and report.parity["passed"]
    onnx.checker.check_model(folded, full_check=True)
    # interface, opset and node names survive
    assert [i.name for i in folded.graph.input] == ["images"] and [o.name for o in folded.graph.output] == ["logits"]
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    original_names = {n.name for n in original.graph.node if n.op_type != "BatchNormalization"}
    assert {n.name for n in folded.graph.node} == original_names
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert ABSORBED_PREFIX in conv.doc_string and report.records[0].batchnorm in conv.doc_string
    # BN's four parameter tensors are gone, nothing unused is left behind
    used = {name for node in folded.graph.node for name in node.input}
    assert all(t.name in used for t in folded.graph.initializer)
    assert len(folded.graph.initializer) == len(original.graph.initializer) - 4
    # checked independently: ORT with graph optimisations off, batch of 5
    x = seeded_input((5, *input_shape(original)[1:]), seed=7)
    a = onnxruntime_runner(onnx_bytes(original))(x)
    b = onnxruntime_runner(onnx_bytes(folded))(x)
    assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(a).max()


def test_fold_accepts_a_path_and_reports_bad_files(tiny_run, tmp_path):
    _, report = fold_onnx(tiny_run / "model.onnx", check=False)
    assert report.parity is None and len(report.folded) == 1
    with pytest.raises(BnexportError, match="file not found"):
        fold_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot protobuf" * 10)
    with pytest.raises(BnexportError, match="junk.onnx: not a readable ONNX model"):
        fold_onnx(junk)


def test_conv_feeding_two_nodes_is_kept():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")]
    for name, value in [("g", rng.random(4) + 0.5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5)]:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn"),
         helper.make_node("Add", ["y", "z"], ["out"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded, report = fold_onnx(model)
    assert report.records[0].status == "kept" and "feeds more than the BN" in report.records[0].reason
    assert op_counts(folded)["BatchNormalization"] == 1
