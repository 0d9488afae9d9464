"""`bnexport export` end to end (``pipeline.export_model``): each model goes through the real
command once, with a state dict of random BatchNorm statistics, and every file it writes is read
back by its own runtime and checked against the eager model, built here from the same factory and
weights. Nothing is taken from parity.json: the check input is fresh, at another batch size.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import user_models
from conftest import CommandResult, assert_one_line_error, folder_state, read_json, run_cli
from exported import load_export

USER_MODELS = Path(user_models.__file__)
KEPT_FILES = ("model.ts", "model.pt2", "model.onnx")
FOLDED_FILES = ("model.folded.ts", "model.folded.pt2", "model.folded.onnx")
EVERY_FILE = KEPT_FILES + FOLDED_FILES + ("fold.json", "parity.json", "parity_outputs.npz", "summary.json",
                                          "manifest.json", "report.html", "figures")
# parity's own input is seeded from 0 at the given batch; this one is neither
CHECK_SEED, CHECK_BATCH = 20260, 3
# a pass is max|Δ| <= ATOL + RTOL · max|eager|: float32 sums reordered by folding and by another runtime
ATOL, RTOL = 1e-5, 1e-4


def torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


@dataclass(frozen=True)
class Case:
    spec: str
    factory: Callable[[], nn.Module]  # builds the model as the spec does, for the eager oracle
    shape_args: tuple[str, ...]  # the --input-shape flags
    shapes: dict[str, tuple[int, ...]]  # forward's parameters, in order, and the shape each is given
    kept_after_fold: int  # BatchNorms the folds keep: in model.folded.*, and fold.json's kept, torch and ONNX


CASES = {
    # the bare form of --input-shape, for a one-input model; every BN follows a conv
    "torchvision": Case("torchvision:resnet18", torchvision_resnet18, ("--input-shape", "1,3,32,32"),
                        {"x": (1, 3, 32, 32)}, kept_after_fold=0),
    # a BatchNorm2d subclass, a residual add and Linear → BatchNorm1d: every BN follows a conv or a Linear
    "residual": Case(f"{USER_MODELS}:make_residual", user_models.make_residual, ("--input-shape", "images=1,3,12,12"),
                     {"images": (1, 3, 12, 12)}, kept_after_fold=0),
    # two inputs, each through its own conv/Linear → BN
    "two_inputs": Case(f"{USER_MODELS}:make_two_inputs", user_models.make_two_inputs,
                       ("--input-shape", "image=1,3,10,10", "--input-shape", "features=1,7"),
                       {"image": (1, 3, 10, 10), "features": (1, 7)}, kept_after_fold=0),
}


@dataclass
class Run:
    case: Case
    out: Path
    weights: Path
    model: nn.Module  # eager, from the factory and the weights file, independently of bnexport
    result: CommandResult


def command(case: Case, weights: Path, out: Path) -> list:
    return ["export", case.spec, "--weights", weights, *case.shape_args, "--out", out, "--quiet", "--no-bench"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[[str], Run]:
    """One `export` per model for the whole module, made when a test first asks for it (and
    kept when it fails, so that each test fails at once instead of exporting again)."""

    @functools.cache
    def run(name: str) -> Run:
        case = CASES[name]
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(7)
        weights = folder / "weights.pt"
        torch.save(user_models.randomise_batchnorm(case.factory(), seed=11).state_dict(), weights)
        model = case.factory()
        model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
        try:
            result = run_cli(*command(case, weights, folder / "out"))
        except Exception:  # what the command would print and exit with
            result = CommandResult(1, "", traceback.format_exc())
        return Run(case, folder / "out", weights, model.eval(), result)

    return run


@pytest.fixture(params=list(CASES))
def exported(request, runs) -> Run:
    run = runs(request.param)
    assert run.result.returncode == 0, run.result.stderr
    return run


def check_inputs(case: Case) -> tuple[np.ndarray, ...]:
    return tuple(np.random.default_rng(CHECK_SEED + i).standard_normal((CHECK_BATCH, *shape[1:]), dtype=np.float32)
                 for i, shape in enumerate(case.shapes.values()))


def eager_output(model: nn.Module, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    with torch.no_grad():
        return model(*map(torch.from_numpy, inputs)).numpy()


def batchnorm_calls(model: nn.Module, inputs: tuple[np.ndarray, ...]) -> int:
    """How many times a BatchNorm module runs in one forward: what the ONNX graph must show."""
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        eager_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


def batchnorm_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_file_is_written(exported):
    assert set(EVERY_FILE) <= {p.name for p in exported.out.iterdir()}
    figures = list((exported.out / "figures").iterdir())
    assert figures and all(f.stat().st_size > 0 for f in figures)
    # no temporary file inside, no staging folder beside it
    assert not [p for p in exported.out.rglob(".*")] and not list(exported.out.parent.glob(".*"))


@pytest.mark.parametrize("name", KEPT_FILES + FOLDED_FILES)
def test_each_file_computes_what_eager_computes(exported, name):
    """At batch 3 (the command traced at 2 and checked at 1: the batch axis must be dynamic)."""
    _, run = load_export(exported.out / name)
    inputs = check_inputs(exported.case)
    expected = eager_output(exported.model, inputs)
    got = run(*inputs)
    assert got.shape == expected.shape and got.shape[0] == CHECK_BATCH
    assert np.abs(expected).max() > 1e-2  # random BN statistics: the outputs are not near zero
    assert np.abs(got - expected).max() <= ATOL + RTOL * np.abs(expected).max()


@pytest.mark.parametrize("name", KEPT_FILES + FOLDED_FILES)
def test_each_file_holds_its_batchnorms(exported, name):
    """One BatchNorm per BN call with BatchNorm kept; in the folded files only what the fold keeps."""
    count, _ = load_export(exported.out / name)
    calls = batchnorm_calls(exported.model, check_inputs(exported.case))
    assert calls == len(batchnorm_modules(exported.model))  # no module of these models runs twice
    assert count == (calls if name in KEPT_FILES else exported.case.kept_after_fold)


def test_onnx_inputs_are_named_as_forward_names_them(exported):
    signature = list(inspect.signature(exported.model.forward).parameters)
    assert signature == list(exported.case.shapes)
    for name in ("model.onnx", "model.folded.onnx"):
        graph = onnx.load(str(exported.out / name)).graph
        assert [i.name for i in graph.input] == signature
        assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in graph.input)
        onnx.checker.check_model(onnx.load(str(exported.out / name)), full_check=True)


def test_manifest_lists_every_file_with_its_sha256(exported):
    listed = {entry["file"]: entry for entry in read_json(exported.out / "manifest.json")["files"]}
    on_disk = {p.relative_to(exported.out).as_posix() for p in exported.out.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"manifest.json"}
    for name, entry in listed.items():
        data = (exported.out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["bytes"] == len(data)


def test_summary_names_the_model_and_its_weights(exported):
    summary = read_json(exported.out / "summary.json")
    model = summary["model"]
    assert model["spec"] == exported.case.spec
    assert model["weights"] == str(exported.weights)
    assert model["random_weights"] is False
    assert model["inputs"] == list(exported.case.shapes)
    assert model["parameters"] == sum(p.numel() for p in exported.model.parameters())
    assert summary["inputs"] == {name: list(shape) for name, shape in exported.case.shapes.items()}
    assert summary["batchnorm_layers"] == len(batchnorm_modules(exported.model))
    assert summary["parity"] == "pass"


def test_fold_report_names_every_batchnorm(exported):
    """fold.json's ONNX records are model.onnx's BatchNormalization nodes (and, where recorded,
    their torch modules); its torch records are the model's BN modules."""
    fold = read_json(exported.out / "fold.json")
    graph = onnx.load(str(exported.out / "model.onnx")).graph
    nodes = [n.name for n in graph.node if n.op_type == "BatchNormalization"]
    records = fold["onnx"]["records"]
    assert sorted(r["batchnorm"] for r in records) == sorted(nodes)
    assert fold["onnx"]["kept"] == exported.case.kept_after_fold
    modules = batchnorm_modules(exported.model)
    assert sorted(r["module"] for r in records) == sorted(modules)
    layers = {name for name, m in exported.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(r["folded_into_module"] in layers for r in records if r["status"] == "folded")
    assert sorted(r["batchnorm"] for r in fold["torch"]["records"]) == sorted(modules)
    assert fold["torch"]["kept"] == exported.case.kept_after_fold


def test_same_command_twice_gives_the_same_files(runs, tmp_path):
    first = runs("residual")
    assert first.result.returncode == 0, first.result.stderr
    again = run_cli(*command(first.case, first.weights, tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    for name in ("model.onnx", "model.folded.onnx"):
        assert (tmp_path / "again" / name).read_bytes() == (first.out / name).read_bytes(), name
    for name in ("fold.json", "parity.json"):
        assert read_json(tmp_path / "again" / name) == read_json(first.out / name), name


def test_visualize_redraws_an_export_run_from_its_files(runs, tmp_path):
    """The model comes back from summary.json's spec, weights and seed, and the figure samples
    from the same seed: the redrawn report is the exported one, byte for byte."""
    first = runs("residual")
    assert first.result.returncode == 0, first.result.stderr
    copy = tmp_path / "run"
    shutil.copytree(first.out, copy)
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "figures")
    result = run_cli("visualize", "--out", copy)
    assert result.returncode == 0, result.stderr
    exported = (first.out / "report.html").read_text()
    assert str(first.out / "model.onnx") in exported and ".staging" not in exported

    def without_stage_seconds(page: str) -> list[str]:  # the exported page was drawn before its own stage ended
        return [line for line in page.splitlines() if "<th>stage</th>" not in line]

    redrawn = (copy / "report.html").read_text()
    assert without_stage_seconds(redrawn) == without_stage_seconds(exported.replace(str(first.out), str(copy)))
    assert sorted(p.name for p in (copy / "figures").iterdir()) == sorted(p.name for p in (first.out / "figures").iterdir())


def test_visualize_refuses_an_export_run_whose_weights_changed(runs, tmp_path):
    first = runs("residual")
    assert first.result.returncode == 0, first.result.stderr
    weights = tmp_path / "weights.pt"
    shutil.copy(first.weights, weights)
    copy = tmp_path / "run"
    shutil.copytree(first.out, copy)
    summary = read_json(copy / "summary.json")
    summary["model"]["weights"] = str(weights)
    (copy / "summary.json").write_text(json.dumps(summary))
    torch.save(user_models.randomise_batchnorm(user_models.make_residual(), seed=12).state_dict(), weights)
    before = folder_state(copy)
    assert_one_line_error(run_cli("visualize", "--out", copy), str(weights), "changed since")
    assert folder_state(copy) == before


# A model no ONNX exporter takes: the run ends with one line, and writes nothing -------------

@pytest.mark.parametrize("existing", [False, True], ids=["new out", "existing out"])
def test_a_model_no_exporter_takes_leaves_nothing(tmp_path, capfd, existing):
    """torch.linalg.eigvals runs in eager, TorchScript and torch.export, so the stage has written
    those files in its staging folder when both ONNX exporters refuse the op. --out's parent is
    new too: the run makes it for the staging folder, and must take it away again."""
    out = tmp_path / "runs" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"an older run's file")
    before = folder_state(tmp_path)
    result = run_cli("export", f"{USER_MODELS}:make_eigenvalues", "--input-shape", "1,3,4,4", "--out", out,
                     "--quiet", "--no-bench")
    assert_one_line_error(result, "make_eigenvalues", "dynamo exporter", "TorchScript exporter", "linalg_eig")
    assert "\x1b" not in result.stderr  # no terminal colour codes from the exporter's message
    assert "graph(" not in capfd.readouterr().out  # nor the TorchScript graph that torch's C++ log prints
    assert folder_state(tmp_path) == before  # no staging folder, no runs/ made for it, the older file untouched


def test_a_model_torch_export_refuses_is_exported_without_pt2(tmp_path):
    """A branch on the data: torch.export and the dynamo ONNX exporter refuse it, so the .pt2 files
    are skipped with a note (an older run's copies go too) and the TorchScript exporter writes the ONNX."""
    model = user_models.randomise_batchnorm(user_models.make_data_dependent(), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.pt2", "model.folded.pt2", "mine.txt"):
        (out / name).write_bytes(b"an older run's file")
    result = run_cli("export", f"{USER_MODELS}:make_data_dependent", "--weights", tmp_path / "weights.pt",
                     "--input-shape", "1,3,6,6", "--out", out, "--quiet", "--no-bench")
    assert result.returncode == 0, result.stderr
    assert not (out / "model.pt2").exists() and not (out / "model.folded.pt2").exists()
    assert (out / "mine.txt").read_bytes() == b"an older run's file"  # not a file of bnexport's
    notes = read_json(out / "summary.json")["notes"]
    assert any(n.startswith("model.pt2 and model.folded.pt2 not written: torch.export cannot export") for n in notes)
    assert any("the dynamo exporter failed, so the TorchScript exporter wrote it" in n for n in notes)
    listed = {entry["file"] for entry in read_json(out / "manifest.json")["files"]}
    assert {"model.onnx", "model.ts"} <= listed and not {"model.pt2", "model.folded.pt2"} & listed
    inputs = (np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, 6, 6), dtype=np.float32),)
    expected = eager_output(model, inputs)
    # the torch fold leaves a BN whose caller torch.fx cannot trace; the ONNX fold folds it into the conv
    for name, batchnorms in (("model.ts", 1), ("model.folded.ts", 1), ("model.onnx", 1), ("model.folded.onnx", 0)):
        count, run = load_export(out / name)
        assert count == batchnorms, name
        assert np.abs(run(*inputs) - expected).max() <= ATOL + RTOL * np.abs(expected).max(), name


