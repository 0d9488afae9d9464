"""Any model in: a spec names a torch module, ``--weights`` fills it, ``--input-shape`` feeds it.

A spec is one of::

    torchvision:NAME            torchvision.models.get_model(NAME, weights=None)
    timm:NAME                   timm.create_model(NAME, pretrained=False), with timm installed
    package.module:callable     an importable callable (a class or a function) that returns an nn.Module
    path/to/file.py:callable    the same, from a Python file
    CHECKPOINT                  a bnexport checkpoint: its SimpleCNN with its weights

Nothing here downloads: pretrained weights come in through ``--weights``, a state dict read with
``torch.load(weights_only=True)``. Without them the model is built under a fixed seed, so the same
spec and seed give the same random weights. Every failure is a one-line ``BnexportError`` that
names the spec, the file or the flag.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_SEED, SPEC_FORMS
from .errors import BnexportError, first_line

# Where checkpoints of other projects keep their state dict, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state", "net", "network")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

Shapes = dict[str, tuple[int, ...]]


@dataclass
class LoadedModel:
    """A user's model, ready to export: eval mode, on the CPU, with the names of its inputs."""

    module: nn.Module
    spec: str
    input_names: tuple[str, ...]  # forward's positional parameters without a default, in order
    weights: str | None = None  # the --weights file, None for a seeded random model
    seed: int = DEFAULT_SEED
    default_shapes: Shapes | None = None  # what a checkpoint or a timm config says the model takes
    notes: list[str] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return self.weights is None and not is_file_spec(self.spec)

    def describe(self) -> dict:
        """summary.json's ``model``: enough to rebuild it with ``load_model``."""
        from .artifacts import sha256_file

        cls = type(self.module)
        return {
            "spec": self.spec,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "weights": self.weights,
            "weights_sha256": sha256_file(self.weights) if self.weights else None,
            "random_weights": self.random_weights,
            "seed": self.seed,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "inputs": list(self.input_names),
            "folder": str(Path.cwd()),  # what a relative spec, --weights or --data path is relative to
        }


def is_file_spec(text: str) -> bool:
    """A bnexport checkpoint: a spec that is an existing file (its weights come with it)."""
    return Path(text).is_file()


def spec_from(folder: str | Path | None, spec: str) -> str:
    """``spec`` as it reads from ``folder``: a relative file path in it (a checkpoint, a ``file.py``)
    made absolute; any other spec as it is."""
    if not folder:
        return spec
    head, colon, tail = spec.rpartition(":")
    if colon and head.endswith(".py") and not Path(head).is_absolute():
        return f"{Path(folder) / head}:{tail}"
    if not colon and not Path(spec).is_absolute():
        return str(Path(folder) / spec)
    return spec


def looks_like_spec(text: str) -> bool:
    """``PREFIX:NAME`` in one of the forms ``load_model`` reads (a checkpoint is a file, checked apart)."""
    head, colon, tail = str(text).rpartition(":")
    if not colon or not head or not tail:
        return False
    if head in ("torchvision", "timm"):
        return True
    return bool(_DOTTED.match(tail)) and (head.endswith(".py") or bool(_DOTTED.match(head)))


