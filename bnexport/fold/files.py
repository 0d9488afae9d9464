"""``fold_file``: fold a model, an ONNX file, a bnexport checkpoint or a model spec, into a new file.

The output's suffix picks the format for a torch module (a checkpoint's, or the model a spec
names): ``.onnx``, ``.ts`` (TorchScript) or ``.pt2`` (torch.export). An ONNX file folds into ONNX,
its external data kept external. Paths that would lose or clobber a file are refused before any
work, and nothing is written when the check fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import write_json
from ..config import DEFAULT_SEED
from ..errors import BnexportError, CheckFailed, first_line
from ..export.writers import save_onnx
from ..parity.compare import tolerance_given
from ..parity.sources import Source, load_source, module_feeds, names_a_spec
from .fold_report import FoldReport

CHECKPOINT_OUTPUTS = (".onnx", ".ts", ".pt2")


def fold_file(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    in_place: bool = False,
    report_path: str | Path | None = None,
    check: bool = True,
    input_shapes: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    atol: float | None = None,
    rtol: float | None = None,
    fold_overridable: bool = False,
    weights: str | Path | None = None,
) -> FoldReport:
    """Fold every BatchNorm of ``src`` that folds exactly, check the copy, write it to ``dst``; return the report.

    ``in_place`` writes an ONNX ``src`` over itself (``dst`` is then None or ``src``). With
    ``check`` the folded model is compared with the original on seeded input (``seed``), shaped
    by ``input_shapes`` as ``fold_onnx`` takes them (a checkpoint's one input takes a bare shape,
    or one NAME=shape); ``atol`` and ``rtol``, where given, replace the model dtype's tolerance
    (``bnexport.config.tolerance_for``). When they differ, ``CheckFailed`` is raised with the
    report, and nothing but the report is written. ``report_path`` receives the report as JSON
    (fold.json), on success or failure. ``fold_overridable`` is ``fold_onnx``'s. A model spec
    (``src`` naming no file, see ``bnexport.model_spec``) is filled from ``weights`` or seeded with
    ``seed``; its inputs are its forward's, shaped by ``input_shapes`` (by name for several) or by
    what the model says it takes. Bad input raises a one-line ``BnexportError`` naming the file.
    """
    spec = str(src) if names_a_spec(src) else None
    src = Path(src)
    output = _output_path(src, None if dst is None else Path(dst), in_place=in_place, spec=spec)
    if report_path is not None:
        report_path = Path(report_path)
        _check_new_file(report_path, "--report", not_any_of=(src, output))
    source = load_source(spec or src, needs_input_shape=False, weights=weights, seed=seed)
    if source.kind != "onnx" and (in_place or output.suffix not in CHECKPOINT_OUTPUTS):
        what = "a checkpoint" if source.kind == "checkpoint" else "a model spec"
        raise BnexportError(f"{source.name}: {what} folds into a new file ending in {', '.join(CHECKPOINT_OUTPUTS)}, "
                            f"not {output.name}")
    if source.kind != "onnx":
        inputs = _module_inputs(source, input_shapes, seed=seed)
    try:
        if source.kind == "onnx":
            folded, report = _fold_onnx_source(source, check=check, input_shapes=input_shapes, seed=seed, atol=atol,
                                               rtol=rtol, fold_overridable=fold_overridable)
        else:
            from .torch_module import fold_module

            folded, report = fold_module(source.module, check=check, example_inputs=inputs.check, seed=seed,
                                         tolerance=tolerance_given("float32", atol=atol, rtol=rtol))
    except CheckFailed as failed:
        if report_path is not None:
            write_json(report_path, failed.report.to_json())
        raise

    if source.kind == "onnx":
        save_onnx(folded, output, external_data=source.external_data)
    else:
        _save_folded_module(folded, output, inputs, label=source.name)
    if report_path is not None:
        write_json(report_path, report.to_json())
    return report


def _output_path(src: Path, dst: Path | None, *, in_place: bool, spec: str | None = None) -> Path:
    """The output path, after refusing the combinations that would lose or clobber a file."""
    if spec is not None:
        if in_place:
            raise BnexportError(f"--in-place: {spec} is a model spec, not a file to overwrite; name the output with -o")
        if dst is None or dst.suffix not in CHECKPOINT_OUTPUTS:
            raise BnexportError(f"-o: a model spec ({spec}) folds into a new file ending in {', '.join(CHECKPOINT_OUTPUTS)}"
                                + ("" if dst is None else f", not {dst.name}"))
        _check_new_file(dst, "-o")
        return dst
    if in_place:
        if dst is not None and dst.resolve() != src.resolve():
            raise BnexportError("--in-place writes over the input; drop -o or --in-place")
        return src
    if dst is None:
        raise BnexportError("-o OUTPUT is required (or --in-place to overwrite the input)")
    if dst.resolve() == src.resolve():
        raise BnexportError(f"{dst}: the output path is the input; pass --in-place to overwrite it")
    _check_new_file(dst, "-o")
    return dst


def _check_new_file(path: Path, flag: str, *, not_any_of: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that is a folder, sits in no folder, or is another file of the run."""
    if path.is_dir():
        raise BnexportError(f"{flag} {path}: is a folder; name a file")
    if not path.parent.is_dir():
        raise BnexportError(f"{flag} {path}: folder {path.parent} does not exist")
    if any(path.resolve() == other.resolve() for other in not_any_of):
        raise BnexportError(f"{flag} {path}: that is the model itself; name another file")


