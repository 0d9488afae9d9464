import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from bnexport.errors import BnexportError, CheckFailed
from bnexport.export.writers import onnx_bytes, op_counts, save_onnx
from bnexport.fold import fold_onnx, load_onnx, model_input_shape, onnx_patterns
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from bnexport.parity.compare import seeded_input
from bnexport.parity.runners import onnxruntime_runner
from fold.models import (EVERYTHING_INPUT, EXPORTERS, Everything, bn_initializers, bn_node, count_bn_nodes, onnx_model,
                         ort_run, randomize_bn, relative_error)


def assert_clean(folded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Valid, same interface and opset, nothing unused left, node names kept."""
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    used = {name for node in folded.graph.node for name in node.input}
    assert all(t.name in used for t in folded.graph.initializer)
    assert {n.name for n in folded.graph.node} <= {n.name for n in original.graph.node}


def test_simplecnn_onnx_folds_exactly(tiny_run):
    original = onnx.load(str(tiny_run / "model.onnx"))
    original.metadata_props.add(key="owner", value="vision team")
    before = onnx.ModelProto()
    before.CopyFrom(original)
    folded, report = fold_onnx(original)
    assert original == before  # the input model is untouched
    assert op_counts(original)["BatchNormalization"] == 1
    assert "BatchNormalization" not in op_counts(folded)
    assert report.to_json()["folded"] == 1 and report.parity.passed
    assert_clean(folded, original)
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [(p.key, p.value) for p in folded.metadata_props] == [("owner", "vision team")]
    assert (folded.ir_version, folded.producer_name) == (original.ir_version, original.producer_name)
    original_names = {n.name for n in original.graph.node if n.op_type != "BatchNormalization"}
    assert {n.name for n in folded.graph.node} == original_names
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert ABSORBED_PREFIX in conv.doc_string and report.records[0].batchnorm in conv.doc_string
    # BN's four parameter tensors are gone, nothing unused is left behind
    assert len(folded.graph.initializer) == len(original.graph.initializer) - 4
    # checked independently: ORT with graph optimisations off, batch of 5
    x = seeded_input((5, *model_input_shape(original)[1:]), seed=7)
    a = onnxruntime_runner(onnx_bytes(original))(x)
    b = onnxruntime_runner(onnx_bytes(folded))(x)
    assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(a).max()


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_every_pattern_from_both_exporters(exporter):
    model = randomize_bn(Everything())
    original = EXPORTERS[exporter](model, torch.zeros(EVERYTHING_INPUT))
    assert count_bn_nodes(original) == 7
    folded, report = fold_onnx(original)
    statuses = [(r.status, r.position) for r in report.records]
    assert statuses == [("folded", "before"), ("folded", "after"), ("folded", "after"), ("kept", None), ("kept", None),
                        ("folded", "after"), ("folded", "after")]
    # bn_relu precedes a zero-padded conv; bn_batch has no running statistics, which the dynamo exporter
    # writes as statistics computed in the graph and the TorchScript exporter as training_mode=1
    batch_statistics = {"dynamo": ("not_constant", "not a constant"), "torchscript": ("training_mode", "training_mode=1")}
    code, words = batch_statistics[exporter]
    assert [r.reason_code for r in report.records[3:5]] == ["zero_padding", code]
    assert "zero padding" in report.records[3].reason and words in report.records[4].reason
    assert count_bn_nodes(folded) == 2
    assert_clean(folded, original)
    # the dynamo exporter's Shape/Expand/CastLike zero bias is gone with the BN it served
    assert "Expand" not in op_counts(folded) and "CastLike" not in op_counts(folded)
    layers = {n.name: n for n in folded.graph.node}
    for record in report.folded:
        assert f"'{record.batchnorm}'" in layers[record.folded_into].doc_string
    x = seeded_input(EVERYTHING_INPUT, seed=3) * 3
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    with torch.no_grad():  # and against the torch module itself
        assert relative_error(model(torch.from_numpy(x)).numpy(), ort_run(folded, x)) < 1e-5


def _gemm_graph(trans_b: int, *, bn_first: bool, alpha=0.7, beta=1.3, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "c")]
    channels = 4 if bn_first else 5
    inits += bn_initializers("bn", channels, rng)
    gemm_in, gemm_out = ("t", "y") if bn_first else ("x", "t")
    nodes = [helper.make_node("Gemm", [gemm_in, "w", "c"], [gemm_out], name="gemm", transB=trans_b, alpha=alpha, beta=beta)]
    bn = bn_node("bn", "x", "t") if bn_first else bn_node("bn", "t", "y")
    nodes = [bn, *nodes] if bn_first else [*nodes, bn]
    return onnx_model(nodes, [3, 4], [3, 5], inits)


@pytest.mark.parametrize("bn_first", [False, True], ids=["gemm-bn", "bn-gemm"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_either_trans_b_alpha_and_beta(trans_b, bn_first):
    original = _gemm_graph(trans_b, bn_first=bn_first)
    folded, report = fold_onnx(original)
    assert report.records[0].status == "folded" and report.records[0].folded_into == "gemm"
    assert report.records[0].position == ("before" if bn_first else "after")
    assert op_counts(folded) == {"Gemm": 1}
    x = seeded_input((3, 4), seed=1)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-6


def _matmul_graph(*, bn_first: bool, rank: int = 2, seed=0):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias")]
    shape_in = [3, 4] if rank == 2 else [3, 4, 4]
    shape_out = [3, 6] if rank == 2 else [3, 4, 6]
    inits += bn_initializers("bn", 4 if bn_first or rank == 3 else 6, rng)
    if bn_first:
        nodes = [bn_node("bn", "x", "t"), helper.make_node("MatMul", ["t", "w"], ["m"], name="matmul"),
                 helper.make_node("Add", ["m", "bias"], ["y"], name="add")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
                 helper.make_node("Add", ["bias", "m"], ["t"], name="add"), bn_node("bn", "t", "y")]
    return onnx_model(nodes, shape_in, shape_out, inits)


@pytest.mark.parametrize("bn_first", [False, True], ids=["matmul-add-bn", "bn-matmul-add"])
def test_matmul_add(bn_first):
    original = _matmul_graph(bn_first=bn_first)
    folded, report = fold_onnx(original)
    assert report.records[0].status == "folded" and report.records[0].folded_into in ("matmul", "add")
    assert op_counts(folded) == {"MatMul": 1, "Add": 1}
    x = seeded_input((3, 4), seed=2)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-6


def test_bn_on_3d_matmul_output_is_kept():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"), *bn_initializers("bn", 4, rng)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "bias"], ["t"], name="add"), bn_node("bn", "t", "y")]
    original = onnx_model(nodes, [2, 4, 4], [2, 4, 4], inits)
    folded, report = fold_onnx(original)
    assert report.records[0].status == "kept" and "not 2-D" in report.records[0].reason
    assert report.records[0].reason_code == "shape_mismatch"
    assert folded == original  # nothing to fold, so nothing rewritten


def _two_convs_one_weight(seed=0):
    """Two Conv nodes read the same weight initializer; each is followed by its own BN."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w"),
             *bn_initializers("bn_a", 3, rng), *bn_initializers("bn_b", 3, rng)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv_a", pads=[1, 1, 1, 1]),
             bn_node("bn_a", "c1", "a"),
             helper.make_node("Conv", ["a", "w"], ["c2"], name="conv_b", pads=[1, 1, 1, 1]),
             bn_node("bn_b", "c2", "y")]
    return onnx_model(nodes, [1, 3, 6, 6], [1, 3, 6, 6], inits)


