"""Serve models in Netron, on 127.0.0.1 only, one port per model.

Each model gets its own child process running ``netron``. The reason is a trap in netron's
Python server: the model to serve is stored on its request-handler *class*, which every
server in one process shares, so a second ``netron.start`` in the same process makes the
first port serve the second model too. After start-up every port is asked for its model
and the bytes are compared with the file, so a port never shows another port's model.
"""

from __future__ import annotations

import errno
import hashlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..config import ARTIFACTS, NETRON_PORT
from ..errors import BnexportError, first_line

HOST = "127.0.0.1"  # loopback only: a model is not published to the network by accident
START_TIMEOUT_S = 20.0

# The child: serve one file, say so, and serve until Ctrl-C or until its parent is gone,
# so a killed ``bnexport view`` never leaves a server behind.
_CHILD = """
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING)
import netron
parent = os.getppid()
netron.start(sys.argv[1], address=(sys.argv[2], int(sys.argv[3])), browse=False)
print("ready", flush=True)
try:
    while os.getppid() == parent and netron.status():
        time.sleep(0.3)
except KeyboardInterrupt:
    pass
netron.stop()
"""


@dataclass
class ServedModel:
    path: Path
    port: int
    process: subprocess.Popen
    error_log: IO[str]  # the child's stderr

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"


def check_model(path: str | Path) -> Path:
    """Refuse, with a clear reason, a file Netron would show as an error page."""
    path = Path(path)
    if not path.is_file():
        raise BnexportError(f"{path}: file not found")
    if path.suffix.lower() != ".onnx":
        # Netron 9.3's page stayed blank on bnexport's model.ts and model.pt2: serve only what it shows.
        raise BnexportError(f"{path}: view serves ONNX models (.onnx), not {path.suffix or 'files without a suffix'}")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's own errors
        raise BnexportError(f"{path}: Netron cannot open it: not a readable ONNX model "
                            f"({type(err).__name__}: {first_line(err)})") from None
    if not model.graph.node:  # an empty file parses as an empty ModelProto
        raise BnexportError(f"{path}: Netron cannot open it: no graph in it (empty or not an ONNX model)")
    return path


def models_to_serve(paths: list[str | Path]) -> list[Path]:
    """Each file as given; for a folder, its ONNX files: an export or train-and-export run's
    model.onnx and model.folded.onnx, or else every .onnx file in it, by name."""
    models: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            models.append(path)
            continue
        run_files = [path / name for name in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded) if (path / name).is_file()]
        found = run_files or sorted(p for p in path.glob("*.onnx") if p.is_file())
        if not found:
            raise BnexportError(f"{path}: no ONNX file in this folder (an export or train-and-export run holds "
                                f"{ARTIFACTS.onnx} and {ARTIFACTS.onnx_folded})")
        models += found
    return models


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds
        try:
            probe.bind((HOST, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def choose_ports(count: int, first: int) -> list[int]:
    """``count`` consecutive ports from ``first`` (0: any free ports), each checked free."""
    ports = [free_port() for _ in range(count)] if first == 0 else list(range(first, first + count))
    if ports[-1] > 65535:
        raise BnexportError(f"--port {first}: {count} models need ports up to {ports[-1]}, beyond 65535")
    for port in ports:
        if not port_is_free(port):
            raise BnexportError(f"--port: {HOST}:{port} is already in use; choose another with --port")
    return ports


def _served_bytes(port: int, name: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}/data/{urllib.request.quote(name)}", timeout=10) as response:
        return response.read()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def start(models: list[str | Path], *, port: int = NETRON_PORT) -> list[ServedModel]:
    """Check every file, then serve each on its own port; return once all are verified."""
    paths = [check_model(model) for model in models]
    ports = choose_ports(len(paths), port)
    served: list[ServedModel] = []
    try:
        for path, number in zip(paths, ports):
            # stderr to a file, not a pipe: nobody reads a pipe while serving, and http.server writes
            # a traceback there for every dropped connection until a full pipe would block it
            errors = tempfile.TemporaryFile(mode="w+")
            process = subprocess.Popen([sys.executable, "-c", _CHILD, str(path.resolve()), HOST, str(number)],
                                       stdout=subprocess.PIPE, stderr=errors, text=True)
            served.append(ServedModel(path, number, process, errors))
            _wait_ready(served[-1])
        for model in served:  # each port must serve its own file, byte for byte
            expected = hashlib.sha256(model.path.read_bytes()).hexdigest()
            if hashlib.sha256(_served_bytes(model.port, model.path.name)).hexdigest() != expected:
                raise BnexportError(f"{HOST}:{model.port} serves a different file than {model.path}")
    except BaseException:
        stop(served)
        raise
    return served


def _wait_ready(model: ServedModel) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    # select before readline: a child that hangs before it says anything must not hang us
    answered, _, _ = select.select([model.process.stdout], [], [], START_TIMEOUT_S)
    line = model.process.stdout.readline() if answered else ""  # "ready", or "" when the child died or hung
    if line.strip() != "ready":
        _stop(model.process)
        model.error_log.seek(0)
        errors = [text for text in model.error_log.read().strip().splitlines() if text.strip()]
        if not answered:
            reason = f"no answer within {START_TIMEOUT_S:g} s"
        else:
            reason = errors[-1] if errors else f"exit status {model.process.returncode}"
        raise BnexportError(f"{HOST}:{model.port}: Netron could not serve {model.path}: {reason[:200]}")
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, model.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BnexportError(f"{HOST}:{model.port}: Netron did not answer within {START_TIMEOUT_S:.0f} s")


def stop(served: list[ServedModel]) -> None:
    for model in served:
        _stop(model.process)
        model.error_log.close()


def open_in_browser(served: list[ServedModel]) -> None:
    for model in served:
        webbrowser.open(model.url)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the servers the way Ctrl-C does


def wait(served: list[ServedModel]) -> None:
    """Block until Ctrl-C (or SIGTERM) or until every server has stopped; then stop the rest."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while any(model.process.poll() is None for model in served):
            time.sleep(0.2)
    finally:
        stop(served)
        signal.signal(signal.SIGTERM, previous)
