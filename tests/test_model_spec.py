"""What `bnexport export` does with a spec, weights or an input shape it cannot use: one line
naming the spec, the file or the flag and the cause, exit status 2, and nothing written
(``bnexport.model_spec``; the exporter's own failure is in test_pipeline_export.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import user_models
from conftest import assert_one_line_error, folder_state, run_cli

USER_MODELS = Path(user_models.__file__)
RESIDUAL = f"{USER_MODELS}:make_residual"
TWO_INPUTS = f"{USER_MODELS}:make_two_inputs"


class Pickled:
    """An object torch.save pickles whole, which torch.load(weights_only=True) must refuse."""


def residual_state(**changes) -> dict[str, torch.Tensor]:
    state = user_models.make_residual().state_dict()
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def saved(payload) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "weights.pt"
        torch.save(payload() if callable(payload) else payload, path)
        return path
    return write


@dataclass(frozen=True)
class Bad:
    args: tuple  # after `export`; WEIGHTS stands for the file ``weights`` writes
    fragments: tuple[str, ...]  # what the one line must say
    weights: Callable[[Path], Path] | None = None


WEIGHTS = object()
RESIDUAL_SHAPE = ("--input-shape", "1,3,8,8")

BAD = {
    "unknown torchvision model": Bad(("torchvision:resnet5", "--input-shape", "1,3,32,32"),
                                     ("torchvision:resnet5", "has no model 'resnet5'", "did you mean resnet50")),
    "unknown prefix": Bad(("nosuch:thing",), ("nosuch:thing", "no module named 'nosuch'")),
    "neither a file nor a spec": Bad(("notafile.onnx",), ("notafile.onnx", "no such file", "torchvision:NAME")),
    "module that does not exist": Bad(("no_such_pkg.mod:make",),
                                      ("no_such_pkg.mod:make", "no module named 'no_such_pkg'")),
    "file that does not exist": Bad(("missing.py:make",), ("missing.py:make", "missing.py not found")),
    "callable that raises": Bad((f"{USER_MODELS}:make_raising",),
                                ("make_raising() raised ValueError: no config for this model",)),
    "callable that returns no module": Bad((f"{USER_MODELS}:make_not_a_module",),
                                           ("make_not_a_module() returned dict, not a torch.nn.Module",)),
    "model in half precision": Bad((f"{USER_MODELS}:make_half", *RESIDUAL_SHAPE),
                                   ("make_half", "torch.float16", "float32", ".float()")),
    "callable not in the file": Bad((f"{USER_MODELS}:make_nothing",),
                                    ("has no 'make_nothing'", "it defines", "ResidualNet")),
    "weights with missing and unexpected keys": Bad(
        (RESIDUAL, "--weights", WEIGHTS, *RESIDUAL_SHAPE),
        ("--weights", "does not fit", "missing keys (1): fc.weight", "unexpected keys (1): extra.weight"),
        saved(lambda: residual_state(**{"fc.weight": None, "extra.weight": torch.zeros(1)}))),
    "weights of another shape": Bad(
        (RESIDUAL, "--weights", WEIGHTS, *RESIDUAL_SHAPE),
        ("--weights", "shapes differ, file vs model (1): fc.weight [3, 3] vs [12, 8]"),
        saved(lambda: residual_state(**{"fc.weight": torch.zeros(3, 3)}))),
    "weights that are no state dict": Bad((RESIDUAL, "--weights", WEIGHTS, *RESIDUAL_SHAPE),
                                          ("--weights", "holds no state dict"), saved([1, 2, 3])),
    "weights that are a pickled object": Bad((RESIDUAL, "--weights", WEIGHTS, *RESIDUAL_SHAPE),
                                             ("--weights", "weights_only=True", "Unsupported global", "Pickled"),
                                             saved(Pickled)),
    "weights file that does not exist": Bad((RESIDUAL, "--weights", "no_such_weights.pt", *RESIDUAL_SHAPE),
                                            ("--weights no_such_weights.pt: file not found",)),
    "input the first conv rejects": Bad((RESIDUAL, "--input-shape", "1,1,8,8"),
                                        ("--input-shape images=1,1,8,8", "rejects it at stem (Conv2d)", "3 channels")),
    "input torchvision's conv1 rejects": Bad(("torchvision:resnet18", "--input-shape", "1,1,32,32"),
                                             ("--input-shape x=1,1,32,32", "rejects it at conv1 (Conv2d)")),
    "input a Linear rejects": Bad((TWO_INPUTS, "--input-shape", "image=1,3,8,8", "--input-shape", "features=1,3"),
                                  ("--input-shape image=1,3,8,8 features=1,3", "rejects it at vector (Linear)")),
    "no input shape for torchvision": Bad(("torchvision:resnet18",),
                                          ("--input-shape", "torchvision:resnet18 does not say what it takes")),
    "no input shape for two inputs": Bad((TWO_INPUTS,), ("--input-shape", "takes 2 inputs (image, features)")),
    "input shape of an unknown input": Bad((RESIDUAL, "--input-shape", "pixels=1,3,8,8"),
                                           ("--input-shape pixels=", "has no input 'pixels'", "its inputs are images")),
    "input shapes of an unknown input": Bad(
        (TWO_INPUTS, "--input-shape", "image=1,3,8,8", "--input-shape", "feats=1,7"),
        ("--input-shape feats=", "has no input 'feats'", "its inputs are image, features")),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new out", "existing out"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, existing):
    bad = BAD[case]
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    weights = bad.weights(inputs) if bad.weights else None
    out = work / "runs" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"an older run's file")
    before = folder_state(work)
    args = [weights if arg is WEIGHTS else arg for arg in bad.args]
    result = run_cli("export", *args, "--out", out, "--quiet", "--no-bench")
    assert_one_line_error(result, *bad.fragments)
    assert folder_state(work) == before


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


@pytest.mark.parametrize("wrap", [
    lambda s: prefixed(s, "module."),  # DistributedDataParallel, DataParallel
    lambda s: prefixed(s, "_orig_mod."),  # torch.compile
    lambda s: prefixed(s, "module._orig_mod."),  # DDP around a compiled model
    lambda s: {"epoch": 3, "optimizer": {"lr": 0.1}, "arch": "residual",  # a training script's checkpoint
               "state_dict": prefixed({k: v for k, v in s.items() if not k.endswith("num_batches_tracked")}, "module.")},
], ids=["ddp", "compile", "ddp of compile", "checkpoint dict"])
def test_weights_of_a_wrapped_model_fill_every_tensor(tmp_path, wrap):
    from bnexport.model_spec import load_model

    source = user_models.randomise_batchnorm(user_models.make_residual(), seed=4)
    torch.save(wrap(source.state_dict()), tmp_path / "weights.pt")
    loaded = load_model(RESIDUAL, weights=tmp_path / "weights.pt", seed=99)
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.module.state_dict()[key], value), key


def test_a_module_spec_is_found_in_the_folder_the_command_runs_in(tmp_path, monkeypatch):
    """The `bnexport` script, unlike `python -m bnexport`, does not put the current folder on sys.path."""
    from bnexport.model_spec import load_model

    (tmp_path / "project_models_of_the_user").mkdir()
    (tmp_path / "project_models_of_the_user" / "__init__.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    loaded = load_model("project_models_of_the_user:make")
    assert [type(m).__name__ for m in loaded.module] == ["Conv2d", "BatchNorm2d"]