def load_model(spec: str, *, weights: str | Path | None = None, seed: int = DEFAULT_SEED) -> LoadedModel:
    """Build the model ``spec`` names, fill it from ``weights`` (a state dict) and put it in eval mode."""
    spec = str(spec)
    if is_file_spec(spec):
        if weights is not None:
            raise BnexportError(f"--weights: {spec} is a checkpoint and has its own weights; pass one or the other")
        return _from_checkpoint(spec, seed)
    if not looks_like_spec(spec):
        where = "no such file, and not" if ":" not in spec and not Path(spec).exists() else "not"
        raise BnexportError(f"{spec}: {where} a model spec; use {SPEC_FORMS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _build(spec)
    loaded = LoadedModel(module, spec, input_names(module), weights=None if weights is None else str(weights), seed=seed,
                         default_shapes=_default_shapes(module))
    if weights is not None:
        load_weights(module, weights, spec=spec)
    _check_float32(module, spec)
    module.eval()
    return loaded


def _check_float32(module: nn.Module, spec: str) -> None:
    """The check inputs, the exports and the fold are float32: a model in another precision would
    only fail later, at its first layer, with torch's dtype message."""
    other = next((t.dtype for t in module.parameters() if t.is_floating_point() and t.dtype != torch.float32), None)
    if other is not None:
        raise BnexportError(f"{spec}: its weights are {other}; bnexport exports float32 models, "
                            "so return the model with .float() from the callable")


def _build(spec: str) -> nn.Module:
    prefix, _, name = spec.rpartition(":")
    if prefix == "torchvision":
        return _torchvision(spec, name)
    if prefix == "timm":
        return _timm(spec, name)
    factory = _callable(spec, prefix, name)
    label = f"{spec}: {name}()"
    try:
        module = factory()
    except Exception as err:
        raise BnexportError(f"{label} raised {type(err).__name__}: {first_line(err)}") from None
    if not isinstance(module, nn.Module):
        raise BnexportError(f"{label} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _torchvision(spec: str, name: str) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise BnexportError(f"{spec}: torchvision has no model {name!r}{_close(name, known)}")
    return torchvision.models.get_model(name, weights=None)


def _timm(spec: str, name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise BnexportError(f"{spec}: timm is not installed; pip install 'bnexport[timm]'") from None
    if not timm.is_model(name):
        raise BnexportError(f"{spec}: timm has no model {name!r}{_close(name, timm.list_models())}")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as err:
        raise BnexportError(f"{spec}: timm.create_model raised {type(err).__name__}: {first_line(err)}") from None


def _close(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _callable(spec: str, where: str, name: str):
    module = _import_file(spec, Path(where)) if where.endswith(".py") else _import_module(spec, where)
    target = module
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            defined = sorted(n for n, v in vars(module).items()
                             if callable(v) and getattr(v, "__module__", None) == module.__name__ and not n.startswith("_"))
            listing = f"; it defines {', '.join(defined[:8])}" if defined else ""
            raise BnexportError(f"{spec}: {where} has no {name!r}{listing}")
    if not callable(target):
        raise BnexportError(f"{spec}: {where}.{name} is a {type(target).__name__}, not a callable")
    return target


def _import_module(spec: str, dotted: str):
    """Import ``dotted`` as ``python -m`` would, from the current folder too: the ``bnexport``
    script puts its own folder on ``sys.path`` instead. The current folder goes last, so that an
    installed package of the same name is still the one imported, and only for the import."""
    here = str(Path.cwd())
    added = not any(entry in ("", ".", here) for entry in sys.path)
    if added:
        sys.path.append(here)
    try:
        return _import_dotted(spec, dotted)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def _import_dotted(spec: str, dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as err:
        if err.name and dotted.startswith(err.name):
            raise BnexportError(f"{spec}: no module named {err.name!r}") from None
        raise BnexportError(f"{spec}: importing {dotted} failed: {first_line(err)}") from None
    except Exception as err:
        raise BnexportError(f"{spec}: importing {dotted} raised {type(err).__name__}: {first_line(err)}") from None


def _import_file(spec: str, path: Path):
    """Run ``path`` as a module of its own, importable by name while it runs, so that TorchScript
    and pickling find its classes, and with its folder on ``sys.path`` for its sibling imports."""
    if not path.is_file():
        raise BnexportError(f"{spec}: {path} not found")
    module_name = "bnexport_user_" + re.sub(r"[^0-9A-Za-z_]", "_", path.stem)  # TorchScript reads it back as an identifier
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise BnexportError(f"{spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise BnexportError(f"{spec}: running {path} raised {type(err).__name__}: {first_line(err)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _from_checkpoint(path: str, seed: int) -> LoadedModel:
    from .train.loop import load_checkpoint, model_from_checkpoint

    module, spec = model_from_checkpoint(load_checkpoint(path), path=path)
    names = input_names(module)
    return LoadedModel(module, path, names, weights=None, seed=seed, default_shapes={names[0]: (1, *spec.input_shape)})


def input_names(module: nn.Module) -> tuple[str, ...]:
    """forward's positional parameters that need a value; ``input`` when it takes ``*args``."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ("input",)
    names = tuple(p.name for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
    return names or ("input",)


def _default_shapes(module: nn.Module) -> Shapes | None:
    """timm models say what they take (``pretrained_cfg['input_size']``); others do not."""
    config = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    size = config.get("input_size") if isinstance(config, Mapping) else None
    names = input_names(module)
    if size and len(names) == 1:
        return {names[0]: (1, *map(int, size))}
    return None


# Weights -------------------------------------------------------------------------------

def state_dict_in(payload: object) -> dict[str, torch.Tensor] | None:
    """The state dict a loaded file holds: itself, or one under a usual key (``STATE_DICT_KEYS``)."""
    if _is_state_dict(payload):
        return dict(payload)
    if isinstance(payload, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(payload.get(key)):
                return dict(payload[key])
    return None


def _is_state_dict(value: object) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def load_weights(module: nn.Module, path: str | Path, *, spec: str) -> None:
    """Fill ``module`` from a state dict in ``path`` (``weights_only=True``), or raise one line
    that lists the missing and unexpected keys and the shapes that differ."""
    path = Path(path)
    flag = f"--weights {path}"
    if not path.is_file():
        raise BnexportError(f"{flag}: file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = _load_failure(err)
        raise BnexportError(f"{flag}: torch.load(weights_only=True) cannot read it ({reason})") from None
    state = state_dict_in(payload)
    if state is None:
        raise BnexportError(f"{flag}: holds no state dict (a dict of tensors, or one under "
                            f"{', '.join(repr(k) for k in STATE_DICT_KEYS[:3])}, ...)")
    expected = module.state_dict()
    state = _without_wrapper_prefix(state, expected)
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # BatchNorm fills it in when absent
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
                  if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {_some(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ, file vs model", mismatched))
                 if keys]
        raise BnexportError(f"{flag} does not fit {spec}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=False)


def _load_failure(err: Exception) -> str:
    """Why torch.load refused a file: for a pickled object, the global it would not load (torch's
    first line only says that it failed)."""
    refused = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), None)
    if refused:  # what follows is how to allow it in Python, of no use at the command line
        return first_line(RuntimeError(refused.split(". Please")[0]))
    return f"{type(err).__name__}: {first_line(err)}"


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and DataParallel; torch.compile


def _without_wrapper_prefix(state: dict, expected: Mapping) -> dict:
    """Drop the prefix that a wrapper puts before every key (``WRAPPER_PREFIXES``), as often as it is
    there: DDP around a compiled model saves ``module._orig_mod.``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def _some(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# Inputs --------------------------------------------------------------------------------

def resolve_shapes(loaded: LoadedModel, given: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None) -> Shapes:
    """One shape per input of the model, from ``--input-shape`` (a bare shape for a one-input model,
    NAME=DIMS per input) or from what the model itself says."""
    names = loaded.input_names
    if given is None:
        if loaded.default_shapes is not None:
            return dict(loaded.default_shapes)
        example = "1,3,224,224" if len(names) == 1 else " ".join(f"--input-shape {n}=..." for n in names)
        raise BnexportError(f"--input-shape: {loaded.spec} does not say what it takes; give it, e.g. "
                            f"--input-shape {example}" if len(names) == 1 else
                            f"--input-shape: {loaded.spec} takes {len(names)} inputs ({', '.join(names)}); give {example}")
    if isinstance(given, tuple):
        if len(names) != 1:
            raise BnexportError(f"--input-shape: {loaded.spec} takes {len(names)} inputs ({', '.join(names)}); "
                                "give each as NAME=DIMS")
        return {names[0]: tuple(given)}
    unknown = [n for n in given if n not in names]
    if unknown:
        raise BnexportError(f"--input-shape {unknown[0]}=...: {loaded.spec} has no input {unknown[0]!r}; "
                            f"its inputs are {', '.join(names)}")
    missing = [n for n in names if n not in given]
    if missing:
        raise BnexportError(f"--input-shape: no shape for {', '.join(missing)}; give NAME=DIMS for each input")
    return {n: tuple(given[n]) for n in names}


def seeded_tensors(shapes: Shapes, *, seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Standard-normal float32 inputs, input i from seed ``seed + i``, as ``bnexport.parity.inputs`` draws them;
    ``batch`` replaces the first dim."""
    from .parity.inputs import seeded_value

    tensors = []
    for index, shape in enumerate(shapes.values()):
        shape = (batch, *shape[1:]) if batch is not None else shape
        tensors.append(torch.from_numpy(seeded_value(tuple(shape), "float32", seed=seed, index=index)))
    return tuple(tensors)


def run_checked(module: nn.Module, inputs: tuple[torch.Tensor, ...], *, shapes: Shapes, spec: str):
    """Run the model once on ``inputs``; when it rejects them, say which layer did, in one line.

    Forward hooks keep the stack of modules being called: the innermost one still open when
    the exception comes out is the layer that raised it. BatchNorm calls are counted on the way,
    as the exported ONNX graph must hold one BatchNormalization per call.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    names = {m: n for n, m in module.named_modules()}
    open_calls: list[str] = []
    failed_in: list[str] = []
    batchnorm_calls = [0]

    def enter(mod, args):
        open_calls.append(names.get(mod, type(mod).__name__))
        if isinstance(mod, _BatchNorm):
            batchnorm_calls[0] += 1

    def leave(mod, args, output):
        if open_calls:
            open_calls.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            output = module(*inputs)
    except Exception as err:
        failed_in = list(open_calls)
        given = " ".join(f"{n}={','.join(map(str, s))}" for n, s in shapes.items())
        layer = failed_in[-1] if failed_in else ""
        kind = type(dict(module.named_modules()).get(layer, module)).__name__
        where = f"at {layer} ({kind})" if layer else "in its forward"
        raise BnexportError(f"--input-shape {given}: {spec} rejects it {where}: "
                            f"{type(err).__name__}: {first_line(err)}") from None
    finally:
        for handle in handles:
            handle.remove()
    return output, batchnorm_calls[0]
