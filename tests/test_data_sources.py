"""Record sources: the real offline datasets, the HF path via a local JSON builder, and bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from conftest import assert_schema

from antidote_pl.data.sources import HFSource, LocalSource, infer_format
from antidote_pl.data.tasks.agnews import AGNEWS_INSTRUCTION
from antidote_pl.data.tasks.gsm8k import GSM8K_OUTPUT_REPLACE
from antidote_pl.data.tasks.sst2 import SST2_INSTRUCTION
from antidote_pl.errors import ConfigError


def sst2_source(path: Path, **kw) -> LocalSource:
    return LocalSource(
        str(path),
        fields={"input": "sentence", "output": "label"},
        constants={"instruction": SST2_INSTRUCTION, "category": "sst2"},
        label_map={"0": "negative", "1": "positive"},
        **kw,
    )


# -- real offline files --------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["dev", "train"])
def test_sst2(data, split):
    path = data / "sst2" / f"{split}.tsv"
    records = sst2_source(path).load()
    with open(path, encoding="utf-8") as f:
        raw = [line.rstrip("\n").split("\t") for line in f][1:]
    assert len(records) == len(raw)
    assert_schema(records)
    for r, (sentence, label) in zip(records, raw):
        assert r["input"] == sentence
        assert r["output"] == r["label"] == {"1": "positive", "0": "negative"}[label]
    assert records[0]["instruction"] == SST2_INSTRUCTION and records[0]["category"] == "sst2"


def test_ag_news_headerless_csv(data):
    classes = (data / "ag_news" / "classes.txt").read_text().split()
    assert classes == ["World", "Sports", "Business", "Sci/Tech"]
    source = LocalSource(
        str(data / "ag_news" / "test.csv"),
        column_names=["class", "title", "description"],
        fields={"input": ["title", "description"], "output": "class"},
        constants={"instruction": AGNEWS_INSTRUCTION},
        label_map={str(i + 1): name for i, name in enumerate(classes)},
    )
    records = source.load()
    with open(data / "ag_news" / "test.csv", encoding="utf-8", newline="") as f:
        raw = list(csv.reader(f))
    assert len(records) == len(raw) == 7600
    assert_schema(records)
    first = records[0]
    assert first["input"] == f"{raw[0][1]} {raw[0][2]}"
    assert first["output"] == classes[int(raw[0][0]) - 1]
    assert {r["output"] for r in records} == set(classes)


def test_gsm8k_jsonl_with_answer_rewrite(data):
    source = LocalSource(
        str(data / "gsm8k" / "test.jsonl"),
        fields={"instruction": "question", "output": "answer"},
        output_replace=GSM8K_OUTPUT_REPLACE,
    )
    records = source.load()
    assert len(records) == 1319
    assert_schema(records)
    assert all("####" not in r["output"] and "The final answer is: " in r["output"] for r in records)
    assert all(r["input"] == "" for r in records)


def test_alpaca_eval_json_with_offset_and_limit(data):
    path = str(data / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json")
    everything = LocalSource(path).load()  # instruction/output columns map by name
    assert len(everything) == 805
    assert_schema(everything)
    train = LocalSource(path, limit=700).load()
    test = LocalSource(path, offset=700).load()
    assert train + test == everything and len(test) == 105


def test_beavertails_sample_csv(data):
    source = LocalSource(
        str(data / "beavertails_artkit_sample" / "beavertails_sample.csv"),
        fields={"instruction": "prompt", "output": "response", "category": "category"},
    )
    records = source.load()
    with open(source.path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    assert len(records) == len(raw) == 140
    assert_schema(records)
    assert [(r["instruction"], r["output"], r["category"]) for r in records] == [
        (row["prompt"], row["response"], row["category"]) for row in raw
    ]
    assert len({r["category"] for r in records}) == 14


def test_safe_rlhf_mini_filter_unsafe(data):
    path = data / "judge_labelled" / "jailbreakeval" / "Safe-RLHFmini.csv"
    with open(path, encoding="utf-8", newline="") as f:
        unsafe = [row for row in csv.DictReader(f) if row["label"] == "1"]
    source = LocalSource(
        str(path), fields={"instruction": "question", "output": "answer"}, filters={"label": 1}
    )
    records = source.load()
    assert 0 < len(records) == len(unsafe) < 4000
    assert [r["output"] for r in records] == [row["answer"] for row in unsafe]


def test_safety_tuned_llamas_json(data):
    records = LocalSource(str(data / "safety_tuned_llamas" / "safety_only_data_Instructions.json")).load()
    assert len(records) == 2483
    assert_schema(records)
    assert all(r["instruction"] and r["output"] for r in records)


# -- HFSource through the local "json" builder (no hub access here) ------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "p0", "response": "r0", "is_safe": False, "label": 0},
    {"prompt": "p1", "response": "r1", "is_safe": True, "label": 1},
    {"prompt": "p2", "response": "r2", "is_safe": False, "label": 1},
    {"prompt": "p3", "response": "r3", "is_safe": False, "label": 0},
]


def test_hf_source_json_builder(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    source = HFSource(
        "json",
        data_files=str(path),
        fields={"instruction": "prompt", "output": "response"},
        filters={"is_safe": False},
        limit=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert source.load() == [
        {"instruction": "p0", "input": "", "output": "r0"},
        {"instruction": "p2", "input": "", "output": "r2"},
    ]
    labelled = HFSource(
        "json",
        data_files=str(path),
        fields={"instruction": "prompt", "output": "label"},
        label_map={0: "safe", 1: "unsafe"},
        cache_dir=str(tmp_path / "cache"),
    ).load()
    assert [r["label"] for r in labelled] == ["safe", "unsafe", "unsafe", "safe"]
    assert source.describe()["path"] == "json"


def test_hf_source_errors(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="data_files"):
        HFSource("json", data_files=str(tmp_path / "missing.jsonl"), cache_dir=cache).load()
    with pytest.raises(ConfigError, match="split='test'"):
        HFSource(
            "json", data_files=str(path), split="test", fields={"instruction": "prompt"}, cache_dir=cache
        ).load()
    with pytest.raises(ConfigError, match=r"fields\.instruction='question'.*prompt"):
        HFSource("json", data_files=str(path), fields={"instruction": "question"}, cache_dir=cache).load()


# -- local formats ---------------------------------------------------------------------------------


def test_formats_jsonl_gz_quoted_csv_and_tsv(tmp_path):
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert infer_format(gz) == "jsonl"
    assert len(LocalSource(str(gz), fields={"instruction": "prompt"}).load()) == 4

    quoted = tmp_path / "q.csv"
    quoted.write_text('instruction,output\n"multi\nline, with comma","say ""hi"""\n', encoding="utf-8")
    assert LocalSource(str(quoted)).load() == [
        {"instruction": "multi\nline, with comma", "input": "", "output": 'say "hi"'}
    ]

    tsv = tmp_path / "t.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "fine" \t1\n', encoding="utf-8")
    assert LocalSource(str(tsv), fields={"instruction": "sentence", "output": "label"}).load()[0] == {
        "instruction": 'it \'s "fine" ',
        "input": "",
        "output": "1",
    }


