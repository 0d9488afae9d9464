"""The exported files of a run, loaded back by their own runtimes and compared with the eager model
of the run's checkpoint (see exported.py for the loaders)."""

import functools
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bnexport.config import INPUT_NAME, OUTPUT_NAME
from bnexport.export.writers import STACK_TRACE, to_onnx
from bnexport.fold.onnx_names import NAME_SCOPES
from bnexport.train.loop import load_checkpoint, model_from_checkpoint
from exported import load_export, max_error_in_scale, onnx_batchnorms, ort_session, uniform_batch

# file: BatchNorm layers it must still hold (SimpleCNN has one; the folded files none)
EXPORTS = {"model.ts": 1, "model.folded.ts": 0, "model.pt2": 1, "model.onnx": 1, "model.folded.onnx": 0}
# folding and another runtime reorder float32 sums: a few units of rounding (measured: under 3e-7)
ROUNDING = 1e-5

load = functools.cache(load_export)


@functools.cache
def eager(checkpoint) -> nn.Module:
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    return model.eval()


@pytest.mark.parametrize("name", list(EXPORTS))
def test_each_export_holds_its_batchnorms(tiny_run, name):
    count, _ = load(tiny_run / name)
    assert count == EXPORTS[name]
    model = eager(tiny_run / "checkpoint.pt")
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 1  # what "kept" means


@pytest.mark.parametrize("name", list(EXPORTS))
@pytest.mark.parametrize("size", [1, 5])
def test_each_export_computes_what_eager_computes(tiny_run, name, size):
    """Any batch size (the batch axis is dynamic), the same logits as the eager model."""
    _, run = load(tiny_run / name)
    x = uniform_batch((size, 1, 28, 28), seed=size)
    with torch.no_grad():
        expected = eager(tiny_run / "checkpoint.pt")(torch.from_numpy(x)).numpy()
    got = run(x)
    assert got.shape == expected.shape == (size, 10)
    assert max_error_in_scale(expected, got) <= ROUNDING
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_model_onnx_interface(tiny_run):
    for name in ("model.onnx", "model.folded.onnx"):
        model = onnx.load(str(tiny_run / name))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [INPUT_NAME]
        assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert [node.op_type for node in model.graph.node].count("Conv") == 1


def test_exported_program_keeps_input_name(tiny_run):
    program = torch.export.load(str(tiny_run / "model.pt2"))
    assert list(program.graph_signature.user_inputs) == [INPUT_NAME]


def test_onnx_export_keeps_every_batchnorm():
    """bnexport's exporter settings leave each BN as its own node; the fold is bnexport's job, not the exporter's.

    Both torch exporters fold BN by default, and silently: with optimize=True the dynamo exporter
    leaves none of these two, and the TorchScript exporter's eval-mode constant folding takes the
    one after the conv.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.BatchNorm1d(5)).eval()
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    exported = to_onnx(model, torch.zeros(2, 1, 8, 8))
    assert onnx_batchnorms(exported) == 2
    x = uniform_batch((3, 1, 8, 8), seed=0)
    session = ort_session(exported.SerializeToString())
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert max_error_in_scale(expected, got) <= ROUNDING
    assert np.isfinite(got).all()


def test_onnx_export_drops_stack_traces_and_keeps_module_scopes():
    """The dynamo exporter stores each node's Python stack, which holds the absolute source paths of
    the machine that exported; ``to_onnx`` drops it and keeps the scopes that name each module."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    example = torch.zeros(1, 1, 6, 6)
    torch_sources = os.path.dirname(torch.__file__).encode()

    def keys(exported: onnx.ModelProto) -> set[str]:
        return {prop.key for node in exported.graph.node for prop in node.metadata_props}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = torch.onnx.export(model, (example,), dynamo=True, optimize=False, verbose=False).model_proto
    assert STACK_TRACE in keys(raw) and torch_sources in raw.SerializeToString()  # what there is to drop
    exported = to_onnx(model, example)
    assert STACK_TRACE not in keys(exported) and NAME_SCOPES in keys(exported)
    assert torch_sources not in exported.SerializeToString()


class StarArgsNet(nn.Module):
    """forward(*images): torch.export takes the example as one tuple for the one *args parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, *images):
        return self.bn(self.conv(images[0]))


def test_a_forward_of_star_args_is_exported_with_a_dynamic_batch(tmp_path):
    from bnexport.export.writers import export_program

    model = StarArgsNet().eval()
    export_program(model, (torch.randn(2, 3, 5, 5),), tmp_path / "model.pt2")
    program = torch.export.load(str(tmp_path / "model.pt2"))
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    assert onnx_batchnorms(to_onnx(model, (torch.randn(2, 3, 5, 5),), input_names=["input"])) == 1


def test_a_model_torch_export_refuses_leaves_no_torch_log_on_stderr(tmp_path, capfd):
    """torch's symbolic shapes log prints the traced graph, dozens of lines, before the exception
    that bnexport turns into one line."""
    import user_models
    from bnexport.export.writers import export_program

    with pytest.raises(Exception, match="data-dependent"):
        export_program(user_models.make_data_dependent().eval(), (torch.randn(2, 3, 6, 6),), tmp_path / "model.pt2")
    captured = capfd.readouterr()
    assert "def forward" not in captured.err + captured.out
    assert "Unable to find user code" not in captured.err
