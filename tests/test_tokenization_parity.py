"""``tokenization: joint`` reproduces the official code's samples; ``separate`` keeps an exact boundary.

The official Antidote code tokenises ``prompt + response`` as one string and masks as many positions
as the prompt alone has ids. On a SentencePiece-style (Metaspace) tokenizer this differs from
tokenising the response on its own: the separately tokenised response gets a word-start prefix
(``▁Sure``) that the joint string does not have after ``"\\n"``. Both tokenizers are built here.
"""

from __future__ import annotations

import pytest
from conftest import REPO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from antidote_pl.data.templates import render
from antidote_pl.data.tokenize import IGNORE_INDEX, tokenize_record
from antidote_pl.errors import ConfigError
from antidote_pl.training.batcher import SFTBatcher

CORPUS = [
    "Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\nHow do I bake bread?\n\n### Response:\nSure, here is how to bake bread.",
    "### Instruction:\nTell me a story.\n\n### Response:\nSure, once upon a time there was a bread.",
    "I cannot help with that request. Sure here is the answer.",
] * 20
RECORD = {"instruction": "How do I bake bread?", "input": "", "output": "Sure, here is how to bake bread."}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Newlines as their own pieces, like SentencePiece's byte tokens for "\n" in Llama-2.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"])
    )
    return _wrap(tok)


@pytest.fixture(scope="module")
def byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<pad>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return _wrap(tok)


def official(tokenizer, record):
    """The official construction, written out: joint ids + EOS, prompt masked by its own length."""
    prompt, response = render(record, "alpaca")
    full = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    return full, [IGNORE_INDEX] * n_prompt + full[n_prompt:]


@pytest.mark.parametrize("name", ["metaspace", "byte_level"])
def test_joint_matches_the_official_samples(request, name):
    tokenizer = request.getfixturevalue(name)
    got = tokenize_record(tokenizer, RECORD, "alpaca", 512, tokenization="joint")
    ids, labels = official(tokenizer, RECORD)
    assert got["input_ids"] == ids and got["labels"] == labels


def test_metaspace_response_start_differs_between_modes(metaspace):
    """The reason the option exists: a separate response gets a word-start prefix."""
    joint = tokenize_record(metaspace, RECORD, "alpaca", 512, tokenization="joint")
    separate = tokenize_record(metaspace, RECORD, "alpaca", 512, tokenization="separate")
    first = lambda s: next(i for i, lab in zip(s["input_ids"], s["labels"]) if lab != IGNORE_INDEX)  # noqa: E731
    assert metaspace.convert_ids_to_tokens(first(separate)).startswith("▁")
    assert not metaspace.convert_ids_to_tokens(first(joint)).startswith("▁")
    assert joint["input_ids"] != separate["input_ids"]


def test_separate_keeps_an_exact_boundary(byte_level):
    prompt, response = render(RECORD, "alpaca")
    got = tokenize_record(byte_level, RECORD, "alpaca", 512, tokenization="separate")
    supervised = [i for i, lab in zip(got["input_ids"], got["labels"]) if lab != IGNORE_INDEX]
    assert supervised == byte_level(response, add_special_tokens=False)["input_ids"] + [
        byte_level.eos_token_id
    ]


def test_joint_truncation_and_bad_value(byte_level):
    got = tokenize_record(byte_level, RECORD, "alpaca", 10, tokenization="joint")
    assert got["truncated"] and len(got["input_ids"]) == 10
    with pytest.raises(ConfigError, match="tokenization='both'"):
        tokenize_record(byte_level, RECORD, "alpaca", 512, tokenization="both")
    with pytest.raises(ConfigError, match="tokenization='both'"):
        SFTBatcher(byte_level, "alpaca", 64, 2, 0, 0, 0, tokenization="both")


PAPER_STAGES = ["align.yaml", "finetune.yaml"] + [
    f"defenses/{p.name}" for p in sorted((REPO / "configs" / "paper" / "defenses").glob("*.yaml"))
]


@pytest.mark.parametrize("stage", PAPER_STAGES)
def test_paper_stages_tokenise_jointly(stage):
    """Paper runs (and the realignment sets they record for repair) are tokenised as the official
    code does; a defense fragment is composed over its base stage."""
    from test_configs import resolve

    paper = REPO / "configs" / "paper"
    configs = [paper / stage]
    if stage.startswith("defenses/"):
        configs.insert(0, paper / f"{stage.rsplit('_', 1)[-1]}")
    assert resolve(*configs)["data"]["init_args"]["tokenization"] == "joint"


def test_paper_repair_tokenises_as_its_fine_tune():
    """The repair stage has no tokenisation of its own: it reuses the fine-tune's recorded settings."""
    from test_configs import resolve

    data = resolve(REPO / "configs" / "paper" / "repair.yaml")["data"]
    assert data["class_path"] == "antidote_pl.training.realignment.RealignmentDataModule"
    assert "tokenization" not in data["init_args"]