# Real architectures, big graphs: slow ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("spec, shape", [("torchvision:densenet121", "1,3,64,64"), ("timm:efficientnet_b0", "1,3,64,64")])
def test_big_models_export_with_every_batchnorm_named_and_a_bounded_report(tmp_path, spec, shape):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    from bnexport.model_spec import load_model

    result = run_cli("export", spec, "--input-shape", shape, "--out", tmp_path, "--quiet", "--no-bench")
    assert result.returncode == 0, result.stderr
    model = load_model(spec).module  # the same seed: the same random weights
    modules = batchnorm_modules(model)
    fold = read_json(tmp_path / "fold.json")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == len(fold["onnx"]["records"]) >= len(modules)
    assert {r["module"] for r in fold["onnx"]["records"]} == set(modules)
    folded = onnx.load(str(tmp_path / "model.folded.onnx")).graph
    assert sum(n.op_type == "BatchNormalization" for n in folded.node) == fold["onnx"]["kept"]
    page = (tmp_path / "report.html").read_text()
    assert all(f">{name}<" in page for name in modules)  # one health row per BN module
    from PIL import Image

    with Image.open(tmp_path / "figures" / "graph_folding.png") as image:
        assert max(image.size) <= 4000, image.size
    inputs = (np.random.default_rng(5).standard_normal([2, *map(int, shape.split(",")[1:])]).astype(np.float32),)
    reference = eager_output(model.eval(), inputs)
    for name in ("model.folded.onnx", "model.folded.pt2"):
        _, run = load_export(tmp_path / name)
        got = run(*inputs)
        assert np.abs(got - reference).max() <= ATOL + RTOL * np.abs(reference).max(), name


