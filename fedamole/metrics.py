"""Scores: classification accuracy by the lowest mean token loss among candidate answers, and ROUGE-L F."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["accuracy_from_losses", "rouge_l", "mean_std"]

_SCORER = None


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


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure (``rouge-score``, with stemming) for each prediction/reference pair."""
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_SCORER.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation, ignoring NaN."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())
