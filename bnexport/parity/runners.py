"""Runners: one per runtime, each a function of feeds that returns the model's outputs.

A runner takes one array (fed to a model's only input) or a dict of named feeds, and returns
an array (the first output) or a dict of every output by name (``bnexport.parity.compare``
compares them). torch is imported by the torch runners only, so checking ONNX files never
loads it; ONNX Runtime runs with its graph optimisations off unless asked, so that its own
fusions cannot hide a bad fold.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BnexportError, first_line
from .compare import Feeds, Runner

if TYPE_CHECKING:  # annotations only: loading a source imports what its kind needs
    from .sources import Source


def eager_runner(module) -> Runner:
    """A torch module on CPU. One array, or feeds of one input, go in as its one argument;
    several feeds go in as positional arguments, in order."""
    import torch

    def run(inputs):
        values = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in values))
        if isinstance(result, torch.Tensor):
            return result.numpy()
        leaves = output_tensors(result)  # a tuple, a list, a dict or a nest of them: in the exporters' order
        return leaves[0].numpy() if len(leaves) == 1 else {f"output {i}": r.numpy() for i, r in enumerate(leaves)}

    return run


def output_tensors(result) -> list:
    """Every tensor a forward returns, flattened as torch.export and the ONNX exporters flatten it."""
    import torch
    from torch.utils import _pytree

    return [leaf for leaf in _pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def checked_eager_runner(module, spec: str) -> Runner:
    """``eager_runner`` for a user's model: when the model rejects its input, one line that names
    the layer which did (``bnexport.model_spec.run_checked``) instead of torch's traceback."""
    run = eager_runner(module)

    def checked(inputs):
        try:
            return run(inputs)
        except Exception:
            import torch

            from ..model_spec import run_checked

            feeds = inputs if isinstance(inputs, dict) else {"input": inputs}
            tensors = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
            run_checked(module, tensors, shapes={name: np.shape(v) for name, v in feeds.items()}, spec=spec)
            raise  # it ran under the hooks: the failure was not the input's

    return checked


def torchscript_runner(path: str | Path) -> Runner:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    return eager_runner(scripted)


def exported_program_runner(path: str | Path) -> Runner:
    import torch

    program = torch.export.load(str(path))
    return eager_runner(program.module())


class NoKernel(BnexportError):
    """ONNX Runtime has no kernel for an op at this dtype, so it cannot run the model at all."""


def ort_session(path_or_bytes: str | Path | bytes, *, optimize: bool, providers: list | None = None,
                threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph types
        where = _where(path_or_bytes)
        message = first_line(err)
        missing = "Could not find an implementation for "
        if missing in message:  # e.g. a float64 Conv, or nearly any bfloat16 op on the CPU
            what = message.split(missing, 1)[1]
            raise NoKernel(f"{where}ONNX Runtime has no kernel for {what}, so it cannot run the model to check it; "
                           "convert the model to float32 to check it") from None
        raise BnexportError(f"{where}ONNX Runtime cannot load the model: {message}") from None


def _where(path_or_bytes) -> str:
    """The file an error is about, as its message's prefix; none for a model in memory (the caller names it)."""
    return "" if isinstance(path_or_bytes, bytes) else f"{path_or_bytes}: "


# ONNX element types whose values ORT's numpy bridge cannot carry; they travel as OrtValues.
_BFLOAT16 = "tensor(bfloat16)"


def onnxruntime_runner(path_or_bytes: str | Path | bytes, *, optimize: bool = False, providers: list[str] | None = None,
                       threads: int | None = None) -> Runner:
    """ONNX Runtime; ``optimize=False`` disables its graph fusions so they cannot hide a bad fold.

    Called with one array, it feeds the model's only input and returns the first output (the
    form the export pipeline uses); called with feeds by name, it returns every output by name.
    Feeds are matched to the inputs by name, or by position when the names differ but the counts
    agree (two exports of one model). A floating-point feed is cast to its input's own dtype, so a
    float32 reference and its float16 conversion see the same values.
    """
    session = ort_session(path_or_bytes, optimize=optimize, providers=providers, threads=threads)
    where = _where(path_or_bytes)
    inputs = session.get_inputs()
    outputs = session.get_outputs()

    def run(given):
        single = not isinstance(given, dict)
        if single:
            if len(inputs) != 1:
                raise BnexportError(f"{where}the model has {len(inputs)} inputs; feed each by name")
            given = {inputs[0].name: given}
        feeds = _match_feeds(where, inputs, given)
        try:
            values = _run_session(session, feeds, inputs, outputs)
        except Exception as err:  # ORT's own error types: a shape or type the model does not accept
            shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in feeds.items())
            raise BnexportError(f"{where}ONNX Runtime cannot run the model on input {shapes}: {first_line(err)}") from None
        return values[0] if single else dict(zip((o.name for o in outputs), values))

    return run


