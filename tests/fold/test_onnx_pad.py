"""BN → Pad → Conv in ONNX: reflect, edge and wrap padding copy normalised values, so the BN folds
into the Conv; constant padding, pads on the batch or channel axis and shared tensors keep it.

The oracle is ONNX Runtime with graph optimisations off, on the original and the folded model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper
from torch import nn

from bnexport.fold import fold_onnx
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from fold.models import EXPORTERS, bn_initializers, bn_node, count_bn_nodes, onnx_model, ort_run, randomize_bn, relative_error

CHANNELS, SIZE = 3, 6


def pad_conv_model(mode: str, pads: list[int], *, opset: int = 18, form: str = "input", axes: list[int] | None = None,
                   channels: int = CHANNELS, conv_pads: int = 0, extra_reader: str | None = None, seed: int = 0):
    """x → BN → Pad(mode, pads) → Conv 3×3; ``form`` "attribute" writes Pad-2's attributes, "input" Pad-11+'s inputs."""
    rng = np.random.default_rng(seed)
    full = pads if axes is None else _full_pads(pads, axes)
    inits = bn_initializers("bn", channels, rng)
    read = channels + full[1] + full[5]  # the conv reads the channels a Pad on axis 1 adds
    weight = (rng.standard_normal((4, read, 3, 3)) / np.sqrt(9 * read)).astype(np.float32)
    inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    if form == "attribute":
        pad = helper.make_node("Pad", ["t"], ["p"], name="pad", mode=mode, pads=pads)
    else:
        inits.append(numpy_helper.from_array(np.array(pads, np.int64), "pads"))
        pad_inputs = ["t", "pads"]
        if axes is not None:
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
            pad_inputs += ["", "axes"]
        pad = helper.make_node("Pad", pad_inputs, ["p"], name="pad", mode=mode)
    padded = [SIZE + full[i] + full[i + 4] for i in (2, 3)]
    out = [2 + full[0] + full[4], 4, *(d + 2 * conv_pads - 2 for d in padded)]
    nodes = [bn_node("bn", "x", "t"), pad,
             helper.make_node("Conv", ["p", "w", "b"], ["c"], name="conv", pads=[conv_pads] * 4)]
    if extra_reader is None:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    else:  # a second reader of the BN's or the Pad's output: the sum stays in the graph's output
        nodes += [helper.make_node("ReduceSum", [extra_reader], ["r"], keepdims=0),
                  helper.make_node("ReduceSum", ["r"], ["s"], keepdims=1),
                  helper.make_node("Add", ["c", "s"], ["y"])]
    return onnx_model(nodes, [2, channels, SIZE, SIZE], out, inits, opset=opset)


def _full_pads(pads: list[int], axes: list[int]) -> list[int]:
    full = [0] * 8
    for k, axis in enumerate(axes):
        full[axis % 4], full[axis % 4 + 4] = pads[k], pads[k + len(axes)]
    return full


def assert_folds_exactly(original: onnx.ModelProto) -> None:
    folded, report = fold_onnx(original, check=False)
    assert [(r.status, r.folded_into, r.position, r.through) for r in report.records] == [("folded", "conv", "before", "Pad")]
    assert "conv (BN before it, through Pad)" in report.table()
    assert count_bn_nodes(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    pad = next(n for n in folded.graph.node if n.op_type == "Pad")
    assert pad.input[0] == "x"  # the Pad reads the BN's input now
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert f"{ABSORBED_PREFIX} 'bn'" in conv.doc_string
    x = np.random.default_rng(7).standard_normal((2, CHANNELS, SIZE, SIZE)).astype(np.float32) * 3
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5


def kept_code(original: onnx.ModelProto) -> str:
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1 and len(report.kept) == 1
    assert report.kept[0].reason
    return report.kept[0].reason_code


@pytest.mark.parametrize("mode", ["reflect", "edge"])
@pytest.mark.parametrize("opset, form, axes", [(10, "attribute", None), (11, "input", None), (18, "input", None),
                                                (18, "input", [2, -1])], ids=["pad2", "pad11", "pad18", "pad18-axes"])
def test_reflect_and_edge_pads_fold(mode, opset, form, axes):
    pads = [1, 2, 2, 0] if axes else [0, 0, 1, 2, 0, 0, 2, 0]
    assert_folds_exactly(pad_conv_model(mode, pads, opset=opset, form=form, axes=axes))


def test_wrap_pad_folds():
    assert_folds_exactly(pad_conv_model("wrap", [0, 0, 2, 1, 0, 0, 1, 2], opset=19))


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_constant_pad_is_kept_as_zero_padding(value):
    model = pad_conv_model("constant", [0, 0, 1, 1, 0, 0, 1, 1])
    model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    pad.input.append("value")
    assert kept_code(model) == "zero_padding"


def test_reflect_pad_before_a_zero_padded_conv_is_kept():
    assert kept_code(pad_conv_model("reflect", [0, 0, 1, 1, 0, 0, 1, 1], conv_pads=1)) == "zero_padding"


@pytest.mark.parametrize("pads", [[0, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], ids=["channel", "batch"])
def test_pads_on_the_batch_or_channel_axis_are_kept(pads):
    assert kept_code(pad_conv_model("edge", pads)) == "shape_mismatch"


@pytest.mark.parametrize("reader", ["t", "p"], ids=["bn-output", "pad-output"])
def test_a_second_reader_keeps_the_bn(reader):
    assert kept_code(pad_conv_model("reflect", [0, 0, 1, 1, 0, 0, 1, 1], extra_reader=reader)) == "multiple_consumers"


def test_pad_amounts_computed_from_a_graph_input_are_kept():
    model = pad_conv_model("reflect", [0, 0, 1, 1, 0, 0, 1, 1])
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    pad.input[1] = "amounts"
    model.graph.node.insert(0, helper.make_node("Cast", ["x_amounts"], ["amounts"], to=onnx.TensorProto.INT64))
    model.graph.input.append(helper.make_tensor_value_info("x_amounts", onnx.TensorProto.INT64, [8]))
    assert kept_code(model) == "not_constant"


class BnPadConv(nn.Module):
    def __init__(self, pad: nn.Module):
        super().__init__()
        self.bn, self.pad, self.conv = nn.BatchNorm2d(3), pad, nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.pad(self.bn(x)))


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d((1, 2, 0, 1)), nn.ReplicationPad2d(1)], ids=["reflect", "replicate"])
@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_exported_bn_pad_conv_folds(exporter, pad):
    model = randomize_bn(BnPadConv(pad))
    original = EXPORTERS[exporter](model, torch.zeros(1, 3, 8, 8))
    assert count_bn_nodes(original) == 1
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0 and report.records[0].position == "before"
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32) * 3
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    with torch.no_grad():
        assert relative_error(model(torch.from_numpy(x)).numpy(), ort_run(folded, x)) < 1e-5


@settings(max_examples=25)
@given(mode=st.sampled_from(["reflect", "edge", "wrap"]), channels=st.integers(1, 5),
       spatial=st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_any_spatial_pad_folds(mode, channels, spatial):
    top, left, bottom, right = spatial
    original = pad_conv_model(mode, [0, 0, top, left, 0, 0, bottom, right], opset=19, channels=channels)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    x = np.random.default_rng(5).standard_normal((2, channels, SIZE, SIZE)).astype(np.float32) * 3
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
