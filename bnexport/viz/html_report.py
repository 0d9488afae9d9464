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
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]], *, numeric: set[int] = frozenset(),
           css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            classes = " ".join(c for c in ("num" if i in numeric else "", cell.css if isinstance(cell, Mark) else "") if c)
            attr = f' class="{classes}"' if classes else ""
            cells.append(f"<td{attr}>{_e(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    attr = f' class="{css}"' if css else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def render_report(*, figures, health, effects, config: dict, dataset: dict, history, parity: dict, fold: dict,
                  summary: dict | None, onnx_files: list[Path]) -> str:
    """The page as a string; ``write_report`` saves it."""
    from .. import __version__

    accuracy = history.test_accuracy[-1] if history.test_accuracy else None
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>bnexport report: {_e(dataset['name'])}, {_percent(accuracy)}</title>",
             f"<style>{STYLE}</style></head><body>",
             "<h1>bnexport report</h1>",
             f"<p class='lead'>SimpleCNN on <b>{_e(dataset['name'])}</b> "
             f"({'×'.join(map(str, dataset['image_shape']))}, {dataset['train_size']} train / {dataset['test_size']} test), "
             f"{len(history.test_accuracy)} epochs, test accuracy <b>{_percent(accuracy)}</b>; "
             f"BatchNorm {'on' if config.get('batch_norm', True) else 'off (--no-bn)'}; "
             f"parity {_e('pass' if parity.get('passed') else 'FAIL')}. bnexport {_e(__version__)}.</p>"]

    parts.append("<h2 id='run'>Run</h2>")
    parts.append(_table(("setting", "value"), [(k, v) for k, v in config.items()]))
    parts.append(_table(["epoch"] + [str(i + 1) for i in range(len(history.test_accuracy))],
                        [["test accuracy"] + [_percent(a) for a in history.test_accuracy]]))
    if summary:
        seconds = summary.get("stage_seconds", {})
        if seconds:
            parts.append(_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in seconds.items()], numeric={1}))
        versions = summary.get("versions", {})
        if versions:
            parts.append("<p>Library versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()) + "</p>")

    parts.append("<h2 id='batchnorm-effect'>With and without BatchNorm</h2>")
    if len(effects) > 1:
        parts.append("<p>The same seed, data order, augmentation and hyperparameters, trained once with BatchNorm "
                     "and once without. Measured on this run:</p>")
    else:
        parts.append("<p>Only one run: <code>train-and-export --skip-no-bn</code> skips the twin run with BatchNorm "
                     "switched, or this checkpoint came from <code>train</code>.</p>")
    parts.append(_table(
        ("run", "test accuracy after epoch 1", "final test accuracy", f"steps to {effects[0].target:.0%}" if effects else "steps",
         "steps in all", "training seconds"),
        [(e.label, _percent(e.accuracy_after_epoch_1), _percent(e.final_accuracy),
          e.steps_to_target if e.steps_to_target is not None else "not reached", e.total_steps,
          "n/a" if e.train_seconds is None else f"{e.train_seconds:.1f}") for e in effects],
        numeric={1, 2, 3, 4, 5}, css="effect"))
    if len(effects) > 1:
        parts.append(f"<p>{_e(_effect_sentence(effects))}</p>")

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
                         record.get("folded_into_module") or record.get("folded_into") or record.get("reason") or ""))
    if rows:
        parts.append(_table(("graph", "BatchNorm", "ONNX node", "status", "folded into / reason kept"), rows, css="folding"))
    else:
        parts.append("<p>No BatchNorm layers: nothing to fold.</p>")

    parts.append("<h2 id='bn-health'>BatchNorm health</h2>")
    if health:
        parts.append("<p>Dead: |γ| ≤ 1e-5 or running variance ≤ ε. Float16: a folded weight or bias that is infinite "
                     "in float16, or that float16 held before the fold and rounds to 0 after it.</p>")
        parts.append(_table(
            ("BN layer", "channels", "folds into", "|γ/√(σ²+ε)| min – max", "dead channels", "float16 overflow",
             "float16 underflow", "verdict"),
            [(h.name, h.channels, h.folds_into or "(no conv before it)",
              f"{min(abs(s) for s in h.scale):.3g} – {max(abs(s) for s in h.scale):.3g}",
              _indices(h.dead), _indices(h.fp16_overflow), _indices(h.fp16_underflow),
              _verdict(h.healthy, "healthy", "check")) for h in health],
            numeric={1}, css="health"))
    else:
        parts.append("<p>This model has no BatchNorm layers.</p>")

    parts.append("<h2 id='figures'>Figures</h2>")
    for figure in figures:
        css = " class='tall'" if "graph" in figure.file else ""
        parts.append(f"<figure{css} id='{_e(Path(figure.file).stem)}'><img src='{_e(figure.file)}' alt='{_e(figure.title)}'>"
                     f"<figcaption><b>{_e(figure.title)}.</b> {_e(figure.caption)}</figcaption></figure>")

    parts.append("<h2 id='netron'>Open the graphs in Netron</h2>")
    parts.append("<p>From the folder this run was started in (<code>python -m bnexport view …</code> works the "
                 "same); the server listens on 127.0.0.1 only, and Ctrl-C stops it:</p>")
    parts.append("<pre>" + "\n".join(_e(c) for c in view_commands(onnx_files)) + "</pre>")
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