def test_json_prints_what_the_files_hold(runs, tmp_path):
    first = runs("two_inputs")
    assert first.result.returncode == 0, first.result.stderr
    result = run_cli(*command(first.case, first.weights, tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["parity"] == read_json(tmp_path / "out" / "parity.json")
    assert printed["fold"] == read_json(tmp_path / "out" / "fold.json")["onnx"]
    written = read_json(tmp_path / "out" / "summary.json")
    assert printed["summary"]["model"] == written["model"] and printed["summary"]["inputs"] == written["inputs"]


def test_a_model_of_several_outputs_of_different_shapes_draws_each_against_its_own(tmp_path):
    """(logits, {"features": map}): parity compares output i with the reference's output i, and so
    must the parity figure, element by element."""
    model = user_models.randomise_batchnorm(user_models.make_nested_output(), seed=5).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "out"
    result = run_cli("export", f"{USER_MODELS}:make_nested_output", "--weights", tmp_path / "weights.pt",
                     "--input-shape", "1,3,6,6", "--out", out, "--quiet", "--no-bench")
    assert result.returncode == 0, result.stderr
    inputs = (np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, 6, 6), dtype=np.float32),)
    with torch.no_grad():
        logits, nested = model(torch.from_numpy(inputs[0]))
    session = __import__("onnxruntime").InferenceSession(str(out / "model.folded.onnx"),
                                                         providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs[0]})
    for expected, value in zip((logits.numpy(), nested["features"].numpy()), got):
        assert value.shape == expected.shape
        assert np.abs(value - expected).max() <= ATOL + RTOL * np.abs(expected).max()
    names = [r["name"] for r in read_json(out / "parity.json")["results"]]
    assert any(n.endswith("[output 1]") for n in names)
    assert set(names) <= set(np.load(out / "parity_outputs.npz").files)  # each one in the parity figure


