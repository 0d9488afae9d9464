"""``fold_file``: fold the model in a file, an ONNX file or a bnexport checkpoint, into a new file.

The output's suffix picks the format for a checkpoint: ``.onnx``, ``.ts`` (TorchScript) or ``.pt2``
(torch.export). An ONNX file folds into ONNX, its external data kept external. Paths that would
lose or clobber a file are refused before any work, and nothing is written when the check fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..artifacts import write_json
from ..config import DEFAULT_SEED
from ..errors import BnexportError, CheckFailed
from ..export.writers import save_onnx
from ..parity.compare import tolerance_given
from ..parity.sources import Source, load_source, single_shape
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
) -> FoldReport:
    """Fold every BatchNorm of ``src`` that folds exactly, check the copy, write it to ``dst``; return the report.

    ``in_place`` writes an ONNX ``src`` over itself (``dst`` is then None or ``src``). With
    ``check`` the folded model is compared with the original on seeded input (``seed``), shaped
    by ``input_shapes`` as ``fold_onnx`` takes them (a checkpoint's one input takes a bare shape,
    or one NAME=shape); ``atol`` and ``rtol``, where given, replace the model dtype's tolerance
    (``bnexport.config.tolerance_for``). When they differ, ``CheckFailed`` is raised with the
    report, and nothing but the report is written. ``report_path`` receives the report as JSON
    (fold.json), on success or failure. ``fold_overridable`` is ``fold_onnx``'s. Bad input
    raises a one-line ``BnexportError`` naming the file.
    """
    src = Path(src)
    output = _output_path(src, None if dst is None else Path(dst), in_place=in_place)
    if report_path is not None:
        report_path = Path(report_path)
        _check_new_file(report_path, "--report", not_any_of=(src, output))
    source = load_source(src, needs_input_shape=False)
    if source.kind == "checkpoint" and (in_place or output.suffix not in CHECKPOINT_OUTPUTS):
        raise BnexportError(f"{src}: a checkpoint folds into a new file ending in {', '.join(CHECKPOINT_OUTPUTS)}, not {output.name}")
    try:
        if source.kind == "onnx":
            folded, report = _fold_onnx_source(source, check=check, input_shapes=input_shapes, seed=seed, atol=atol,
                                               rtol=rtol, fold_overridable=fold_overridable)
        else:
            from .torch_module import fold_module

            shape = single_shape(src, input_shapes) or source.input_shape
            folded, report = fold_module(source.module, check=check, input_shape=shape, seed=seed,
                                         tolerance=tolerance_given("float32", atol=atol, rtol=rtol))
    except CheckFailed as failed:
        if report_path is not None:
            write_json(report_path, failed.report.to_json())
        raise

    if source.kind == "onnx":
        save_onnx(folded, output, external_data=source.external_data)
    else:
        _save_folded_module(folded, output, shape)
    if report_path is not None:
        write_json(report_path, report.to_json())
    return report


def _output_path(src: Path, dst: Path | None, *, in_place: bool) -> Path:
    """The output path, after refusing the combinations that would lose or clobber a file."""
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


def _save_folded_module(folded, output: Path, shape: tuple[int, ...]) -> None:
    import torch

    from ..export.writers import export_program, export_torchscript, to_onnx

    # a batch of 2 for the example: torch.export would specialise a batch of 1 and lose the dynamic axis
    example = torch.zeros((2, *shape[1:]))
    if output.suffix == ".onnx":
        save_onnx(to_onnx(folded, example), output)
    elif output.suffix == ".ts":
        export_torchscript(folded, output)
    else:
        export_program(folded, example, output)