def _fold_onnx_source(source: Source, *, check: bool, input_shapes, seed: int, atol: float | None, rtol: float | None,
                      fold_overridable: bool):
    from ..parity.inputs import input_feeds, model_float_dtype
    from ..parity.runners import NoKernel
    from .onnx_file import fold_onnx

    if input_shapes is not None:  # a wrong --input-shape is an error even when nothing folds, so nothing is checked
        try:
            input_feeds(source.onnx_model, input_shapes)
        except BnexportError as err:
            raise BnexportError(f"{source.path}: --input-shape {err}") from None
    tolerance = None  # the model's dtype decides
    if atol is not None or rtol is not None:
        tolerance = tolerance_given(model_float_dtype(source.onnx_model), atol=atol, rtol=rtol)
    try:
        return fold_onnx(source.onnx_model, check=check, input_shapes=input_shapes, seed=seed, tolerance=tolerance,
                         stored_at=source.path, fold_overridable=fold_overridable)
    except NoKernel as err:
        raise BnexportError(f"{_about(source.path, err)}, or fold it with --no-check") from None
    except BnexportError as err:
        raise BnexportError(_about(source.path, err)) from None


def _about(path: Path, err: Exception) -> str:
    """The error's message, starting with the file it is about (once)."""
    text = str(err)
    return text if text.startswith(f"{path}: ") else f"{path}: {text}"


@dataclass
class ModuleInputs:
    """What a torch module is folded, checked and exported with."""

    names: tuple[str, ...]
    check: tuple  # seeded tensors at the shapes asked for: the fold's check runs on these shapes
    example: tuple  # what the exporters trace: a batch of 2 where the model takes it
    dynamic_batch: bool  # False when the model runs at the given batch only


def _module_inputs(source: Source, input_shapes, *, seed: int) -> ModuleInputs:
    """The module's inputs at ``input_shapes`` (or its own), run once so that a shape the model
    rejects ends the command here, in one line naming the layer."""
    from ..model_spec import run_checked, seeded_tensors

    shapes = {feed.name: feed.shape for feed in module_feeds(source, input_shapes)}
    check = seeded_tensors(shapes, seed=seed)
    run_checked(source.module, check, shapes=shapes, spec=source.name)
    # a batch of 2 for the example: torch.export would specialise a batch of 1 and lose the dynamic axis
    batch_of_two = {name: (2, *shape[1:]) for name, shape in shapes.items()}
    example = seeded_tensors(shapes, seed=seed, batch=2)
    try:
        run_checked(source.module, example, shapes=batch_of_two, spec=source.name)
    except BnexportError:
        return ModuleInputs(tuple(shapes), check, check, dynamic_batch=False)
    return ModuleInputs(tuple(shapes), check, example, dynamic_batch=True)


def _save_folded_module(folded, output: Path, inputs: ModuleInputs, *, label: str) -> None:
    from ..export.writers import export_program, export_torchscript, to_onnx_with_fallback

    if output.suffix == ".onnx":
        model, _ = to_onnx_with_fallback(folded, inputs.example, input_names=list(inputs.names), label=label,
                                         dynamic_batch=inputs.dynamic_batch)
        save_onnx(model, output)
    elif output.suffix == ".ts":
        try:
            export_torchscript(folded, output, example=inputs.example)
        except BnexportError as err:
            raise BnexportError(f"{label}: {err}") from None
    else:
        try:
            export_program(folded, inputs.example, output, dynamic_batch=inputs.dynamic_batch)
        except Exception as err:  # torch.export's own errors: a graph break, an unsupported op
            raise BnexportError(f"{label}: torch.export cannot export it ({first_line(err)})") from None
