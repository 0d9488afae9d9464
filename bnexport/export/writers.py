"""Writers for TorchScript, torch.export (.pt2) and ONNX, all from eval mode with a dynamic batch axis.

Both ``torch.onnx`` exporters fold BatchNorm silently by default: the dynamo exporter in its
``optimize=True`` pass, and the TorchScript exporter through an eval-mode peephole when
``do_constant_folding=True``. ``ONNX_EXPORT_OPTIONS`` is the one place that turns this off,
so that ``model.onnx`` keeps one BatchNormalization node per BN layer; the folded ONNX
file is then made by bnexport's own fold, never by the exporter's.

torch is imported by the torch writers only: saving an ONNX file does not load it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from ..artifacts import FILE_MODE, atomic_path
from ..config import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
from ..errors import BnexportError, first_line

if TYPE_CHECKING:  # annotations only: torch is imported where it runs
    import torch

# dynamo=True is the maintained exporter; optimize=False keeps BatchNormalization nodes.
ONNX_EXPORT_OPTIONS = {"dynamo": True, "optimize": False, "external_data": False}
# The dynamo exporter's per-node Python stack, which holds absolute source paths of the machine that
# exported; ``to_onnx`` drops it. The other metadata stays: ``fold.onnx_names`` reads module paths from it.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _as_tuple(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def to_torchscript(module: torch.nn.Module, *, example=None):
    """TorchScript by ``torch.jit.script``; where the forward is not scriptable (many timm and user
    models), by ``torch.jit.trace`` on ``example``. Returns the module and "script" or "trace",
    whichever made it; a one-line ``BnexportError`` naming both when neither can."""
    import torch

    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; this file is written on purpose for its users.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support instance-level")
        try:
            return torch.jit.script(module.eval()), "script"
        except Exception as script_error:
            if example is None:
                raise
            warnings.simplefilter("ignore")  # the tracer's warnings name the user's code, not a problem of this file
            try:
                with torch.no_grad():
                    return torch.jit.trace(module.eval(), _as_tuple(example), check_trace=False), "trace"
            except Exception as trace_error:
                raise BnexportError(f"TorchScript cannot export it: torch.jit.script: {first_line(script_error)}; "
                                    f"torch.jit.trace: {first_line(trace_error)}") from None


def export_torchscript(module: torch.nn.Module, path: str | Path, *, example=None) -> str:
    """``to_torchscript``, saved to ``path``. Returns "script" or "trace", whichever wrote it."""
    scripted, how = to_torchscript(module, example=example)
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))
    return how


def batch_dims(example, module=None) -> tuple:
    """The first dim of every input, dynamic, named ``batch``: by position, whatever forward calls them.
    The inputs that ``module``'s forward takes as ``*args`` are one tuple to torch.export, so their
    dims are too."""
    import inspect

    import torch

    batch = torch.export.Dim("batch", min=1)
    dims = tuple({0: batch} for _ in _as_tuple(example))
    try:
        parameters = list(inspect.signature(module.forward).parameters.values()) if module is not None else []
    except (TypeError, ValueError):
        parameters = []
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        named = kinds.index(inspect.Parameter.VAR_POSITIONAL)
        return (*dims[:named], dims[named:])
    return dims


def export_program(module: torch.nn.Module, example, path: str | Path, *, dynamic_batch: bool = True) -> Path:
    """torch.export, with a dynamic batch axis named ``batch`` unless ``dynamic_batch`` is False, saved as .pt2.

    The example's batch must be 2 or more for a dynamic batch: torch.export specialises a size of 1.
    """
    import torch

    with _torch_export_stderr_discarded():
        program = torch.export.export(module.eval(), _as_tuple(example),
                                      dynamic_shapes=batch_dims(example, module) if dynamic_batch else None)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return Path(path)


def to_onnx(module: torch.nn.Module, example, *, opset: int = DEFAULT_OPSET, input_names: list[str] | None = None,
            output_names: list[str] | None = None, dynamic_batch: bool = True) -> onnx.ModelProto:
    """ONNX with BatchNormalization kept, batch axis dynamic (unless ``dynamic_batch`` is False).

    Inputs are called ``input_names`` (default ``images`` for a one-input model) and outputs
    ``output_names`` (default ``logits``, the exporter's own names for several).
    """
    import torch

    example = _as_tuple(example)
    if input_names is None and len(example) == 1:
        input_names = [INPUT_NAME]
    options = dict(ONNX_EXPORT_OPTIONS)
    options.pop("external_data")
    with warnings.catch_warnings(), _torch_export_stderr_discarded():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            example,
            input_names=input_names,
            output_names=output_names if output_names is not None else [OUTPUT_NAME],
            dynamic_shapes=batch_dims(example, module) if dynamic_batch else None,
            opset_version=opset,
            verbose=False,
            **options,
        )
    model = program.model_proto
    _rename_dynamic_batch(model)
    drop_stack_traces(model)
    return model


def to_onnx_by_torchscript(module: torch.nn.Module, example, *, opset: int = DEFAULT_OPSET,
                           input_names: list[str] | None = None, output_names: list[str] | None = None,
                           dynamic_batch: bool = True) -> onnx.ModelProto:
    """The TorchScript-based exporter (``dynamo=False``), for models the dynamo exporter cannot take.

    ``do_constant_folding=False`` is what keeps its BatchNormalization nodes.
    """
    import torch

    example = _as_tuple(example)
    names = input_names if input_names is not None or len(example) > 1 else [INPUT_NAME]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _native_stdout_discarded():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, buffer, dynamo=False, do_constant_folding=False,
                          input_names=names, output_names=output_names, opset_version=opset,
                          dynamic_axes={name: {0: "batch"} for name in names or []} if dynamic_batch else None)
    model = onnx.load_from_string(buffer.getvalue())
    _rename_dynamic_batch(model)
    return model


def drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the ``pkg.torch.onnx.stack_trace`` metadata of every node: main graph, subgraphs, functions."""
    def clean(nodes) -> None:
        for node in nodes:
            for position in reversed(range(len(node.metadata_props))):
                if node.metadata_props[position].key == STACK_TRACE:
                    del node.metadata_props[position]
            for attribute in node.attribute:
                for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    clean(graph.node)

    clean(model.graph.node)
    for function in model.functions:
        clean(function.node)


@contextlib.contextmanager
def _torch_export_stderr_discarded():
    """Python's stderr to nowhere for the duration: on a branch on the data, torch.export prints the
    partial graph to it and its symbolic shapes log warns there too, dozens of lines before the
    exception that the caller reports in one line."""
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _native_stdout_discarded():
    """File descriptor 1 to /dev/null for the duration. The TorchScript exporter turns torch's ONNX
    log on whatever ``verbose`` says (its ``setup_onnx_logging`` tests a function, not its result,
    for truth), and that log prints the whole TorchScript graph from C++ to stdout when an op has
    no ONNX form: dozens of lines before the command's one-line error."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def to_onnx_with_fallback(module: torch.nn.Module, example, *, input_names: list[str] | None = None,
                          output_names: list[str] | None = None, dynamic_batch: bool = True,
                          label: str = "the model") -> tuple[onnx.ModelProto, str]:
    """ONNX by the dynamo exporter, else by the TorchScript one: (model, "dynamo" or "torchscript").
    When neither can, one line naming both exporters' causes."""
    try:
        return to_onnx(module, example, input_names=input_names, output_names=output_names,
                       dynamic_batch=dynamic_batch), "dynamo"
    except Exception as dynamo_error:
        try:
            return to_onnx_by_torchscript(module, example, input_names=input_names, output_names=output_names,
                                          dynamic_batch=dynamic_batch), "torchscript"
        except Exception as torchscript_error:
            raise BnexportError(f"{label}: no exporter can write ONNX: dynamo exporter: {_exporter_cause(dynamo_error)}; "
                                f"TorchScript exporter: {_exporter_cause(torchscript_error)}") from None


def _exporter_cause(err: BaseException) -> str:
    """The ops an exporter stumbled on, where its messages name them, then the first line of the
    innermost cause: the dynamo exporter's own first line only says which of its steps failed."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    # aten::op, aten.op (overload dropped) and onnx::Op; not onnx.<module> in the exporter's own names
    ops = sorted(set(re.findall(r"\b(?:aten|prim)(?:::|\.)\w+|\bonnx::\w+", text)))
    line = first_line(chain[-1], limit=160)
    return f"op {', '.join(ops[:3])}: {line}" if ops else f"{type(chain[-1]).__name__}: {line}"


def _rename_dynamic_batch(model: onnx.ModelProto) -> None:
    """Call the batch axis ``batch`` on the inputs and outputs, whatever the exporter named it."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def save_onnx(model: onnx.ModelProto, path: str | Path, *, external_data: bool = False) -> Path:
    """Write ``model`` atomically; with ``external_data`` its tensors go to ``<name>.data`` beside it.

    At every moment the model file on disk reads whole data that is its own, even when it is
    replaced in place (``bnexport fold --in-place``). A new data file is written in a staging
    folder and renamed into place before the model. Where ``<name>.data`` already exists, the
    model there may be reading it, so see ``_replace_data_under_its_reader``.
    """
    path = Path(path)
    if not external_data:
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
        return path
    from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

    data_name = f"{path.name}.data"
    target = path.parent / data_name
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    convert_model_to_external_data(stored, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.data-") as staging:
        write_external_data_tensors(stored, staging)
        staged = Path(staging) / data_name
        if staged.exists():  # not when every tensor is small enough to stay in the model
            os.chmod(staged, FILE_MODE)  # onnx creates it 0600; it is as readable as its model
            if target.exists():
                _replace_data_under_its_reader(stored, path, staged, target)
                return path
            os.replace(staged, target)  # no model reads this name yet
    with atomic_path(path) as tmp:
        onnx.save(stored, str(tmp))
    return path


def _replace_data_under_its_reader(stored: onnx.ModelProto, path: Path, staged: Path, target: Path) -> None:
    """Write ``stored`` to ``path`` and its data (now at ``staged``) to ``target``, which the model
    at ``path`` may be reading, with no moment at which the model file reads data not its own.

    Renaming the data over ``target`` first would pair the old model with the new data; renaming
    the model first, the new model with the old data. So there are three atomic renames: (1) the
    data under a name of its own and a model reading that name; (2) a copy of the data over
    ``target``; (3) the model reading ``target``. The copy costs one more write of the data; a
    hard link would not, but onnx refuses to read a data file with two links. Should (2) or (3)
    fail, the model file reads the data under its own name, whole.
    """
    fd, own_name = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
    os.close(fd)
    own = Path(own_name)
    os.replace(staged, own)
    published = False
    try:
        _relocate(stored, target.name, own.name)
        with atomic_path(path) as tmp:  # 1. the model, reading the data under its own name
            onnx.save(stored, str(tmp))
        published = True
        with atomic_path(target) as tmp:  # 2. the data under its final name, while 1 reads the other
            shutil.copyfile(own, tmp)
        _relocate(stored, own.name, target.name)
        with atomic_path(path) as tmp:  # 3. the model, reading the data under its final name
            onnx.save(stored, str(tmp))
        own.unlink()
    finally:
        if not published:  # the model never read it
            own.unlink(missing_ok=True)


def _relocate(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point every tensor stored in the data file ``old`` at ``new`` (same offsets)."""
    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                yield from ([attribute.t] if attribute.HasField("t") else [])
                yield from attribute.tensors
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    yield from tensors(subgraph)

    for tensor in tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()