@pytest.mark.parametrize("file_name", ["model (1).py", "my-model.py", "net&<b>.py"])
def test_a_model_file_whose_name_is_no_python_identifier_is_exported(tmp_path, file_name):
    """A downloaded `model (1).py`: the file's classes are named after a module of its own, which
    TorchScript reads back by that name."""
    source = tmp_path / file_name
    shutil.copy(USER_MODELS, source)
    model = user_models.randomise_batchnorm(user_models.make_residual(), seed=6).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "out"
    result = run_cli("export", f"{source}:make_residual", "--weights", tmp_path / "weights.pt",
                     "--input-shape", "1,3,6,6", "--out", out, "--quiet", "--no-bench")
    assert result.returncode == 0, result.stderr
    inputs = (np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, 6, 6), dtype=np.float32),)
    expected = eager_output(model, inputs)
    count, run = load_export(out / "model.ts")
    assert np.abs(run(*inputs) - expected).max() <= ATOL + RTOL * np.abs(expected).max()


@pytest.mark.parametrize("out_of", [lambda file: file, lambda file: file / "out"], ids=["a file", "under a file"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_export(tmp_path, out_of):
    """make_eigenvalues fails in the ONNX exporters: an --out error instead says nothing was tried."""
    file = tmp_path / "taken"
    file.write_bytes(b"a file of the user's")
    before = folder_state(tmp_path)
    result = run_cli("export", f"{USER_MODELS}:make_eigenvalues", "--input-shape", "1,3,4,4", "--out", out_of(file),
                     "--quiet", "--no-bench")
    assert_one_line_error(result, f"--out {out_of(file)}", f"{file} exists and is not a folder")
    assert folder_state(tmp_path) == before


def test_visualize_redraws_an_export_run_of_relative_paths_from_another_folder(tmp_path, monkeypatch):
    """`export models/net.py:make --weights w.pt --data samples.npy` in one folder, `visualize` in another."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "models").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(USER_MODELS, project / "models" / "net.py")
    torch.save(user_models.randomise_batchnorm(user_models.make_residual(), seed=8).state_dict(), project / "w.pt")
    np.save(project / "samples.npy", np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32))
    monkeypatch.chdir(project)
    exported = run_cli("export", "models/net.py:make_residual", "--weights", "w.pt", "--data", "samples.npy",
                       "--input-shape", "1,3,6,6", "--out", project / "out", "--quiet", "--no-bench")
    assert exported.returncode == 0, exported.stderr
    monkeypatch.chdir(elsewhere)
    redrawn = run_cli("visualize", "--out", project / "out")
    assert redrawn.returncode == 0, redrawn.stderr
    assert read_json(project / "out" / "summary.json")["model"]["spec"] == "models/net.py:make_residual"
