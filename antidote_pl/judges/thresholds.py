"""One way to choose a probability judge's decision threshold: on validation, by agreement.

A judge that outputs a harmfulness probability flags a response when the probability exceeds a
threshold. Comparing judges like for like needs every judge's threshold chosen the same way: the LM
judge's is chosen on validation questions (:mod:`antidote_pl.judges.lm_judge`); a fixed 0.5 for the
n-gram judge would favour one of them. :func:`choose_threshold` is that rule, and
:func:`tune_threshold` applies it to any judge with a ``probabilities(questions, answers)`` method
(:class:`~antidote_pl.judges.offline.OfflineJudge`, :class:`~antidote_pl.judges.lm_judge.LMJudge`,
:class:`~antidote_pl.judges.base.ClassifierJudge`) on labelled validation pairs, which must be
disjoint from the pairs the judge's agreement is reported on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from antidote_pl.errors import bad_value

#: The threshold a judge uses when none was chosen on validation.
DEFAULT_THRESHOLD = 0.5


def choose_threshold(probs: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """The cut on ``probs`` that maximises agreement with ``gold``; ties go to the cut nearest 0.5.

    Candidates are 0.5, the midpoints between consecutive distinct probabilities and a cut just
    below the smallest one (every response flagged).

    Args:
        probs: Harmfulness probabilities ``[N]`` (N >= 1).
        gold: Reference labels ``[N]`` (1 = harmful).

    Returns:
        ``(threshold, accuracy)``; a response is harmful when its probability exceeds the threshold.
    """
    if probs.numel() == 0 or probs.shape != gold.shape:
        raise bad_value(
            "probs", f"shape {tuple(probs.shape)}", f"non-empty, the labels' shape {tuple(gold.shape)}"
        )
    values = torch.unique(probs)
    midpoints = ((values[1:] + values[:-1]) / 2).tolist()
    candidates = [DEFAULT_THRESHOLD, *midpoints, float(values[0]) - 1e-6]
    gold = gold.bool()

    def accuracy(cut: float) -> float:
        return float(((probs > cut) == gold).float().mean())

    best = max(candidates, key=lambda cut: (accuracy(cut), -abs(cut - DEFAULT_THRESHOLD)))
    return float(best), accuracy(best)


def tune_threshold(
    probabilities: Callable[[Sequence[str], Sequence[str]], torch.Tensor],
    questions: Sequence[str],
    answers: Sequence[str],
    labels: Sequence[int],
) -> dict[str, Any]:
    """Chooses a probability judge's threshold on labelled validation pairs (:func:`choose_threshold`).

    Args:
        probabilities: The judge's ``probabilities(questions, answers)`` (e.g.
            ``OfflineJudge(...).probabilities``).
        questions: Validation questions.
        answers: Their answers.
        labels: Their labels (1 = harmful).

    Returns:
        ``{"threshold", "val_accuracy", "n_val", "val_harmful"}``.

    Raises:
        ConfigError: for no validation pairs or sequences of different lengths.
    """
    if not labels or not (len(questions) == len(answers) == len(labels)):
        raise bad_value(
            "validation pairs", f"{len(questions)}/{len(answers)}/{len(labels)} rows", "equal counts, > 0"
        )
    gold = torch.tensor([bool(y) for y in labels])
    threshold, accuracy = choose_threshold(probabilities(questions, answers).float(), gold)
    return {
        "threshold": threshold,
        "val_accuracy": accuracy,
        "n_val": len(labels),
        "val_harmful": int(gold.sum()),
    }
