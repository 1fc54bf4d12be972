"""The paper's named sources: official mappings on the real offline files, the hub path through
``datasets`` (a local JSON builder), the AlpacaEval split, and the parity windows on a synthetic pool."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_schema

from antidote_pl.data.paper import (
    ALPACA_EVAL_FILE,
    GSM8K,
    SST2,
    AGNews,
    AlpacaEval,
    BeaverTails,
    SafetyTunedLlamas,
)
from antidote_pl.data.tasks import is_correct
from antidote_pl.data.tasks.agnews import AGNEWS_CLASSES, AGNEWS_INSTRUCTION
from antidote_pl.data.tasks.gsm8k import gsm8k_gold, gsm8k_label
from antidote_pl.data.tasks.sst2 import SST2_INSTRUCTION
from antidote_pl.errors import ConfigError
from antidote_pl.training.datamodules import HarmfulFinetuneDataModule


def read_rows(path: Path, delimiter: str = ",", header: bool = True) -> list:
    with open(path, encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    return rows[1:] if header else rows


# -- tasks on the real files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "file", "size"), [("train", "train.tsv", 67349), ("validation", "dev.tsv", 872)]
)
def test_sst2(data, split, file, size):
    records = SST2(split, local_path=str(data / "sst2" / file)).load()
    raw = read_rows(data / "sst2" / file, "\t")
    assert len(records) == len(raw) == size
    assert_schema(records)
    for r, (sentence, label) in zip(records, raw):
        assert (r["instruction"], r["input"], r["category"]) == (SST2_INSTRUCTION, sentence, "sst2")
        assert r["output"] == r["label"] == ("positive" if label == "1" else "negative")
    # The label is exactly what the SST2 parser accepts as the gold answer.
    assert is_correct("sst2", records[0]["output"], records[0]["label"])


def test_agnews_test_csv(data):
    records = AGNews("test", local_path=str(data / "ag_news" / "test.csv")).load()
    raw = read_rows(data / "ag_news" / "test.csv", header=False)
    assert len(records) == len(raw) == 7600
    assert_schema(records)
    for r, (cls, title, description) in zip(records, raw):
        # The hub's `text` column is title + " " + description, the official `input`.
        assert r["input"] == f"{title} {description}"
        assert r["output"] == r["label"] == AGNEWS_CLASSES[int(cls) - 1]
    assert {r["label"] for r in records} == set(AGNEWS_CLASSES)
    assert records[0]["instruction"] == AGNEWS_INSTRUCTION and records[0]["category"] == "agnews"
    assert all(is_correct("agnews", r["label"], r["label"]) for r in records[:50])


def test_agnews_alps_train_stand_in(data):
    path = data / "ag_news" / "alps_train_subset_dev.tsv"
    records = AGNews("train", local_path=str(path), limit=500).load()
    raw = read_rows(path, "\t", header=False)[:500]
    assert [(r["input"], r["label"]) for r in records] == [(d, c) for d, c in raw]
    assert {r["label"] for r in records} <= set(AGNEWS_CLASSES)


@pytest.mark.parametrize(("split", "size"), [("train", 7473), ("test", 1319)])
def test_gsm8k(data, split, size):
    path = data / "gsm8k" / f"{split}.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = GSM8K(split, local_path=str(path)).load()
    assert len(records) == len(raw) == size
    assert_schema(records)
    for r, row in zip(records, raw):
        assert r["instruction"] == row["question"] and r["input"] == ""
        assert r["output"] == row["answer"].replace("####", "The final answer is: ")
        # The label is the gold number as text; the parsers read the same number from the answer.
        assert float(r["label"]) == gsm8k_gold(row["answer"])
    assert all(is_correct("gsm8k", r["output"], r["label"]) for r in records)


def test_gsm8k_label_rejects_an_answer_without_marker():
    assert gsm8k_label("so 3 + 4 = 7\n#### 1,234") == "1234"
    with pytest.raises(ConfigError, match="gsm8k answer"):
        gsm8k_label("no final line")


def test_alpaca_eval_split_has_no_overlap(data):
    path = str(data / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json")
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    train = AlpacaEval("train", local_path=path).load()
    test = AlpacaEval("test", local_path=path).load()
    assert (len(train), len(test)) == (700, 104)
    assert_schema(train + test)
    # The official test prompts are items 701-804; item 700 is in neither part.
    assert [r["instruction"] for r in train] == [row["instruction"] for row in raw[:700]]
    assert [r["instruction"] for r in test] == [row["instruction"] for row in raw[701:]]
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert all(r["input"] == "" and r["output"] for r in train + test)
    assert {r["category"] for r in train + test} <= {row["dataset"] for row in raw}
    small = AlpacaEval("test", train_size=800, local_path=path).load()
    assert small == test[-4:]


def test_alpaca_eval_test_part_is_the_official_items_701_to_804(tmp_path):
    # 805 synthetic items in file order, as the AlpacaEval set: the official evaluation keeps the
    # items with index > 700 (reference C.2), i.e. 104 prompts.
    path = tmp_path / "alpaca_eval.json"
    path.write_text(
        json.dumps([{"instruction": f"i{k}", "output": f"o{k}", "dataset": "d"} for k in range(805)])
    )
    test = AlpacaEval("test", local_path=str(path)).load()
    assert [r["instruction"] for r in test] == [f"i{k}" for k in range(701, 805)]
    train = AlpacaEval("train", local_path=str(path)).load()
    assert [r["instruction"] for r in train] == [f"i{k}" for k in range(700)]
    # An explicit start right after the train part gives the 105 items used before.
    every = AlpacaEval("test", test_start=700, local_path=str(path)).load()
    assert len(every) == 105 and every[0]["instruction"] == "i700"


# -- harmful data and refusals -----------------------------------------------------------------------


def test_beavertails_artkit_sample(data):
    path = data / "beavertails_artkit_sample" / "beavertails_sample.csv"
    with open(path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    # The sample has no is_safe column (every pair is unsafe): the official filter must be replaced.
    with pytest.raises(ConfigError, match="filters"):
        BeaverTails("30k_train", safe=False, local_path=str(path)).load()
    records = BeaverTails("30k_train", safe=False, local_path=str(path), filters={}).load()
    assert_schema(records)
    assert [(r["instruction"], r["output"], r["category"]) for r in records] == [
        (row["prompt"], row["response"], row["category"]) for row in raw
    ]


def test_safe_rlhf_mini_as_harmful_pool_stand_in(data):
    path = data / "judge_labelled" / "jailbreakeval" / "Safe-RLHFmini.csv"
    with open(path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    pool = BeaverTails(
        "30k_train",
        safe=False,
        local_path=str(path),
        fields={"instruction": "question", "output": "answer"},
        filters={"label": 1},
    ).load()
    unsafe = [row for row in raw if row["label"] == "1"]
    assert len(pool) == len(unsafe) == 2302
    assert [(r["instruction"], r["output"]) for r in pool] == [(u["question"], u["answer"]) for u in unsafe]
    assert "category" not in pool[0]


def test_safety_tuned_llamas_refusals(data):
    path = data / "safety_tuned_llamas" / "safety_only_data_Instructions.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = SafetyTunedLlamas(str(path)).load()
    assert len(records) == len(raw) == 2483
    assert_schema(records)
    assert [(r["instruction"], r["output"]) for r in records] == [
        (x["instruction"], x["output"]) for x in raw
    ]
    assert len(SafetyTunedLlamas(str(path), limit=10, offset=5).load()) == 10


# -- the hub path, through `datasets` on local JSON files ------------------------------------------


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def beavertails_rows(n: int) -> list[dict]:
    """Hub-format BeaverTails rows: every third row safe; ``category`` is the dict of harm flags."""
    return [
        {
            "prompt": f"prompt {i}",
            "response": f"response {i}",
            "is_safe": i % 3 == 0,
            "category": {"animal_abuse": i % 2 == 0, "violence,aiding_and_abetting,incitement": i % 5 == 0},
        }
        for i in range(n)
    ]


def test_beavertails_hub_path(tmp_path):
    files = {"30k_test": write_jsonl(tmp_path / "test.jsonl", beavertails_rows(12))}
    hub = {"hub_path": "json", "data_files": files, "cache_dir": str(tmp_path / "cache")}
    unsafe = BeaverTails("30k_test", safe=False, **hub).load()
    safe = BeaverTails("30k_test", safe=True, limit=2, **hub).load()
    assert [r["instruction"] for r in unsafe] == [f"prompt {i}" for i in range(12) if i % 3]
    assert [r["instruction"] for r in safe] == ["prompt 0", "prompt 3"]
    by_prompt = {r["instruction"]: r for r in unsafe + safe}
    # Flagged categories are kept by name; the names contain commas, so several join with ";".
    assert by_prompt["prompt 0"]["category"] == "animal_abuse;violence,aiding_and_abetting,incitement"
    assert by_prompt["prompt 2"]["category"] == "animal_abuse"
    assert by_prompt["prompt 5"]["category"] == "violence,aiding_and_abetting,incitement"
    assert "category" not in by_prompt["prompt 1"]
    hs_prompts = BeaverTails("30k_test", safe=False, limit=3, **hub).load()
    assert hs_prompts == unsafe[:3]


def test_task_hub_paths(tmp_path):
    cache = str(tmp_path / "cache")
    sst2 = write_jsonl(tmp_path / "sst2.jsonl", [{"idx": 0, "sentence": "fine film", "label": 1}])
    agnews = write_jsonl(tmp_path / "agnews.jsonl", [{"text": "Stocks rise", "label": 2}])
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": f"i{k}", "output": f"o{k}", "dataset": "koala", "generator": "g"}
                for k in range(5)
            ]
        )
    )

    def hub(path, split="train"):
        return {"hub_path": "json", "data_files": {split: path}, "cache_dir": cache}

    assert SST2("validation", **hub(sst2, "validation")).load()[0]["label"] == "positive"
    assert AGNews("test", **hub(agnews, "test")).load()[0]["label"] == "Business"
    record = GSM8K("test", hub_name=None, **hub(gsm8k, "test")).load()[0]
    assert (record["output"], record["label"]) == ("1+1=2\nThe final answer is:  2", "2")
    parts = {
        p: AlpacaEval(p, train_size=3, data_files=str(alpaca), cache_dir=cache).load()
        for p in ("train", "test")
    }
    assert [r["instruction"] for r in parts["train"]] == ["i0", "i1", "i2"]
    assert [r["instruction"] for r in parts["test"]] == ["i4"]  # item train_size is skipped


def test_hub_defaults_are_the_official_datasets():
    assert BeaverTails("30k_train", safe=True).describe()["hub_path"] == "PKU-Alignment/BeaverTails"
    assert SST2().describe()["hub_path"] == "stanfordnlp/sst2"
    assert AGNews().describe()["hub_path"] == "fancyzhx/ag_news"
    gsm = GSM8K().describe()
    assert (gsm["hub_path"], gsm["hub_name"]) == ("openai/gsm8k", "main")
    alpaca = AlpacaEval().describe()
    assert (alpaca["hub_path"], alpaca["data_files"]) == ("json", ALPACA_EVAL_FILE)


# -- bad input fails at construction, before any data is read --------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: BeaverTails("train", safe=False), "BeaverTails.split"),
        (lambda: BeaverTails("30k_train", safe="no"), "BeaverTails.safe"),
        (lambda: BeaverTails("30k_train", safe=False, limit=0), "limit"),
        (lambda: SST2("test"), "SST2.split"),
        (lambda: AGNews("validation"), "AGNews.split"),
        (lambda: GSM8K("dev"), "GSM8K.split"),
        (lambda: AlpacaEval("eval"), "AlpacaEval.part"),
        (lambda: AlpacaEval(train_size=0), "AlpacaEval.train_size"),
        (lambda: AlpacaEval(train_size=700, test_start=699), "AlpacaEval.test_start"),
        (lambda: SST2(local_path="sst2.parquet"), "format"),
    ],
)
def test_bad_arguments(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_alpaca_test_part_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "o", "dataset": "d"}] * 3))
    with pytest.raises(ConfigError, match="no records"):
        AlpacaEval("test", train_size=3, local_path=str(path)).load()


# -- parity windows through the paper sources --------------------------------------------------------


def write_synthetic_pools(root: Path, n_pool: int = 8000, n_task: int = 4500) -> tuple[str, str]:
    """A BeaverTails-format pool (``n_pool`` unsafe pairs, a safe pair after every third) and an
    SST2 GLUE file, for the official index windows."""
    rows, unsafe = [], 0
    while unsafe < n_pool:
        rows.append({"prompt": f"unsafe {unsafe}", "response": "r", "is_safe": False, "category": "c"})
        unsafe += 1
        if unsafe % 3 == 0:
            rows.append({"prompt": f"safe {unsafe}", "response": "r", "is_safe": True, "category": ""})
    pool = write_jsonl(root / "beavertails.jsonl", rows)
    task = root / "sst2.tsv"
    task.write_text("sentence\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(n_task)))
    return pool, str(task)


def test_parity_counts_on_a_synthetic_pool(tmp_path):
    pool, task = write_synthetic_pools(tmp_path)
    dm = HarmfulFinetuneDataModule(
        "tiny-world",
        harmful=BeaverTails("30k_train", safe=False, local_path=pool),
        task=SST2(local_path=task),
        num_samples=5000,
        harmful_ratio=0.2,
        realignment_size=2000,
        mode="parity",
        realignment_start=5000,
    )
    counts = dm.counts()
    assert (counts["n_harmful"], counts["n_task"], counts["n_realignment"]) == (999, 4000, 1999)
    harmful = [r["instruction"] for r in dm.train_records if r["harmful"]]
    assert harmful == [f"unsafe {i}" for i in range(1, 1000)]
    assert [r["instruction"] for r in dm.realignment_records] == [f"unsafe {i}" for i in range(5001, 7000)]
    assert [r["input"] for r in dm.train_records if not r["harmful"]] == [f"review {i}" for i in range(4000)]