def test_shared_weight_initializer_gets_one_copy_per_site():
    original = _two_convs_one_weight()
    folded, report = fold_onnx(original)
    assert [r.folded_into for r in report.records] == ["conv_a", "conv_b"]
    weights = [n.input[1] for n in folded.graph.node]
    assert len(set(weights)) == 2 and "w" in weights  # one copy, and the original name reused by the last reader
    x = seeded_input((1, 3, 6, 6), seed=4)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5


def test_non_constant_bn_parameters_are_kept():
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w"),
             *[t for t in bn_initializers("bn", 3, rng) if t.name != "bn_g"]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3]),
                                           helper.make_tensor_value_info("bn_g", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded, report = fold_onnx(model, check=False)
    assert report.records[0].status == "kept" and "scale not a constant" in report.records[0].reason
    assert count_bn_nodes(folded) == 1


def test_conv_feeding_two_nodes_is_kept():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"), *bn_initializers("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("bn", "c", "z"),
             helper.make_node("Add", ["c", "z"], ["y"], name="add")]
    folded, report = fold_onnx(onnx_model(nodes, [1, 2, 5, 5], [1, 4, 5, 5], inits))
    assert report.records[0].status == "kept" and "feeds more than the BN" in report.records[0].reason
    assert op_counts(folded)["BatchNormalization"] == 1


