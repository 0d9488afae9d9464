"""Files on disk: atomic writes, library versions and the manifest.

Every file is written to a temporary name in the destination folder and renamed into
place, so an interrupted or failed run never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BnexportError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a file created under the process's umask gets; mkstemp's 0600 is not that


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success."""
    destination = Path(destination)
    # keep the suffix: some writers (torch.export.save) check it
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.stem}.tmp-", suffix=destination.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield tmp
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(destination: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``destination``."""
    with atomic_path(destination) as tmp:
        write(tmp)
    return Path(destination)


def write_json(destination: str | Path, data: object) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(destination, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BnexportError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BnexportError(f"{path}: not valid JSON ({err})") from None


def prepare_out_dir(out: str | Path) -> Path:
    """Create the output folder and prove it is writable before any long work starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except FileExistsError:
        raise BnexportError(f"--out {out}: exists and is not a folder") from None
    except OSError as err:
        raise BnexportError(f"--out {out}: not writable ({err.strerror or err})") from None
    return out


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions that decide an artifact's numbers; saved next to every artifact.

    A module already imported reports its own ``__version__`` (torch's includes the build,
    e.g. +cu130); the others are read from their distributions' metadata, since importing
    torchvision, onnxruntime and onnxscript only to ask costs seconds on every run.
    """
    import sys
    from importlib import metadata

    from . import __version__

    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "numpy"):
        module = sys.modules.get(name)
        try:
            versions[name] = str(getattr(module, "__version__", None) or metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
    versions["bnexport"] = __version__
    return versions


def write_manifest(out: Path, descriptions: dict[str, str], *, name: str) -> dict:
    """Write ``name`` listing every described file in ``out`` with its sha256 and size."""
    entries = []
    for file_name, description in sorted(descriptions.items()):
        path = out / file_name
        if path.is_file():
            entries.append({
                "file": file_name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "description": description,
            })
    manifest = {"files": entries}
    write_json(out / name, manifest)
    return manifest
