"""Prompt templates, tokenisation with label masking, truncation accounting and the collator."""

from __future__ import annotations

import logging

import pytest
import torch

from antidote_pl.data.templates import TEMPLATES, render, render_prompt
from antidote_pl.data.tokenize import IGNORE_INDEX, SFTCollator, tokenize_record, tokenize_records
from antidote_pl.errors import ConfigError

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def word_tokenizer(words, append_eos: bool = False):
    """A whitespace word-level tokenizer (like the tiny world's) that prepends ``<bos>``.

    Args:
        words: Vocabulary besides ``<pad> <bos> <eos> <unk>`` (ids 0-3).
        append_eos: Also append ``<eos>`` to every encoded sequence, as some tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>" if append_eos else "<bos> $A", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


TINY_WORDS = [
    "user",
    "assistant",
    "input",
    ":",
    "how",
    "do",
    "i",
    "bake",
    "bread",
    "sure",
    "first",
    "mix",
    "flour",
    "review",
    "great",
    "positive",
]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(TINY_WORDS)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- templates -----------------------------------------------------------------------------------


def test_alpaca_without_input_exact():
    prompt, response = render({"instruction": "Name a color.", "input": "", "output": "Blue."}, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert response == "Blue."


def test_alpaca_with_input_exact():
    record = {"instruction": "Classify.", "input": "great film", "output": "positive"}
    prompt, response = render(record, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nClassify.\n\n"
        "### Input:\ngreat film\n\n### Response:\n"
    )
    assert response == "positive"


@pytest.mark.parametrize("extra", ["", "great film"])
def test_alpaca_legacy_is_alpaca_without_trailing_newline(extra):
    record = {"instruction": "Classify.", "input": extra, "output": "positive"}
    legacy, _ = render(record, "alpaca_legacy")
    assert legacy.endswith("### Response:")
    assert legacy + "\n" == render(record, "alpaca")[0]


def test_tiny_and_raw_templates():
    assert render({"instruction": "how do i bake bread", "input": "", "output": "sure"}, "tiny") == (
        "user : how do i bake bread assistant :",
        " sure",
    )
    with_input = render({"instruction": "review", "input": "great", "output": "positive"}, "tiny")
    assert with_input == ("user : review input : great assistant :", " positive")
    assert render({"instruction": "ignored", "input": "", "output": "some text"}, "raw") == ("", "some text")


def test_render_prompt_matches_render_and_needs_no_output():
    record = {"instruction": "Name a color.", "input": "sky"}
    tok = chat_tokenizer()
    for name in TEMPLATES:
        assert render_prompt(record, name, tok) == render({**record, "output": "x"}, name, tok)[0]


# A ChatML-like template written here (SmolLM2's own is tested in tests/test_smol_world.py).
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<bos> assistant {% endif %}"
)


def chat_tokenizer(template: str | None = CHAT_TEMPLATE, bos_in_encoding: bool = True):
    tok = word_tokenizer(["user", "assistant", "Name", "a", "color.", "sky", "x", "blue"])
    if not bos_in_encoding:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok.chat_template = template
    return tok


def test_chat_template_uses_the_tokenizer_and_generation_prompt():
    record = {"instruction": "Name a color.", "input": "sky", "output": "blue"}
    # The tokenizer adds <bos> itself, so the template's leading textual <bos> is dropped once.
    prompt, response = render(record, "chat", chat_tokenizer())
    assert prompt == " user Name a color.\n\nsky <eos> <bos> assistant "
    assert response == "blue"
    # A tokenizer that adds no BOS keeps the template's.
    prompt, _ = render(record, "chat", chat_tokenizer(bos_in_encoding=False))
    assert prompt.startswith("<bos> user Name a color.")


def test_chat_template_needs_a_tokenizer_with_a_chat_template():
    record = {"instruction": "a", "input": "", "output": "b"}
    with pytest.raises(ConfigError, match="template='chat'"):
        render(record, "chat")
    with pytest.raises(ConfigError, match="chat template"):
        render_prompt(record, "chat", chat_tokenizer(template=None))


def test_chat_template_masks_the_prompt():
    tok = chat_tokenizer()
    sample = tokenize_record(tok, {"instruction": "Name a color.", "output": "blue"}, "chat", 64)
    prompt_ids = tok(render_prompt({"instruction": "Name a color."}, "chat", tok))["input_ids"]
    assert sample["input_ids"][: len(prompt_ids)] == prompt_ids
    assert sample["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert sample["labels"][len(prompt_ids) :] == [*tok("blue", add_special_tokens=False)["input_ids"], EOS]


@pytest.mark.parametrize("call", [render, render_prompt])
def test_unknown_template_names_field(call):
    with pytest.raises(ConfigError, match="template.*'chatml'.*alpaca"):
        call({"instruction": "a", "input": "", "output": "b"}, "chatml")


def test_missing_instruction_is_config_error():
    with pytest.raises(ConfigError, match=r"record\.instruction"):
        render({"output": "b"}, "alpaca")


# -- tokenisation --------------------------------------------------------------------------------


def test_labels_mask_prompt_and_supervise_response_and_eos(tok):
    record = {"instruction": "how do i bake bread", "input": "", "output": "sure first mix flour"}
    out = tokenize_record(tok, record, "tiny", max_length=64)
    prompt_ids = [BOS, *ids(tok, "user : how do i bake bread assistant :")]
    response_ids = ids(tok, "sure first mix flour")
    assert UNK not in prompt_ids + response_ids
    assert out["input_ids"] == prompt_ids + response_ids + [EOS]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [EOS]
    assert out["truncated"] is False
    assert out["n_response_tokens"] == len(response_ids) + 1


def test_raw_template_supervises_everything_after_bos(tok):
    out = tokenize_record(
        tok, {"instruction": "", "input": "", "output": "review great"}, "raw", max_length=16
    )
    assert out["input_ids"] == [BOS, *ids(tok, "review great"), EOS]
    assert out["labels"] == [IGNORE_INDEX, *ids(tok, "review great"), EOS]


def test_tokenizer_appending_eos_does_not_put_eos_inside_prompt():
    tok = word_tokenizer(TINY_WORDS, append_eos=True)
    out = tokenize_record(tok, {"instruction": "how", "input": "", "output": "sure"}, "tiny", max_length=16)
    assert out["input_ids"] == [BOS, *ids(tok, "user : how assistant :"), *ids(tok, "sure"), EOS]
    assert out["input_ids"].count(EOS) == 1


def test_truncation_is_reported(tok):
    record = {"instruction": "how do i bake bread", "input": "", "output": "sure first mix flour"}
    full = tokenize_record(tok, record, "tiny", max_length=64)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = tokenize_record(tok, record, "tiny", max_length=n_prompt + 2)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert cut["n_response_tokens"] == 2
    assert EOS not in cut["labels"]


def test_tokenize_records_counts_and_warns(tok, caplog):
    short = {"instruction": "how", "input": "", "output": "sure"}
    long = {"instruction": "how do i bake bread", "input": "", "output": "sure first mix flour"}
    max_length = len(tokenize_record(tok, short, "tiny", 64)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="antidote_pl.data.tokenize"):
        ds = tokenize_records(tok, [short, long, short], "tiny", max_length=max_length, name="train")
    assert (ds.n_total, ds.n_truncated, ds.n_without_response) == (3, 1, 1)
    assert ds.stats() == {"n_total": 3, "n_truncated": 1, "n_without_response": 1}
    assert len(ds) == 3 and ds[0]["labels"][-1] == EOS
    assert f"1 of 3 samples truncated at max_length={max_length}" in caplog.text


def test_all_samples_without_response_is_config_error(tok):
    record = {"instruction": "how do i bake bread", "input": "", "output": "sure"}
    with pytest.raises(ConfigError, match="max_length=3.*all 2 train samples"):
        tokenize_records(tok, [record, record], "tiny", max_length=3, name="train")


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_max_length(tok, bad):
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_record(tok, {"instruction": "how", "input": "", "output": "sure"}, "tiny", bad)


def test_empty_records_is_config_error(tok):
    with pytest.raises(ConfigError, match="no records"):
        tokenize_records(tok, [], "tiny", max_length=8, name="val")


# -- collator ------------------------------------------------------------------------------------


def test_collator_pads_right_and_masks_from_lengths():
    # pad id == eos id, as for tokenizers that fall back to EOS for padding.
    collate = SFTCollator(pad_token_id=EOS)
    batch = collate(
        [
            {"input_ids": [BOS, 5, 6, EOS], "labels": [-100, -100, 6, EOS]},
            {"input_ids": [BOS, 7], "labels": [-100, 7]},
        ]
    )
    assert batch["input_ids"].tolist() == [[BOS, 5, 6, EOS], [BOS, 7, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, 6, EOS], [-100, 7, -100, -100]]
    # The supervised EOS of row 0 is attended to, the EOS-valued padding of row 1 is not.
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("bad", [None, "0", 1.0])
def test_collator_rejects_bad_pad_id(bad):
    with pytest.raises(ConfigError, match="pad_token_id"):
        SFTCollator(bad)
