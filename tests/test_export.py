import onnx
import pytest
import torch

from bnexport.config import INPUT_NAME, OUTPUT_NAME
from bnexport.export.writers import ONNX_EXPORT_OPTIONS, op_counts
from bnexport.parity.compare import seeded_input
from bnexport.parity.runners import exported_program_runner, onnxruntime_runner, torchscript_runner


def test_model_onnx_keeps_one_batchnorm_per_layer(tiny_run):
    kept = onnx.load(str(tiny_run / "model.onnx"))
    folded = onnx.load(str(tiny_run / "model.folded.onnx"))
    assert op_counts(kept)["BatchNormalization"] == 1
    assert op_counts(kept)["Conv"] == 1
    assert "BatchNormalization" not in op_counts(folded)
    for model in (kept, folded):
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [INPUT_NAME]
        assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_exporter_flags_are_the_ones_that_keep_batchnorm():
    assert ONNX_EXPORT_OPTIONS["dynamo"] is True and ONNX_EXPORT_OPTIONS["optimize"] is False


@pytest.mark.parametrize("name", ["model.ts", "model.folded.ts", "model.pt2", "model.onnx", "model.folded.onnx"])
@pytest.mark.parametrize("batch", [1, 5])
def test_every_export_has_a_dynamic_batch_axis(tiny_run, name, batch):
    runner = (torchscript_runner if name.endswith(".ts") else
              exported_program_runner if name.endswith(".pt2") else onnxruntime_runner)(tiny_run / name)
    out = runner(seeded_input((batch, 1, 28, 28), seed=batch))
    assert out.shape == (batch, 10)


def test_torchscript_folded_has_no_batchnorm(tiny_run):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = torch.jit.load(str(tiny_run / "model.ts"))
        folded = torch.jit.load(str(tiny_run / "model.folded.ts"))
    assert "batch_norm" in str(kept.inlined_graph)
    assert "batch_norm" not in str(folded.inlined_graph)


def test_exported_program_keeps_input_name(tiny_run):
    program = torch.export.load(str(tiny_run / "model.pt2"))
    assert program.graph_signature.user_inputs == [INPUT_NAME] or tuple(program.graph_signature.user_inputs) == (INPUT_NAME,)
