"""The README's Python API examples run as written, on a real run's artifacts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_python_api_examples_run(tiny_run, tmp_path, monkeypatch):
    examples = api_examples()
    assert len(examples) >= 3, "the Python API section lost its examples"
    (tmp_path / "artifacts").symlink_to(tiny_run)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for example in (e for e in examples if not e.startswith("# test_")):
        exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - our own README

    # the files the examples wrote are what they say: BatchNorm gone, same numbers as the checkpoint's model
    folded = onnx.load("model.folded.onnx")
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(tiny_run / "model.onnx").graph.node) == 1
    program = torch.export.load("folded.pt2").module()
    batch = np.random.default_rng(1).standard_normal((3, 1, 28, 28), dtype=np.float32)
    from bnexport.train.loop import load_checkpoint, model_from_checkpoint

    eager, _ = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"))
    eager.eval()
    with torch.no_grad():
        expected = eager(torch.from_numpy(batch)).numpy()
        got = program(torch.from_numpy(batch)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def ci_example() -> str:
    examples = [e for e in api_examples() if e.startswith("# test_")]
    assert len(examples) == 1, "the README's CI example (a block starting '# test_...py') is missing"
    return examples[0]


def test_ci_example_runs_verbatim_under_pytest(tmp_path):
    example = ci_example()
    (tmp_path / example.splitlines()[0][2:].strip()).write_text(example)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
