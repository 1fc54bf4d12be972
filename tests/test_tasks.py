"""Tasks (antidote_pl.data.tasks): a toy task registered in a few lines is scored by the real evaluator,
the built-in tasks score exactly as the parsers they replace, and the registry refuses bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import lightning as L
import pytest
import yaml
from conftest import REPO, SHARED_DATA, TINY_LLAMA, quiet_trainer_kwargs

from antidote_pl.data import tasks
from antidote_pl.data.records import Source
from antidote_pl.data.sources import HFSource
from antidote_pl.data.tasks import Task, agnews, get_task, gsm8k, is_correct, register_task, sst2, task_names
from antidote_pl.data.tasks import _registry as registry
from antidote_pl.errors import ConfigError
from antidote_pl.evaluation import evaluator as ev
from antidote_pl.evaluation.evaluator import EvalDataModule
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.sft import CausalLMSFTModule

BUILTIN = ("agnews", "gsm8k", "sst2")


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy, so a toy task never leaks into other tests."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))


class ListSource(Source):
    """Fixed records."""

    def __init__(self, records):
        self.records = records

    def load(self):
        return [dict(r) for r in self.records]

    def describe(self):
        return {"class": "ListSource", "n": len(self.records)}


# ------------------------------------------------------------------------------ a toy task end to end
def parse_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` in any case, else no answer."""
    word = text.strip().lower()
    return word if word in ("yes", "no") else None


# Question input -> (gold label, what the fake model answers).
TOY = {
    "is two even": ("yes", "Yes"),
    "is three even": ("no", "yes"),  # wrong answer
    "is four even": ("yes", "maybe"),  # no answer: wrong
    "is five even": ("no", " NO\n### Response: yes"),  # the alpaca marker cuts the invented turn
}


def test_a_toy_task_registered_in_a_few_lines_is_scored_by_the_evaluator(tmp_path, monkeypatch):
    register_task(Task(name="yesno", parse=parse_yes_no, labels=("no", "yes")))

    stage = str(tmp_path / "stage")
    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(stage)
    answer = {q: said for q, (_, said) in TOY.items()}
    monkeypatch.setattr(
        ev,
        "generate",
        lambda model, tok, prompts, *a, **k: [next(answer[q] for q in answer if q in p) for p in prompts],
    )
    records = [
        {"instruction": "Answer yes or no.", "input": q, "output": g, "label": g} for q, (g, _) in TOY.items()
    ]
    dm = EvalDataModule(task=ListSource(records), task_name="yesno", template="alpaca", batch_size=3)
    evaluator = ev.StageEvaluator(stage, output_dir=str(tmp_path / "eval"))
    L.Trainer(**quiet_trainer_kwargs(tmp_path)).test(evaluator, datamodule=dm, verbose=False)

    assert (evaluator.results["finetune_accuracy"], evaluator.results["n_finetune_accuracy"]) == (50.0, 4)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [(r["input"], r["response"], r["correct"]) for r in rows] == [
        ("is two even", "Yes", True),
        ("is three even", "yes", False),
        ("is four even", "maybe", False),
        ("is five even", "NO", True),
    ]


def test_a_toy_task_with_its_own_gold_canonicaliser():
    # Gold answers stored as booleans; the parser returns booleans too.
    task = register_task(
        Task(name="truth", parse=lambda t: {"true": True, "false": False}.get(t.strip().lower()), gold=bool)
    )
    assert is_correct("truth", "TRUE", True) and not is_correct("truth", "false", True)
    assert not task.is_correct("perhaps", True)
    assert get_task("truth") is task and "truth" in task_names()


def test_the_guide_example_is_a_working_task_file():
    guide = (REPO / "docs" / "guide" / "tasks.md").read_text(encoding="utf-8")
    module = re.findall(r"```python\n(.*?)```", guide, re.S)[0]
    namespace: dict = {}
    exec(compile(module, "boolq.py", "exec"), namespace)
    register_task(namespace["TASK"])
    assert is_correct("boolq", " Yes\n", "yes") and not is_correct("boolq", "yes.", "yes")
    source = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", guide, re.S)[0])
    assert source["class_path"] == "antidote_pl.data.sources.HFSource"
    HFSource(**source["init_args"])  # valid mapping arguments (nothing is downloaded)


# ------------------------------------------------------------------------------ the built-in tasks
def test_builtin_tasks_are_the_modules_of_the_package():
    assert task_names() == BUILTIN
    assert [get_task(n) for n in BUILTIN] == [agnews.TASK, gsm8k.TASK, sst2.TASK]
    # Registering a module's task again (a second import) is harmless.
    assert register_task(sst2.TASK) is sst2.TASK and task_names() == BUILTIN


def test_builtin_tasks_hold_the_official_instructions_and_labels():
    # The texts of the official task records, written out here as they were before the move.
    assert (
        get_task("sst2").instruction
        == "Analyze the sentiment of the input, and respond only positive or negative"
    )
    assert get_task("agnews").instruction == (
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        "World\nSports\nBusiness\nSci/Tech\n"
    )
    assert get_task("gsm8k").instruction is None  # the question is the instruction
    assert get_task("sst2").labels == ("negative", "positive")
    assert get_task("agnews").labels == ("World", "Sports", "Business", "Sci/Tech")
    assert dict(get_task("gsm8k").output_replace) == {"####": "The final answer is: "}
    assert (get_task("sst2").parse, get_task("agnews").parse) == (sst2.parse_sst2, agnews.parse_agnews)
    assert get_task("gsm8k").parse is gsm8k.parse_gsm8k


