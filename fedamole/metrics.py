"""Scores: classification accuracy by the lowest mean token loss among candidate answers, and ROUGE-L F.

ROUGE-L comes in two implementations, which give different numbers on the same text:
* ``"rouge"`` (the ``rouge`` package, 1.0.1): what the FedAMoLE authors report (rouge-l F, no stemming; an empty
  hypothesis scores 0 instead of raising). The default.
* ``"rouge-score"`` (Google's ``rouge-score``, with stemming): the common choice elsewhere, kept as an option.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["accuracy_from_losses", "rouge_l", "mean_std", "ROUGE_IMPLEMENTATIONS"]

ROUGE_IMPLEMENTATIONS = ("rouge", "rouge-score")
_SCORERS: dict = {}


def accuracy_from_losses(losses, labels: Sequence[int]) -> float:
    """Share of rows whose lowest-loss candidate is the label. losses [n, num_choices]; labels [n] ints."""
    losses = np.asarray(losses, dtype=np.float64)
    labels = np.asarray(labels)
    if losses.ndim != 2 or labels.shape != (losses.shape[0],):
        raise ValueError(f"losses must be [n, choices] and labels [n], got {losses.shape} and {labels.shape}")
    if losses.shape[0] == 0:
        raise ValueError("losses: need at least one example")
    if ((labels < 0) | (labels >= losses.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {losses.shape[1]}), got {labels.min()}..{labels.max()}")
    return float((losses.argmin(axis=1) == labels).mean())


def rouge_l(predictions: Sequence[str], references: Sequence[str], implementation: str = "rouge") -> list[float]:
    """ROUGE-L F-measure of each prediction/reference pair, by ``implementation`` (see the module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if implementation not in ROUGE_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {ROUGE_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "rouge-score":
        scorer = _scorer(implementation)
        return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return [_rouge_package_l(pred, ref) for pred, ref in zip(predictions, references)]


def _scorer(implementation: str):
    if implementation not in _SCORERS:
        if implementation == "rouge-score":
            from rouge_score import rouge_scorer

            _SCORERS[implementation] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        else:
            from rouge import Rouge

            _SCORERS[implementation] = Rouge(metrics=["rouge-l"])
    return _SCORERS[implementation]


def _rouge_package_l(prediction: str, reference: str) -> float:
    # The package raises ValueError on a hypothesis or reference with nothing left after its own sentence splitting
    # ("", ".", "   "); the authors score an empty generation 0, and a pair with nothing to match can score nothing
    # else. Any other error is not swallowed.
    try:
        return float(_scorer("rouge").get_scores(prediction, reference)[0]["rouge-l"]["f"])
    except ValueError as exc:
        if "empty" not in str(exc) and "at least 1 sentence" not in str(exc):
            raise
        return 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation, ignoring NaN."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())