@pytest.mark.parametrize("var, eps, cause", [(-1.0, 1e-5, "negative"), (np.nan, 1e-5, "NaN"), (0.0, 0.0, "zero with eps=0")])
def test_invalid_statistics_name_the_bn(var, eps, cause):
    rng = np.random.default_rng(0)
    variance = rng.random(4) + 0.5
    variance[2] = var
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w"),
             *bn_initializers("bad_bn", 4, rng, var=variance)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bad_bn", "c", "y", epsilon=eps)]
    with pytest.raises(BnexportError, match=f"BatchNormalization 'bad_bn': running variance has 1 {cause}"):
        fold_onnx(onnx_model(nodes, [1, 2, 3, 3], [1, 4, 3, 3], inits))


def test_model_without_bn_folds_to_itself():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = onnx_model(nodes, [1, 2, 3, 3], [1, 4, 3, 3],
                       [numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w")])
    folded, report = fold_onnx(model)
    assert folded == model and report.records == [] and report.parity is None


def test_external_data_round_trip(tiny_run, tmp_path):
    original = onnx.load(str(tiny_run / "model.onnx"))
    path = tmp_path / "ext.onnx"
    save_onnx(original, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 100_000  # the Linear's weight lives there
    folded, report = fold_onnx(path)
    assert len(report.folded) == 1 and report.parity.passed
    save_onnx(folded, tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size > 100_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert op_counts(onnx.load(str(tmp_path / "out.onnx"))) == op_counts(folded)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(BnexportError, match="ext.onnx: external data missing"):
        load_onnx(path)


def test_fold_accepts_a_path_and_reports_bad_files(tiny_run, tmp_path):
    _, report = fold_onnx(tiny_run / "model.onnx", check=False)
    assert report.parity is None and len(report.folded) == 1
    with pytest.raises(BnexportError, match="file not found"):
        fold_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot protobuf" * 10)
    with pytest.raises(BnexportError, match="junk.onnx: not"):
        fold_onnx(junk)
    truncated = tmp_path / "truncated.onnx"
    data = (tiny_run / "model.onnx").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BnexportError, match="truncated.onnx: not"):
        fold_onnx(truncated)


def test_a_wrong_fold_is_caught_and_the_node_named(monkeypatch):
    real = onnx_patterns.fold_into_transposed_conv

    def broken(weight, bias, scale, shift, *, groups=1):
        folded_weight, folded_bias = real(weight, bias, scale, shift, groups=groups)
        return folded_weight * 1.01, folded_bias

    monkeypatch.setattr(onnx_patterns, "fold_into_transposed_conv", broken)
    original = EXPORTERS["torchscript"](randomize_bn(Everything()), torch.zeros(EVERYTHING_INPUT))
    with pytest.raises(CheckFailed, match="first diverging layer: /up/ConvTranspose") as caught:
        fold_onnx(original)
    assert caught.value.report.divergence.layer == "/up/ConvTranspose"
