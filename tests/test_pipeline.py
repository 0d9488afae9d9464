"""The export's stage bar, and what its timing of BatchNorm kept against folded reuses from parity."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnexport import pipeline
from bnexport.config import ARTIFACTS, SUMMARY_BENCH_RUNS
from bnexport.model_spec import LoadedModel
from bnexport.pipeline import EXPORT_STAGES, StageBar, export_model

STAGES = ("check input", *EXPORT_STAGES, "bench", "figures")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def frames(stream: io.StringIO) -> list[str]:
    """What a terminal shows in turn: each redraw starts with a carriage return."""
    return [frame.strip() for frame in stream.getvalue().split("\r") if frame.strip()]


def test_stage_bar_shows_each_stage_in_turn_with_the_stages_done_before_it():
    terminal = Terminal()
    bar = StageBar(STAGES, progress=True, file=terminal)
    for stage in STAGES:
        bar.start(stage)
    bar.close()
    shown = [(frame.split()[0], frame.split(" |")[0].split(maxsplit=1)[1].strip()) for frame in frames(terminal)]
    assert list(dict.fromkeys(shown)) == [(f"{done}/{len(STAGES)}", stage) for done, stage in enumerate(STAGES)]
    assert terminal.getvalue().endswith("\r")  # and the line is cleared for the command's own output


@pytest.mark.parametrize("progress, stream", [(True, io.StringIO()), (False, Terminal())], ids=["pipe", "quiet"])
def test_stage_bar_writes_nothing_to_a_pipe_or_when_quiet(progress, stream):
    bar = StageBar(STAGES, progress=progress, file=stream)
    for stage in STAGES:
        bar.start(stage)
    bar.close()
    assert stream.getvalue() == ""


class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, stages, *, progress, file=None):
        self.stages, self.started, self.closed = stages, [], False
        RecordingBar.made.append(self)

    def start(self, stage):
        assert not self.closed
        self.started.append(stage)

    def close(self):
        self.closed = True


class NoFigures:
    def descriptions(self) -> dict:
        return {}


@pytest.fixture
def tiny_export(monkeypatch, tmp_path):
    """export_model on a Conv→BN→ReLU model, with the figures left out and every ONNX Runtime session counted."""
    import bnexport.viz.visualize as figures

    monkeypatch.setattr(figures, "VisualizeInputs", lambda **held: held, raising=False)
    monkeypatch.setattr(figures, "visualize", lambda out, **options: NoFigures())
    monkeypatch.setattr(pipeline, "StageBar", RecordingBar)
    RecordingBar.made = []
    sessions = []
    real_runner = pipeline.onnxruntime_runner

    def counted_runner(path, **options):
        sessions.append((path.name, options.get("optimize")))
        return real_runner(path, **options)

    monkeypatch.setattr(pipeline, "onnxruntime_runner", counted_runner)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    loaded = LoadedModel(module, "tiny", ("x",))

    def run(**options):
        out = tmp_path / f"out{len(RecordingBar.made)}"
        return export_model(loaded, {"x": (1, 3, 8, 8)}, out, **options), out

    return run, sessions


def test_one_bar_takes_export_through_every_stage_in_order(tiny_export):
    run, _ = tiny_export
    run(bench=True)
    run(bench=False)
    with_bench, without_bench = RecordingBar.made
    assert with_bench.started == list(STAGES) and with_bench.closed
    assert without_bench.started == [stage for stage in STAGES if stage != "bench"] and without_bench.closed


def test_the_timing_reuses_the_sessions_parity_checked(tiny_export):
    run, sessions = tiny_export
    (summary, parity, _), out = run(bench=True)
    assert parity.passed
    # parity's four sessions (two files, optimisations off and on) and none more for the timing
    assert sorted(sessions) == sorted((name, optimize) for name in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded)
                                      for optimize in (False, True))
    timed = summary.bench["runtimes"]
    assert set(timed) == {"eager", "ONNX Runtime"}
    assert all(t["runs"] >= SUMMARY_BENCH_RUNS and t["kept_ms"] > 0 and t["folded_ms"] > 0 for t in timed.values())
    # the published files run as ONNX Runtime's own fresh sessions say they should
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    kept, folded = (ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                    for name in (ARTIFACTS.onnx, ARTIFACTS.onnx_folded))
    np.testing.assert_allclose(folded.run(None, {"x": x})[0], kept.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modules, nodes, folded, shown", [
    (1, 2, 2, "2 of 2 in model.onnx, from 1 BatchNorm module"),  # one BN called twice
    (2, 1, 1, "1 of 1 in model.onnx, from 2 BatchNorm modules"),  # a BN the forward never calls
    (3, 3, 2, "2 of 3"),
])
def test_summary_counts_the_folded_batchnorms_against_the_graph_they_were_folded_in(modules, nodes, folded, shown):
    summary = pipeline.RunSummary(batchnorm_layers=modules, batchnorm_folded=folded,
                                  onnx_ops={ARTIFACTS.onnx: {"Conv": 1, "BatchNormalization": nodes}})
    row = next(line for line in summary.table().splitlines() if line.startswith("BatchNorm folded"))
    assert row.split(maxsplit=2)[2].strip() == shown
