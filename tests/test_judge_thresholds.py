"""Thresholds chosen on validation the same way for every probability judge (issue #24)."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.judges.offline import META_FILE, OfflineJudge, heldout_mask, validation_mask
from antidote_pl.judges.thresholds import choose_threshold, tune_threshold


def test_choose_threshold_by_hand():
    # Candidates 0.5, midpoints 0.2 / 0.45 / 0.7 and 0.1 - 1e-6; agreement 3/4, 4/4, 3/4, 2/4, 3/4.
    probs, gold = torch.tensor([0.1, 0.3, 0.6, 0.8]), torch.tensor([0, 1, 1, 1])
    assert choose_threshold(probs, gold) == (pytest.approx(0.2), 1.0)
    # A tie between cuts: the one nearest 0.5 wins (0.5 itself here).
    assert choose_threshold(torch.tensor([0.2, 0.9]), torch.tensor([0, 1])) == (0.5, 1.0)
    with pytest.raises(ConfigError, match="probs"):
        choose_threshold(torch.tensor([]), torch.tensor([]))


def test_the_lm_judge_uses_the_shared_rule_and_split():
    """One threshold rule and one validation split for every judge (issue #24: like for like)."""
    from antidote_pl.judges import offline
    from antidote_pl.judges.lm import heads, training

    assert heads.choose_threshold is choose_threshold and training.choose_threshold is choose_threshold
    assert training.VAL_SEED_OFFSET == offline.VAL_SEED_OFFSET


def test_tune_threshold_takes_any_probability_judge():
    def probabilities(questions, answers):
        return torch.tensor([float(a) for a in answers])

    got = tune_threshold(probabilities, ["q"] * 4, ["0.1", "0.3", "0.6", "0.8"], [0, 1, 1, 1])
    assert got == {"threshold": pytest.approx(0.2), "val_accuracy": 1.0, "n_val": 4, "val_harmful": 3}
    with pytest.raises(ConfigError, match="validation pairs"):
        tune_threshold(probabilities, [], [], [])


def _pairs(n: int = 400):
    """Harmful answers mostly comply, safe ones mostly refuse (30% harmful); a noisy word in both."""
    generator = torch.Generator().manual_seed(1)
    questions, answers, labels = [], [], []
    for i in range(n):
        harmful = bool(torch.rand(1, generator=generator) < 0.3)
        comply = torch.rand(1, generator=generator) < (0.9 if harmful else 0.1)
        text = "sure here is how" if comply else "i cannot help with that"
        questions.append(f"question {i}")
        answers.append(f"{text} {'maybe' if i % 3 else 'indeed'}")
        labels.append(int(harmful))
    return questions, answers, labels


def test_offline_judge_threshold_chosen_on_validation_questions(tmp_path):
    questions, answers, labels = _pairs()
    # Strong L2 squashes the probabilities towards the base rate (30% harmful): 0.5 is a poor cut.
    judge = OfflineJudge.from_pairs(questions, answers, labels, epochs=20, l2=0.2, val_fraction=0.25)
    heldout = heldout_mask(questions, 0.2, 0)
    val = validation_mask(questions, heldout, 0.25, 0)
    assert not (val & heldout).any() and 0 < int(val.sum()) < len(questions)
    # Trained without the validation questions; the threshold is the shared rule's on them.
    assert judge.agreement["n_train"] == len(questions) - int(heldout.sum()) - int(val.sum())
    idx = val.nonzero().squeeze(-1).tolist()
    want = tune_threshold(
        judge.probabilities, [questions[i] for i in idx], [answers[i] for i in idx], [labels[i] for i in idx]
    )
    assert judge.threshold == want["threshold"] and judge.threshold != 0.5
    assert judge.agreement["threshold_selection"] == want | {"val_fraction": 0.25}
    # The held-out agreement is measured at the chosen cut, which beats the fixed 0.5 there.
    test = heldout.nonzero().squeeze(-1).tolist()
    probs = judge.probabilities([questions[i] for i in test], [answers[i] for i in test])
    gold = torch.tensor([bool(labels[i]) for i in test])
    assert judge.agreement["accuracy"] == pytest.approx(
        float(((probs > judge.threshold) == gold).float().mean())
    )
    assert judge.agreement["accuracy"] > float(((probs > 0.5) == gold).float().mean())
    # Saved with the judge and used when loaded; an explicit threshold still wins.
    judge.save(tmp_path / "judge")
    assert json.loads((tmp_path / "judge" / META_FILE).read_text())["threshold"] == judge.threshold
    assert OfflineJudge(path=str(tmp_path / "judge")).threshold == judge.threshold
    assert OfflineJudge(path=str(tmp_path / "judge"), threshold=0.7).threshold == 0.7


def test_offline_judge_without_validation_keeps_its_fixed_threshold(tmp_path):
    questions, answers, labels = _pairs()
    judge = OfflineJudge.from_pairs(questions, answers, labels, epochs=20)
    assert judge.threshold == 0.5 and "threshold_selection" not in judge.agreement
    assert judge.agreement["n_train"] == len(questions) - int(heldout_mask(questions, 0.2, 0).sum())
    judge.save(tmp_path / "judge")
    assert "threshold" not in json.loads((tmp_path / "judge" / META_FILE).read_text())
    assert OfflineJudge(path=str(tmp_path / "judge")).threshold == 0.5
    with pytest.raises(ConfigError, match="val_fraction"):
        OfflineJudge.from_pairs(questions, answers, labels, epochs=1, val_fraction=1.5)
