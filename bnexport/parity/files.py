"""``compare_files``: two models, ONNX files, bnexport checkpoints or model specs, compared on the same seeded input."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..config import DEFAULT_SEED
from ..errors import BnexportError
from .compare import ParityReport, run_parity, tolerance_given
from .inputs import seeded_feeds
from .runners import runner_for
from .sources import coarsest_dtype, load_source, names_a_spec, parity_feeds


def compare_files(
    reference: str | Path,
    candidate: str | Path,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    atol: float | None = None,
    rtol: float | None = None,
    weights: str | Path | None = None,
) -> ParityReport:
    """Run both models on seeded values for every input, each of its own dtype, and compare every output.

    The inputs are the first ONNX model's (``parity_feeds``), shaped by ``input_shapes`` as
    ``bnexport.parity.inputs.input_feeds`` takes them. ONNX runs in ONNX Runtime with graph
    optimisations off, a checkpoint or a model spec as its eager module. The tolerance is the coarser
    model dtype's (``bnexport.config.tolerance_for``), with ``atol`` and ``rtol`` where given.
    ``weights`` fills the model of each model spec (``bnexport.model_spec.load_model``), which is
    otherwise seeded with ``seed``.
    """
    specs = [names_a_spec(path) for path in (reference, candidate)]
    if weights is not None and not any(specs):
        raise BnexportError(f"--weights {weights}: neither {reference} nor {candidate} is a model spec; "
                            "--weights fills the model of one, such as torchvision:NAME or path/to/file.py:callable")
    reference_source, candidate_source = (
        load_source(path, needs_input_shape=False, weights=weights if spec else None, seed=seed)
        for path, spec in zip((reference, candidate), specs))
    feeds = parity_feeds(reference_source, candidate_source, input_shapes)
    tolerance = tolerance_given(coarsest_dtype(reference_source, candidate_source), atol=atol, rtol=rtol)
    return run_parity(runner_for(reference_source), {str(candidate): runner_for(candidate_source)},
                      seeded_feeds(feeds, seed=seed), reference_name=str(reference), seed=seed, tolerance=tolerance,
                      described=[feed.to_json() for feed in feeds])
