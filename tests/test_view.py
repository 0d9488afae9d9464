"""bnexport view: Netron on 127.0.0.1, one port per model, each port its own model; and in a real browser."""

import hashlib
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from bnexport.viz import netron as view
from bnexport.errors import BnexportError
from browser import chromium_page
from conftest import REPO, assert_one_line_error, run_bnexport, run_cli


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        first = view.free_port()
        if first + count <= 65535 and all(view.port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError("no free consecutive ports")


@pytest.fixture
def served(tiny_run):
    models = [tiny_run / "model.onnx", tiny_run / "model.folded.onnx"]
    running = view.start(models, port=consecutive_free_ports(2))
    yield running
    view.stop(running)


def test_each_port_serves_its_own_model(served):
    first, second = served
    assert second.port == first.port + 1
    for model in served:
        assert model.url == f"http://127.0.0.1:{model.port}/"
        page = fetch(model.url).decode()
        assert f'<meta name="file" content="/data/{model.path.name}">' in page
        served_bytes = fetch(f"{model.url}data/{model.path.name}")
        assert hashlib.sha256(served_bytes).digest() == hashlib.sha256(model.path.read_bytes()).digest()
    assert fetch(f"{first.url}data/model.onnx") != fetch(f"{second.url}data/model.folded.onnx")


def test_servers_listen_on_loopback_only(served):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outward address
            outward = probe.getsockname()[0]
        except OSError:
            pytest.skip("no non-loopback interface")
    if outward.startswith("127."):
        pytest.skip("no non-loopback interface")
    with pytest.raises(OSError):
        socket.create_connection((outward, served[0].port), timeout=2).close()


def test_stop_frees_the_ports(tiny_run):
    port = consecutive_free_ports(1)
    running = view.start([tiny_run / "model.onnx"], port=port)
    view.stop(running)
    assert running[0].process.poll() is not None and view.port_is_free(port)


@pytest.mark.parametrize("content, suffix, fragment", [
    (b"not a protobuf \xff\xff\xff", ".onnx", "Netron cannot open it"),
    (b"", ".onnx", "no graph in it"),
    (b"PK", ".pt2", "serves ONNX models"),
])
def test_files_netron_cannot_open(tmp_path, content, suffix, fragment):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(content)
    with pytest.raises(BnexportError, match=fragment):
        view.check_model(bad)
    assert_one_line_error(run_cli("view", bad, "--no-browser"), f"bad{suffix}", fragment)


def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("view", tmp_path / "gone.onnx", "--no-browser"), "gone.onnx", "not found")


def test_port_in_use_is_one_line(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_bnexport("view", tiny_run / "model.onnx", "--port", port, "--no-browser")
    assert_one_line_error(result, f"127.0.0.1:{port}", "already in use")


def test_command_prints_urls_and_stops_on_ctrl_c(tiny_run):
    port = consecutive_free_ports(2)
    process = subprocess.Popen(
        [sys.executable, "-m", "bnexport", "view", tiny_run / "model.onnx", tiny_run / "model.folded.onnx",
         "--port", str(port), "--no-browser"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].strip() == f"serving {tiny_run / 'model.onnx'} at http://127.0.0.1:{port}/"
        assert lines[1].strip() == f"serving {tiny_run / 'model.folded.onnx'} at http://127.0.0.1:{port + 1}/"
        assert lines[2].strip() == "Ctrl-C stops"
        assert b"model.folded.onnx" in fetch(f"http://127.0.0.1:{port + 1}/")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped" in stdout and "Traceback" not in stderr
    assert view.port_is_free(port) and view.port_is_free(port + 1)


def netron_node_count(page, url: str, op_type: str) -> tuple[int, int]:
    """(all nodes, nodes showing op_type) in Netron's rendered graph."""
    page.goto(url)
    accept = page.get_by_text("Accept", exact=True)
    accept.wait_for(timeout=15_000)
    accept.click()  # the cookie notice comes first
    page.wait_for_selector("#canvas g.node", timeout=30_000)
    return page.locator("#canvas g.node").count(), page.locator("#canvas g.node", has_text=op_type).count()


@pytest.mark.browser
def test_netron_shows_batchnorm_only_before_folding(served):
    with chromium_page() as (page, _console):
        unfolded = netron_node_count(page, served[0].url, "BatchNormalization")
        folded = netron_node_count(page, served[1].url, "BatchNormalization")
    assert unfolded[1] == 1 and folded[1] == 0
    assert folded[0] == unfolded[0] - 1  # the fold removed the BN node and nothing else


def test_a_child_that_hangs_before_it_is_ready_times_out(tiny_run, monkeypatch):
    monkeypatch.setattr(view, "_CHILD", "import time; time.sleep(60)")
    monkeypatch.setattr(view, "START_TIMEOUT_S", 1.0)
    with pytest.raises(BnexportError, match="Netron could not serve .*no answer within 1 s"):
        view.start([tiny_run / "model.onnx"], port=0)


def test_a_run_folder_serves_its_two_onnx_files(tiny_run, tmp_path):
    assert view.models_to_serve([tiny_run]) == [tiny_run / "model.onnx", tiny_run / "model.folded.onnx"]
    (tmp_path / "b.onnx").write_bytes(b"")
    (tmp_path / "a.onnx").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert view.models_to_serve([tmp_path, tiny_run / "model.onnx"]) == [tmp_path / "a.onnx", tmp_path / "b.onnx",
                                                                          tiny_run / "model.onnx"]
    port = consecutive_free_ports(2)
    process = subprocess.Popen([sys.executable, "-m", "bnexport", "view", tiny_run, "--port", str(port), "--no-browser"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines == [f"serving {tiny_run / 'model.onnx'} at http://127.0.0.1:{port}/",
                         f"serving {tiny_run / 'model.folded.onnx'} at http://127.0.0.1:{port + 1}/"]
        served = fetch(f"http://127.0.0.1:{port + 1}/data/model.folded.onnx")
        assert hashlib.sha256(served).digest() == hashlib.sha256((tiny_run / "model.folded.onnx").read_bytes()).digest()
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0


def test_a_folder_without_onnx_files_is_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert_one_line_error(run_cli("view", tmp_path, "--no-browser"), str(tmp_path), "no ONNX file", "model.onnx")
