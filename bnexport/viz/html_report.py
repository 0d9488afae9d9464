"""report.html: one self-standing page built from the run's JSON results and its figures.

No script, no stylesheet or font from elsewhere: the page opens from the file system, and
its images are the files in ``figures/`` beside it. Every table is a view of a result that
also exists as JSON, so the page never states a number the artifacts do not hold.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Iterable
from pathlib import Path

from ..artifacts import atomic_write
from ..config import ARTIFACTS
from ..fold.fold_report import describe_decision
from .bn_params import DRIFT_FLAG, PROBLEMS, by_severity

STYLE = """
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1e7b34; font-weight: bold; } .bad { color: #b22222; font-weight: bold; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figure.tall { max-height: 1400px; overflow: auto; border: 1px solid #eee; }
figure.tall img { max-width: none; }
figcaption { font-size: .9rem; color: #444; margin-top: .3rem; }
code, pre { background: #f6f6f6; padding: .1rem .3rem; } pre { padding: .6rem; overflow-x: auto; }
.lead { color: #444; }
table.health td { white-space: nowrap; } td.detail { font-weight: bold; }
div.scroll { max-height: 40rem; overflow: auto; border: 1px solid #eee; }
table.summary td:first-child { font-weight: bold; white-space: nowrap; }
details > summary { cursor: pointer; margin: .4rem 0; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Iterable[str] | None, rows: Iterable[Iterable[object]], *, numeric: set[int] = frozenset(),
           css: str = "") -> str:
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            classes = " ".join(c for c in ("num" if i in numeric else "", cell.css if isinstance(cell, Mark) else "") if c)
            attr = f' class="{classes}"' if classes else ""
            cells.append(f"<td{attr}>{_e(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    attr = f' class="{css}"' if css else ""
    return f"<table{attr}>{head}<tbody>{''.join(body)}</tbody></table>"


class Mark(str):
    """A table cell with a CSS class: a verdict shown in green or red."""

    css = ""

    def __new__(cls, text: str, css: str):
        obj = super().__new__(cls, text)
        obj.css = css
        return obj


def _verdict(passed: bool, good: str = "ok", bad: str = "FAIL") -> Mark:
    return Mark(good, "ok") if passed else Mark(bad, "bad")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _indices(values: list[int], limit: int = 12) -> str:
    if not values:
        return "none"
    shown = ", ".join(map(str, values[:limit]))
    return f"{len(values)}: {shown}{' …' if len(values) > limit else ''}"


def view_commands(onnx_files: list[Path]) -> list[str]:
    """The commands that open each ONNX file in Netron, and all of them at once."""
    commands = [f"bnexport view {shlex.quote(str(path))}" for path in onnx_files]
    if len(onnx_files) > 1:
        commands.append("bnexport view " + " ".join(shlex.quote(str(path)) for path in onnx_files))
    return commands


def _bytes(size: int) -> str:
    for unit, step in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= step:
            return f"{size / step:.1f} {unit}"
    return f"{size} B"


def folding_gains(bench: dict | None) -> list[str]:
    """One line per runtime and batch size that bench timed both unfolded and folded: what the fold bought.

    Reads ``BenchReport.to_json()`` (runner names with "unfolded" and "folded" in them) and
    ``bench.time_kept_against_folded``'s result (``export``'s summary); anything else gives no
    lines, so the report never guesses."""
    lines = []
    for runtime, timing in ((bench or {}).get("runtimes") or {}).items():
        before, after = (timing or {}).get("kept_ms"), (timing or {}).get("folded_ms")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after > 0:
            lines.append(f"{runtime}: {before:.3g} ms → {after:.3g} ms per call on the parity input "
                         f"({before / after:.2f}× {'faster' if before >= after else 'as fast'}, median of "
                         f"{timing.get('runs', '?')} calls each)")
    timings = (bench or {}).get("timings") or []
    found = {(t.get("name"), t.get("batch")): t for t in timings if isinstance(t, dict)}
    for (name, batch), unfolded in found.items():
        if not isinstance(name, str) or "unfolded" not in name:
            continue
        folded = found.get((name.replace("unfolded", "folded"), batch))
        before, after = unfolded.get("median_ms"), (folded or {}).get("median_ms")
        if not (isinstance(before, (int, float)) and isinstance(after, (int, float)) and after > 0):
            continue
        runtime = " ".join(name.replace("unfolded", "").split())
        lines.append(f"{runtime}, batch {batch}: {before:.3g} ms → {after:.3g} ms per call "
                     f"({before / after:.2f}× {'faster' if before >= after else 'as fast'})")
    return lines


def _fold_counts(fold: dict) -> list[tuple[str, str]]:
    rows = []
    for source, label in (("onnx", f"{ARTIFACTS.onnx_folded} (ONNX fold)"), ("torch", "folded module (torch fold)")):
        report = fold.get(source)
        if report:
            total = report.get("batchnorm_total", len(report.get("records", [])))
            rows.append((label, f"{report.get('folded', 0)} of {total} folded, {report.get('kept', 0)} kept"))
    return rows


def _health_line(health, drift_measured: bool) -> str:
    if not health:
        return "no BatchNorm layers"
    said = dict(zip(PROBLEMS, ("with dead channels", "with float16 overflow", "with float16 underflow", "drifting")))
    counts = [(problem, sum(problem in layer.problems for layer in health)) for problem in PROBLEMS]
    flagged = ", ".join(f"{n} {said[problem]}" for problem, n in counts if n)
    measured = "" if drift_measured else " (drift not measured)"
    return f"{len(health)} layer{'s' if len(health) != 1 else ''}: " + (flagged or "all healthy") + measured


DRIFT_DEFINITION = (
    "Running-stat drift is measured {on}. For channel c, with μ_batch and σ²_batch the mean and (biased) variance of "
    "the layer's input over the batch and every position (what train mode normalises with), and μ_running, "
    "σ²_running the running statistics the export normalises with: mean shift δ = |μ_batch − μ_running| / "
    "√(σ²_running + ε) and variance ratio v = (σ²_batch + ε) / (σ²_running + ε). A layer's drift is the largest "
    "max(δ, |log₂ v|) over its channels: 1 means some channel's batch mean sits one running σ away, or its variance "
    "is half or double the running one. A drift of {flag:g} or more flags the layer.")
SEVERITY_ORDER = (
    "Rows are sorted by severity, worst first: dead channels (verdict \"dead\") > float16 overflow > float16 "
    "underflow > running-stat drift ≥ {flag:g} (\"drift\") > healthy. Within a class, more affected channels first, "
    "then the larger drift (for drift alone: the larger drift first); ties keep module order. The fold scale is "
    "|γ/√(σ²+ε)|, the factor a fold multiplies the layer's weights by.")


def render_report(*, figures, health, detail: dict[str, str], effects, parity: dict, fold: dict,
                  summary: dict | None, training: dict | None, figure_data: str, synthetic: bool,
                  file_sizes: dict[str, int], parameters: int, model_class: str, onnx_files: list[Path]) -> str:
    """The page as a string; ``write_report`` saves it.

    ``training`` is None for a model exported as given; for a train-and-export run it holds
    the run's ``config`` and ``dataset`` (as JSON) and its ``history``.
    """
    from .. import __version__

    summary = summary or {}
    described = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    history = training["history"] if training else None
    dataset = training.get("dataset") if training else None
    config = training.get("config", {}) if training else {}
    accuracy = history.test_accuracy[-1] if history and history.test_accuracy else None
    passed = bool(parity.get("passed"))
    if training and dataset:
        subject = f"{dataset['name']}, {_percent(accuracy)}"
        lead = (f"SimpleCNN on <b>{_e(dataset['name'])}</b> "
                f"({'×'.join(map(str, dataset['image_shape']))}, {dataset['train_size']} train / "
                f"{dataset['test_size']} test), {len(history.test_accuracy)} epochs, test accuracy "
                f"<b>{_percent(accuracy)}</b>; BatchNorm {'on' if config.get('batch_norm', True) else 'off (--no-bn)'}")
    else:
        name = described.get("spec") or described.get("class") or model_class
        subject = str(name)
        weights = ("random weights" if described.get("random_weights") or not described.get("weights")
                   else f"weights from {described['weights']}")
        lead = f"<b>{_e(name)}</b> ({_e(weights)}), exported as given: no training"
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>bnexport report: {_e(subject)}</title>",
             f"<style>{STYLE}</style></head><body>",
             "<h1>bnexport report</h1>",
             f"<p class='lead'>{lead}; parity {_e('pass' if passed else 'FAIL')}. bnexport {_e(__version__)}.</p>"]

    parts.append("<h2 id='summary'>Summary</h2>")
    rows: list[tuple[str, object]] = []
    rows.append(("model", described.get("class") or model_class))
    rows.append(("parameters", f"{described.get('parameters', parameters):,}"))
    inputs = summary.get("inputs") or {i.get("name", "input"): i.get("shape") for i in parity.get("inputs", [])}
    if inputs:
        rows.append(("inputs", ", ".join(f"{k} {'×'.join(map(str, v)) if isinstance(v, list) else v}"
                                         for k, v in inputs.items())))
    if training:
        epochs = len(history.test_accuracy) if history else 0
        rows.append(("training", f"{epochs} epoch{'s' if epochs != 1 else ''} on {dataset['name'] if dataset else '?'}, "
                                 f"test accuracy {_percent(accuracy)}"))
    else:
        rows.append(("training", "none: the model was exported as given, so there are no training curves, no running "
                                 "statistics recorded during training and no comparison with and without BatchNorm"))
    layers = summary.get("batchnorm_layers")
    rows.append(("BatchNorm layers", str(layers if layers is not None else len(health))))
    rows += [(f"BatchNorm in the {label}", counts) for label, counts in _fold_counts(fold)]
    rows.append(("parity", _verdict(passed, "pass", "FAIL")))
    rows.append(("BatchNorm health", _health_line(health, any(h.drift is not None for h in health))))
    if file_sizes:
        rows.append(("file sizes", ", ".join(f"{name} {_bytes(size)}" for name, size in file_sizes.items())))
    gains = folding_gains(summary.get("bench"))
    if gains:
        rows.append(("what folding bought (bench)", "; ".join(gains)))
    rows.append(("figures drawn on", figure_data + (" — synthetic input: the activation figures and the drift "
                                                    "column describe this synthetic data, not real data"
                                                    if synthetic else "")))
    parts.append(_table(None, rows, css="summary"))

    if training:
        parts.append("<h2 id='batchnorm-effect'>With and without BatchNorm</h2>")
        if len(effects) > 1:
            parts.append("<p>The same seed, data order, augmentation and hyperparameters, trained once with BatchNorm "
                         "and once without. Measured on this run:</p>")
        else:
            parts.append("<p>Only one run: <code>train-and-export --skip-no-bn</code> skips the twin run with "
                         "BatchNorm switched, or this checkpoint came from <code>train</code>.</p>")
        parts.append(_table(
            ("run", "test accuracy after epoch 1", "final test accuracy",
             f"steps to {effects[0].target:.0%}" if effects else "steps", "steps in all", "training seconds"),
            [(e.label, _percent(e.accuracy_after_epoch_1), _percent(e.final_accuracy),
              e.steps_to_target if e.steps_to_target is not None else "not reached", e.total_steps,
              "n/a" if e.train_seconds is None else f"{e.train_seconds:.1f}") for e in effects],
            numeric={1, 2, 3, 4, 5}, css="effect"))
        if len(effects) > 1:
            parts.append(f"<p>{_e(_effect_sentence(effects))}</p>")

    parts.append("<h2 id='bn-health'>BatchNorm health</h2>")
    if health:
        on = f"on {figure_data}"
        if synthetic:
            on += (" — synthetic input, so the drift reflects how that synthetic data differs from the data the "
                   "running statistics were gathered on, not a fault of the model")
        random = (" The weights are random, so the running statistics are still their initial values (mean 0, "
                  "variance 1) and the drift says nothing about a trained model." if described.get("random_weights")
                  else "")
        parts.append("<p>Dead: |γ| ≤ 1e-5 or running variance ≤ ε. Float16: a folded weight or bias that is infinite "
                     "in float16, or that float16 held before the fold and rounds to 0 after it. "
                     f"{_e(DRIFT_DEFINITION.format(on=on, flag=DRIFT_FLAG))}{_e(random)}</p>")
        drawn = "; ".join(f"{name} ({why})" for name, why in detail.items())
        parts.append(f"<p>{_e(SEVERITY_ORDER.format(flag=DRIFT_FLAG))} In bold, the layers the figures draw channel "
                     f"by channel: {_e(drawn)}.</p>")
        table = _table(
            ("BN layer", "channels", "folds into", "fold scale min – max", "dead channels", "float16 overflow",
             "float16 underflow", "max δ", "v min – max", "drift", "verdict"),
            [(Mark(h.name, "detail") if h.name in detail else h.name, h.channels, h.folds_into or "(no conv before it)",
              f"{min(abs(s) for s in h.scale):.3g} – {max(abs(s) for s in h.scale):.3g}",
              _indices(h.dead), _indices(h.fp16_overflow), _indices(h.fp16_underflow),
              "n/a" if h.mean_shift is None else f"{max(h.mean_shift, default=0.0):.3g}",
              "n/a" if h.variance_ratio is None else
              f"{min(h.variance_ratio, default=1.0):.3g} – {max(h.variance_ratio, default=1.0):.3g}",
              "not measured" if h.drift is None else f"{h.drift:.3g}",
              _verdict(h.healthy, "healthy", h.verdict)) for h in by_severity(health)],
            numeric={1, 7, 9}, css="health")
        parts.append(f"<div class='scroll'>{table}</div>" if len(health) > 20 else table)
    else:
        parts.append("<p>This model has no BatchNorm layers.</p>")

    parts.append("<h2 id='parity'>Parity</h2>")
    parts.append(f"<p>Reference: {_e(parity.get('reference'))}; input {_e(parity.get('input_shape'))}, seed "
                 f"{_e(parity.get('seed'))}. A comparison passes when max|Δ| ≤ atol + rtol·max|reference|.</p>")
    parts.append(_table(
        ("comparison", "max |Δ|", "mean |Δ|", "threshold", "max |Δ| / scale", "top-1 agreement", "verdict"),
        [(r["name"], _sci(r["max_abs"]), _sci(r["mean_abs"]), _sci(r["atol"] + r["rtol"] * r["scale"]),
          _sci(r["max_rel"]), f"{r['top1_agreement']:.1%}", _verdict(bool(r["passed"]))) for r in parity["results"]],
        numeric={1, 2, 3, 4, 5}, css="parity"))

    parts.append("<h2 id='folding'>Folded layers</h2>")
    rows = []
    for source in ("torch", "onnx"):
        for record in fold.get(source, {}).get("records", []):
            # fold.json files written before module paths were recorded show the node names, as they did
            rows.append((source, record.get("module") or record["batchnorm"], record["batchnorm"] if source == "onnx" else "",
                         _verdict(record["status"] == "folded", "folded", "kept"),
                         describe_decision(record)))
    if rows:
        table = _table(("graph", "BatchNorm", "ONNX node", "status", "folded into / reason kept"), rows, css="folding")
        if len(rows) > 40:
            counts = "; ".join(f"{label}: {text}" for label, text in _fold_counts(fold))
            table = f"<details><summary>{len(rows)} records ({_e(counts)})</summary>{table}</details>"
        parts.append(table)
    else:
        parts.append("<p>No BatchNorm layers: nothing to fold.</p>")

    parts.append("<h2 id='figures'>Figures</h2>")
    for figure in figures:
        css = " class='tall'" if "graph" in figure.file else ""
        parts.append(f"<figure{css} id='{_e(Path(figure.file).stem)}'><img src='{_e(figure.file)}' alt='{_e(figure.title)}'>"
                     f"<figcaption><b>{_e(figure.title)}.</b> {_e(figure.caption)}</figcaption></figure>")

    parts.append("<h2 id='netron'>Open the graphs in Netron</h2>")
    parts.append("<p>From the folder this run was started in (<code>python -m bnexport view …</code> works the "
                 "same); the server listens on 127.0.0.1 only, and Ctrl-C stops it:</p>")
    parts.append("<pre>" + "\n".join(_e(c) for c in view_commands(onnx_files)) + "</pre>")

    parts.append("<h2 id='run'>Run details</h2>")
    parts.append("<details><summary>Configuration, time per stage and library versions</summary>")
    if training:
        parts.append(_table(("setting", "value"), [(k, v) for k, v in config.items()], css="config"))
        if history:
            parts.append(_table(["epoch"] + [str(i + 1) for i in range(len(history.test_accuracy))],
                                [["test accuracy"] + [_percent(a) for a in history.test_accuracy]]))
    elif described:
        parts.append(_table(("setting", "value"), [(k, v) for k, v in described.items()], css="config"))
    seconds = summary.get("stage_seconds") or {}
    if seconds:
        parts.append(_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in seconds.items()], numeric={1}))
    versions = summary.get("versions") or {}
    if versions:
        parts.append("<p>Library versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()) + "</p>")
    parts.append("</details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _effect_sentence(effects) -> str:
    with_bn = next((e for e in effects if e.batch_norm), None)
    without = next((e for e in effects if not e.batch_norm), None)
    if not (with_bn and without):
        return ""
    parts = []
    if with_bn.accuracy_after_epoch_1 is not None and without.accuracy_after_epoch_1 is not None:
        parts.append(f"After one epoch, test accuracy is {with_bn.accuracy_after_epoch_1:.1%} with BatchNorm and "
                     f"{without.accuracy_after_epoch_1:.1%} without.")
    def reach(e):
        return f"{e.steps_to_target} steps" if e.steps_to_target is not None else f"not within {e.total_steps} steps"
    parts.append(f"{with_bn.target:.0%} test accuracy is reached after {reach(with_bn)} with BatchNorm and "
                 f"{reach(without)} without.")
    return " ".join(parts)


def write_report(out: Path, **content) -> Path:
    text = render_report(**content)
    return atomic_write(out / ARTIFACTS.report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