def test_the_tiny_world_sentiment_task_is_scored_as_sst2():
    records = TinyWorldSource("sentiment", split="eval").load()
    assert all(is_correct("sst2", r["output"], r["label"]) for r in records)
    assert sum(is_correct("sst2", "positive", r["label"]) for r in records) < len(records)


def _digest(task, pairs, extra_golds) -> str:
    """Hash of the parsed answer and the verdicts (or error text) of each response against its gold
    answer and ``extra_golds``; ``task`` needs ``parse`` and ``is_correct(response, gold)``."""
    rows = []
    for response, gold in pairs:
        row = [repr(task.parse(response))]
        for g in (gold, *extra_golds):
            try:
                row.append(task.is_correct(response, g))
            except ConfigError as err:
                row.append(str(err))
        rows.append(row)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _shared(rel: str):
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"shared data file {path} not available")
    return path


def _sst2_pairs():
    with _shared("sst2/dev.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    pairs = []
    for r in rows:
        gold = "positive" if r["label"] == "1" else "negative"
        for said in (
            gold,
            gold.capitalize(),
            gold.upper(),
            f" {gold}\n",
            gold + ".",
            f"it is {gold}",
            r["sentence"],
        ):
            pairs.append((said, gold))
    return pairs


def _agnews_pairs():
    with _shared("ag_news/test.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f))[:1000]
    pairs = []
    for cls, title, _ in rows:
        gold = agnews.AGNEWS_CLASSES[int(cls) - 1]
        for said in (gold, gold.lower(), gold.upper(), gold + "\n", "sci", "Science", title):
            pairs.append((said, gold))
    return pairs


def _gsm8k_pairs():
    with _shared("gsm8k/test.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    pairs = []
    for r in rows:
        gold = gsm8k.gsm8k_label(r["answer"])
        for said in (
            r["answer"],
            r["answer"].replace("####", "The final answer is: "),
            f"The final answer is:{gold} then 7",
            f"The final answer is: none. The final answer is: {gold}",
            f"so .5 and -{gold}",
        ):
            pairs.append((said, gold))
    return pairs


# Digests of the parsers and gold handling that data/parsers.py had before the tasks moved into
# antidote_pl/data/tasks (commit a9bfc9c), computed with those functions on these pairs.
BEFORE = {
    "sst2": (_sst2_pairs, ("positive", "pos", None), "849d1627ea828008"),
    "agnews": (_agnews_pairs, ("Sci/Tech", "sci", "Science"), "7c289e8dbf30e437"),
    "gsm8k": (_gsm8k_pairs, ("3", 3.0, "1,000", "three"), "ba8ac6601244c69e"),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_builtin_tasks_score_real_answers_exactly_as_before(name):
    pairs, extra, expected = BEFORE[name]
    assert _digest(get_task(name), pairs(), extra) == expected


# ------------------------------------------------------------------------------ registry errors
def test_unknown_task_is_one_line_listing_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"^task='nope' is invalid: expected one of \['agnews', 'gsm8k', 'sst2'\]\.$"
    ):
        get_task("nope")
    source = ListSource([{"instruction": "q", "input": "", "output": "yes", "label": "yes"}])
    for name in ("nope", None):
        with pytest.raises(
            ConfigError, match=rf"^data.task_name={name!r} is invalid: expected one of \['agnews'"
        ):
            EvalDataModule(task=source, task_name=name)
    # Once registered, the name is accepted, and listed for the next unknown one.
    register_task(Task(name="yesno", parse=parse_yes_no, labels=("no", "yes")))
    EvalDataModule(task=source, task_name="yesno")
    with pytest.raises(ConfigError, match=r"'sst2', 'yesno'\]"):
        get_task("nope")


def test_a_taken_name_needs_replace():
    other = Task(name="sst2", parse=parse_yes_no, labels=("no", "yes"))
    with pytest.raises(ConfigError, match="Task.name='sst2'.*replace=True"):
        register_task(other)
    assert get_task("sst2") is sst2.TASK
    assert register_task(other, replace=True) is get_task("sst2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "parse": parse_yes_no, "labels": ("no",)}, "Task.name"),
        ({"name": "x", "parse": "yes", "labels": ("no",)}, "Task.parse"),
        ({"name": "x", "parse": parse_yes_no, "gold": "yes"}, "Task.gold"),
        ({"name": "x", "parse": parse_yes_no}, r"Task\('x'\).labels"),
    ],
)
def test_bad_tasks_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Task(**kwargs)


def test_only_tasks_register_and_a_task_is_frozen():
    with pytest.raises(ConfigError, match="register_task"):
        register_task("sst2")
    task = Task(name="x", parse=parse_yes_no, labels=["no", "yes"], output_replace={"a": "b"})
    assert task.labels == ("no", "yes")
    with pytest.raises(TypeError):
        task.output_replace["a"] = "c"
    with pytest.raises(AttributeError):
        task.name = "y"
    assert tasks.Task is Task
