"""Parity, element by element: every |Δ| of every comparison against its pass threshold.

parity.json keeps max, mean and median |Δ|; this figure shows the whole distribution, so
a comparison that passes with one outlier looks different from one that passes evenly.
Exact zeros cannot sit on a log axis; they are counted in each row's label instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import COLOR_BEFORE, COLOR_FLAG, message_figure, new_figure, save_figure


@dataclass
class Comparison:
    name: str
    abs_diff: np.ndarray  # |candidate − reference|, every element
    threshold: float  # atol + rtol·max|reference|
    passed: bool


def comparisons_from_outputs(parity: dict, outputs: dict[str, np.ndarray]) -> list[Comparison]:
    """Join parity.json's verdicts and thresholds with the raw outputs of parity_outputs.npz."""
    found = []
    for result in parity["results"]:
        if result["name"] not in outputs:
            continue
        # several outputs: "NAME [output i]" against "reference [output i]", not against output 0
        output = result["name"][result["name"].rfind(" ["):] if result["name"].endswith("]") else ""
        reference = np.asarray(outputs.get(f"reference{output}", outputs["reference"]), dtype=np.float64)
        diff = np.abs(np.asarray(outputs[result["name"]], dtype=np.float64) - reference).ravel()
        threshold = result["atol"] + result["rtol"] * result["scale"]
        found.append(Comparison(result["name"], diff, threshold, bool(result["passed"])))
    return found


def plot_parity(comparisons: list[Comparison], path: str | Path, *, reference: str = "reference") -> Path:
    """One row per comparison: every |Δ| as a dot on a log axis, and the threshold as a red bar."""
    title = "Parity: every output element's |Δ| against the pass threshold"
    if not comparisons:
        return message_figure(path, title, "No parity outputs to compare.")
    figure = new_figure(10, 0.55 * len(comparisons) + 1.8)
    axes = figure.add_subplot()
    nonzero = np.concatenate([c.abs_diff[c.abs_diff > 0] for c in comparisons] + [np.array([])])
    thresholds = np.array([c.threshold for c in comparisons])
    low = min(nonzero.min() if nonzero.size else 1e-9, thresholds.min()) / 3
    high = max(nonzero.max() if nonzero.size else 1e-9, thresholds.max()) * 3
    generator = np.random.default_rng(0)  # jitter only: the same data gives the same picture
    labels = []
    for row, comparison in enumerate(comparisons):
        values = comparison.abs_diff[comparison.abs_diff > 0]
        zeros = comparison.abs_diff.size - values.size
        y = row + generator.uniform(-0.25, 0.25, size=values.size)
        axes.plot(values, y, ".", markersize=2.5, alpha=0.5, color=COLOR_BEFORE if comparison.passed else COLOR_FLAG,
                  label="|Δ| of one output element" if row == 0 else None)
        axes.plot([comparison.threshold] * 2, [row - 0.38, row + 0.38], color=COLOR_FLAG, linewidth=2.2,
                  label="pass threshold: atol + rtol·max|ref|" if row == 0 else None)
        if values.size:
            axes.plot([values.max()] * 2, [row - 0.3, row + 0.3], color="black", linewidth=1.2,
                      label="max |Δ|" if row == 0 else None)
        verdict = "ok" if comparison.passed else "FAIL"
        labels.append(f"{comparison.name} [{verdict}]\n{zeros} of {comparison.abs_diff.size} exactly 0")
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    axes.set_yticks(range(len(comparisons)), labels, fontsize=7.5)
    axes.set_ylim(len(comparisons) - 0.5, -0.5)
    axes.set_xlabel(f"|candidate − {reference}| (log scale)")
    axes.set_title(title)
    axes.grid(axis="x", which="major", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3)
    return save_figure(figure, path)
