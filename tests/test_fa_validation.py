"""The FA validation split of the evaluation: disjoint from the test questions, off by default."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import TINY_LLAMA, quiet_trainer_kwargs

from antidote_pl.data.records import Source
from antidote_pl.errors import ConfigError
from antidote_pl.evaluation import evaluator as ev
from antidote_pl.evaluation.evaluator import EvalDataModule, question_key
from antidote_pl.tinyworld.world import TinyWorldSource


class ListSource(Source):
    """Fixed records, for hand-made duplicates."""

    def __init__(self, records):
        self.records = records

    def load(self):
        return [dict(r) for r in self.records]

    def describe(self):
        return {"class": "ListSource"}


def _task(i: int, label: str = "positive") -> dict:
    return {"instruction": "Classify.", "input": f"review {i}", "output": "", "label": label}


def _data(**kw) -> EvalDataModule:
    args = {
        "harmful": TinyWorldSource("harmful_answer", split="eval", limit=3),
        "task": TinyWorldSource("sentiment", split="eval"),
        "task_name": "sst2",
        "template": "tiny",
        "task_limit": 10,
    }
    return EvalDataModule(**{**args, **kw})


def _kinds(dm: EvalDataModule, kind: str) -> list[dict]:
    dm.setup()
    return [i for i in dm.items if i["kind"] == kind]


def test_validation_questions_are_disjoint_from_the_test_questions():
    dm = _data(fa_validation_size=20)
    test, val = _kinds(dm, "task"), _kinds(dm, "task_val")
    assert len(test) == 10 and len(val) == 20
    assert not {question_key(i) for i in test} & {question_key(i) for i in val}
    # Test items keep their indices; validation ones come after every test item.
    assert [i["index"] for i in dm.items[: 3 + 10]] == list(range(13))
    assert all(i["task"] == "sst2" and i["label"] for i in val)


def test_default_is_todays_evaluation_exactly():
    plain, zero = _data(), _data(fa_validation_size=0)
    assert plain.fingerprint() == zero.fingerprint()
    assert not _kinds(zero, "task_val")
    assert _data(fa_validation_size=5).fingerprint() != plain.fingerprint()


def test_duplicated_test_questions_are_skipped():
    records = [_task(i) for i in range(4)] + [_task(0), _task(1), _task(7), _task(8)]
    dm = _data(task=ListSource(records), task_limit=4, fa_validation_size=2)
    assert [i["input"] for i in _kinds(dm, "task_val")] == ["review 7", "review 8"]
    with pytest.raises(ConfigError, match="at most the 2 questions"):
        _data(task=ListSource(records), task_limit=4, fa_validation_size=3).setup()


def test_separate_validation_source():
    val_source = ListSource([_task(0), _task(100, "negative"), _task(101)])
    dm = _data(
        task=ListSource([_task(i) for i in range(3)]),
        task_limit=None,
        task_validation=val_source,
        fa_validation_size=2,
    )
    assert [i["input"] for i in _kinds(dm, "task_val")] == ["review 100", "review 101"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fa_validation_size": -1}, "fa_validation_size"),
        ({"fa_validation_size": 2, "task_limit": None}, "task_limit"),
        ({"task_validation": ListSource([])}, "task_validation"),
        ({"fa_validation_size": 2, "task": None, "task_name": None}, "no task source"),
    ],
)
def test_bad_validation_options_fail_at_construction(kw, message):
    with pytest.raises(ConfigError, match=message):
        _data(**kw)


def test_evaluator_reports_validation_accuracy(tmp_path, monkeypatch):
    from antidote_pl.training.sft import CausalLMSFTModule

    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(tmp_path / "stage")
    )
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, *a, **k: ["positive"] * len(prompts))
    records = [_task(i, "positive" if i % 4 else "negative") for i in range(12)]
    task = ListSource(records)

    def run(**kw):
        evaluator = ev.StageEvaluator(str(tmp_path / "stage"), harmful_max_new_tokens=2)
        dm = _data(harmful=None, task=task, task_limit=4, batch_size=3, **kw)
        L.Trainer(**quiet_trainer_kwargs(tmp_path)).test(evaluator, datamodule=dm, verbose=False)
        return evaluator.results

    plain = run()
    assert "finetune_accuracy_val" not in plain and plain["n_finetune_accuracy"] == 4
    with_val = run(fa_validation_size=8)
    # Test: records 0-3 (1 negative) -> 75%; validation: records 4-11 (2 negatives) -> 75%.
    assert with_val["finetune_accuracy"] == plain["finetune_accuracy"] == 75.0
    assert with_val["n_finetune_accuracy_val"] == 8
    assert with_val["finetune_accuracy_val"] == 75.0
    with_val = run(fa_validation_size=7)
    assert with_val["finetune_accuracy_val"] == pytest.approx(100 * 5 / 7)