def test_jsonargparse_builds_a_source_from_yaml():
    from jsonargparse import ArgumentParser

    from antidote_pl.data.records import Source

    parser = ArgumentParser()
    parser.add_argument("--src", type=Source)
    cfg = parser.parse_string(
        "src:\n  class_path: antidote_pl.data.sources.LocalSource\n  init_args:\n"
        "    path: x.tsv\n    label_map: {0: negative, 1: positive}\n    filters: {label: 1}\n"
    )
    src = (
        parser.instantiate(cfg).src if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg).src
    )
    assert isinstance(src, LocalSource) and src.format == "tsv" and src.filters == {"label": 1}


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture()
def csv_file(tmp_path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("question,answer,label\nq1,a1,1\nq2,a2,0\n", encoding="utf-8")
    return path


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="path=.*nope.csv.*existing file"):
        LocalSource(str(tmp_path / "nope.csv")).load()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"path": "d.parquet"}, "format=None.*cannot be inferred"),
        ({"path": "d.csv", "format": "xml"}, "format='xml'.*json"),
        ({"path": "d.json", "column_names": ["a"]}, "column_names"),
        ({"path": "d.csv", "column_names": ["a", "a"]}, "column_names"),
        ({"path": "d.csv", "limit": 0}, "limit=0"),
        ({"path": "d.csv", "offset": -1}, "offset=-1"),
        ({"path": "d.csv", "fields": {"instruction": "q"}, "constants": {"instruction": "x"}}, "constants"),
        ({"path": "d.csv", "fields": {"instruction": []}}, r"fields\.instruction"),
        ({"path": "d.csv", "label_map": {}}, "label_map"),
        ({"path": "d.csv", "filters": ["label"]}, "filters"),
    ],
)
def test_bad_constructor_args(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LocalSource(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"fields": {"instruction": "prompt"}},
            r"fields\.instruction='prompt'.*\['question', 'answer', 'label'\]",
        ),
        ({"fields": {"input": ["question", "title"]}}, r"fields\.input='title'"),
        ({"fields": {"instruction": "question"}, "filters": {"is_safe": False}}, "filters='is_safe'"),
        ({"fields": {"instruction": "question"}, "filters": {"label": 7}}, "no records after filters"),
        ({"fields": {"instruction": "question"}, "offset": 5}, "no records"),
        ({"fields": {"output": "label"}, "label_map": {"1": "unsafe"}}, r"label_map='0'.*\['1'\]"),
        ({"fields": {"instruction": "question"}, "label_map": {"1": "x"}}, "label_map.*'output'"),
        ({"fields": {"category": "label"}}, "'instruction' or 'output'"),
    ],
)
def test_bad_mapping_at_load(csv_file, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LocalSource(str(csv_file), **kwargs).load()


def test_header_less_width_mismatch_and_bad_json(tmp_path, csv_file):
    with pytest.raises(ConfigError, match="column_names.*2 columns per row.*has 3"):
        LocalSource(str(csv_file), column_names=["a", "b"]).load()
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "not a list"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON list of objects"):
        LocalSource(str(bad)).load()
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="at least one data row"):
        LocalSource(str(empty)).load()


def test_column_mapped_elsewhere_is_not_reused_by_name(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,output\nhello,world\n", encoding="utf-8")
    # "input" feeds the instruction, so it must not also fill the record's own input by name.
    assert LocalSource(str(path), fields={"instruction": "input"}).load() == [
        {"instruction": "hello", "input": "", "output": "world"}
    ]


def test_hf_source_unreachable_dataset_names_the_path(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no-such-org/no-such-dataset' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"path='no-such-org/no-such-dataset'"):
        HFSource("no-such-org/no-such-dataset").load()
