"""The byte-level BPE tokenizer builder (``python -m antidote_pl tokenizer``)."""

from __future__ import annotations

import json

import pytest
import yaml

from antidote_pl.commands.tokenizer import main
from antidote_pl.data.bpe import BUILD_FILE, SPECIAL_TOKENS, build_tokenizer, train_bpe_tokenizer
from antidote_pl.data.records import Source
from antidote_pl.data.sources import LocalSource
from antidote_pl.errors import ConfigError
from antidote_pl.models.loading import load_tokenizer

TEXTS = [
    "The cat sat on the mat. The dog sat on the log.",
    "A review: it's a charming and often affecting journey.",
    "Natalia sold 48/2 = 24 clips in May. #### 72",
] * 20


class NeverRead(Source):
    """A source that fails if anything reads it: proves validation happens first."""

    path = "never-read"

    def load(self):
        raise AssertionError("the data was read before the arguments were validated")


def local_source(path) -> dict:
    return {"class_path": "antidote_pl.data.sources.LocalSource", "init_args": {"path": path}}


def write_records(path, n=30):
    rows = [{"instruction": f"Say something about item {i}.", "output": TEXTS[i % 3]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_round_trip_specials_and_bos():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=2)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("The cat sat.")["input_ids"]
    # Like Llama: <bos> first, no <eos> (collators append it).
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    # Byte level: any text round-trips exactly, unseen characters and spacing included.
    for text in ["The cat sat.", "  spaced   out ", "naïve café ☕ 42", "line\nbreak\ttab"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Merges were learnt: a frequent word is fewer tokens than bytes.
    assert len(tok(" sat", add_special_tokens=False)["input_ids"]) < len(" sat")
    assert len(tok) <= 300


def test_prompt_and_response_concatenate_exactly():
    # Prompt and response are encoded separately by the collators; no prefix space may be added.
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    prompt = tok("### Response:\n", add_special_tokens=False)["input_ids"]
    response = tok("The dog sat", add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt + response) == "### Response:\nThe dog sat"


def test_build_writes_a_loadable_directory(tmp_path):
    source = LocalSource(write_records(tmp_path / "data.jsonl"))
    out = tmp_path / "tok"
    build = build_tokenizer([source], str(out), vocab_size=300, template="alpaca")
    assert build["records"] == 30 and build["template"] == "alpaca"
    assert json.loads((out / BUILD_FILE).read_text()) == build
    tok = load_tokenizer(str(out))
    assert len(tok) == build["vocab_size"] and tok.pad_token_id == 0 and tok.padding_side == "right"
    # The template's fixed text was in the corpus, so its header is a few tokens, not one per byte.
    assert len(tok("### Instruction:", add_special_tokens=False)["input_ids"]) <= 4
    # No temporary directory is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "tok"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"vocab_size": 300, "min_frequency": 0}, "min_frequency"),
        ({"vocab_size": 300, "model_max_length": 0}, "model_max_length"),
        ({"vocab_size": 300, "template": "chatml"}, "template"),
        ({"vocab_size": 300, "output_dir": ""}, "output_dir"),
    ],
)
def test_bad_arguments_fail_before_reading(tmp_path, kwargs, field):
    kwargs = {"output_dir": str(tmp_path / "tok"), **kwargs}
    with pytest.raises(ConfigError, match=rf"^{field}="):
        build_tokenizer([NeverRead()], **kwargs)
    with pytest.raises(ConfigError, match=r"^sources="):
        build_tokenizer([], str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_cli_from_a_fit_configs_corpus(tmp_path):
    data = write_records(tmp_path / "data.jsonl")
    fit_cfg = tmp_path / "pretrain.yaml"
    fit_cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "init_args": {
                        "template": "alpaca",
                        "sources": [local_source(data)],
                    }
                }
            }
        )
    )
    out = tmp_path / "tok"
    build = main(["--corpus_config", str(fit_cfg), "--output_dir", str(out), "--vocab_size", "300"])
    assert build["template"] == "alpaca" and build["sources"] == [data] and build["records"] == 30
    assert (out / "tokenizer.json").is_file()
    # The same corpus given inline gives the same tokenizer.
    inline = tmp_path / "inline"
    sources = json.dumps([local_source(data)])
    main(["--sources", sources, "--template", "alpaca", "--output_dir", str(inline), "--vocab_size", "300"])
    assert (inline / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_cli_needs_exactly_one_corpus(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of sources and corpus_config"):
        main(["--output_dir", str(tmp_path / "tok")])
    with pytest.raises(ConfigError, match=r"^corpus_config="):
        main(["--corpus_config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "tok")])
    empty = tmp_path / "empty.yaml"
    empty.write_text("data:\n  init_args:\n    sources: []\n")
    with pytest.raises(ConfigError, match="non-empty data.init_args.sources"):
        main(["--corpus_config", str(empty), "--output_dir", str(tmp_path / "tok")])


def test_an_empty_corpus_is_refused_and_writes_nothing(tmp_path):
    class Empty(Source):
        path = "empty.jsonl"

        def load(self):
            return []

    with pytest.raises(ConfigError, match=r"^sources=\['empty.jsonl'\].*sources with records"):
        build_tokenizer([Empty()], str(tmp_path / "tok"), vocab_size=300)
    assert not (tmp_path / "tok").exists()