def _match_feeds(where: str, inputs, given: Feeds) -> Feeds:
    names = [i.name for i in inputs]
    if set(given) != set(names):
        if len(given) != len(names):
            raise BnexportError(f"{where}the model takes {len(names)} inputs ({', '.join(names)}), "
                                f"but {len(given)} were fed ({', '.join(given)})")
        given = dict(zip(names, given.values()))
    feeds = {}
    for spec in inputs:
        value = np.asarray(given[spec.name])
        wanted = _ort_dtype(spec.type)
        if wanted is not None and value.dtype != wanted and _is_float(value.dtype) and _is_float(wanted):
            value = value.astype(wanted)
        feeds[spec.name] = value
    return feeds


def _ort_dtype(type_text: str) -> np.dtype | None:
    """numpy's dtype for ORT's ``tensor(float16)``-style type, when it has one."""
    from .inputs import numpy_dtype

    name = type_text.removeprefix("tensor(").removesuffix(")")
    name = {"float": "float32", "double": "float64"}.get(name, name)
    try:
        return numpy_dtype(name)
    except TypeError:
        return None


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _run_session(session, feeds: Feeds, inputs, outputs) -> list[np.ndarray]:
    """``session.run``, except with bfloat16 in or out: numpy has no bfloat16, so those values go
    through OrtValues and come back as ``ml_dtypes.bfloat16`` arrays."""
    if not any(spec.type == _BFLOAT16 for spec in (*inputs, *outputs)):
        return session.run(None, feeds)
    import onnxruntime as ort
    from onnx import TensorProto

    values = {}
    for name, value in feeds.items():
        if value.dtype.name == "bfloat16":
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), TensorProto.BFLOAT16)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    results = session.run_with_ort_values([o.name for o in outputs], values)
    return [_bfloat16_array(r) if o.type == _BFLOAT16 else r.numpy() for o, r in zip(outputs, results)]


def _bfloat16_array(value) -> np.ndarray:
    """Copy a CPU OrtValue of bfloat16 out through its raw pointer: its ``numpy()`` refuses the type."""
    import ctypes

    from .inputs import numpy_dtype

    shape = tuple(value.shape())
    count = int(np.prod(shape))
    raw = np.zeros(count, np.uint16)
    if count:
        ctypes.memmove(raw.ctypes.data, value.data_ptr(), 2 * count)
    return raw.view(numpy_dtype("bfloat16")).reshape(shape)


def onnxruntime_cuda_runner(path: str | Path, *, optimize: bool = False) -> Runner | None:
    """ONNX Runtime on its CUDA execution provider, or None where this onnxruntime cannot run it.

    TF32 is turned off: it rounds conv inputs to 10 mantissa bits, an error the float32
    tolerance is not meant to absorb. A session that silently fell back to the CPU does not count.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    for provider_options in ({"use_tf32": "0"}, {}):  # older releases do not know use_tf32 (and had TF32 off)
        try:
            session = ort_session(path, optimize=optimize, providers=[("CUDAExecutionProvider", provider_options)])
        except BnexportError:  # missing CUDA libraries or an unknown option: try the next, then give up
            continue
        if session.get_providers()[0] == "CUDAExecutionProvider":
            return _cuda_run(session, _where(path))
    return None


def _cuda_run(session, where: str) -> Runner:
    inputs, names = session.get_inputs(), [o.name for o in session.get_outputs()]

    def run(given):
        if isinstance(given, dict):
            return dict(zip(names, session.run(None, _match_feeds(where, inputs, given))))
        return session.run(None, {inputs[0].name: given})[0]

    return run


def runner_for(source: str | Path | Source, *, optimize: bool = False) -> Runner:
    """A runner for a model file, whose errors name the file.

    ``source`` is a path or a ``Source`` already loaded (``bnexport.parity.sources.load_source``).
    A path ending in ``.ts`` runs in TorchScript, ``.pt2`` as a torch.export program, a bnexport
    checkpoint as its eager module, and anything else as ONNX in ONNX Runtime on the CPU
    (``optimize`` turns its graph optimisations on).
    """
    if not isinstance(source, (str, Path)):
        return _source_runner(source, optimize=optimize)
    path = Path(source)
    if path.suffix in (".ts", ".pt2"):
        if not path.is_file():
            raise BnexportError(f"{path}: file not found")
        load = torchscript_runner if path.suffix == ".ts" else exported_program_runner
        try:
            return load(path)
        except Exception as err:  # torch's own errors for a file that is not what its suffix says
            raise BnexportError(f"{path}: cannot load it as {path.suffix} ({first_line(err)})") from None
    from .sources import load_source

    return _source_runner(load_source(path, needs_input_shape=False), optimize=optimize)


def _source_runner(source: Source, *, optimize: bool) -> Runner:
    if source.kind == "spec":
        return checked_eager_runner(source.module, source.name)
    if source.kind != "onnx":
        return eager_runner(source.module)
    try:
        run = onnxruntime_runner(source.onnx_model.SerializeToString(), optimize=optimize)
    except BnexportError as err:
        raise BnexportError(f"{source.path}: {err}") from None

    def named(feeds):
        try:
            return run(feeds)
        except BnexportError as err:
            raise BnexportError(f"{source.path}: {err}") from None

    return named
