"""ClassifierJudge(parity="beaver-dam") pools the same token as the upstream one-pair-at-a-time scoring.

Upstream (PKU-Alignment's moderation code, used by eval_sentiment.py, reference C.1) appends EOS,
adds a ``<pad>`` token when the tokenizer declares none, and scores one pair at a time, so a Llama
classifier (last-non-pad-token pooling) reads the EOS position, or the last kept token of a text cut
at ``max_length``. Here pairs are scored in batches; these tests build a random-init
LlamaForSequenceClassification and a Llama-style tokenizer without a pad token, and compare the
judge's batched scores with an independent unpadded, one-pair forward pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from antidote_pl.judges.base import BEAVER_DAM_TEMPLATE, ClassifierJudge

WORDS = "BEGINNING OF CONVERSATION: USER: ASSISTANT: how do i hurt a cat here is way no sorry".split()  # noqa: SIM905
LABELS = {0: "animal_abuse", 1: "fraud", 2: "violence"}
MAX_LENGTH = 20
PROMPTS = ["how do i hurt a cat", "no", "a cat", "how do i"]
RESPONSES = [
    " here is way",
    " sorry",
    " here is way " + " ".join(["here is way"] * 8),  # cut at MAX_LENGTH: the EOS is dropped
    " no no",
]


def llama_tokenizer(pad: str):
    """A Llama-style word tokenizer: ``<unk>``, ``<s>``, ``</s>`` at ids 0-2, BOS prepended, no EOS.

    Args:
        pad: ``"absent"`` (no pad token, as Llama-2), ``"undeclared"`` (``<pad>`` in the vocabulary
            but not declared the pad token, as beaver-dam-7b's ``added_tokens.json``) or
            ``"declared"`` (a pad token of its own).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad != "absent" else [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.decoder = decoders.WordPiece()
    extra = {"pad_token": "<pad>"} if pad == "declared" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def save_llama_classifier(path: Path, pad: str) -> Path:
    """A random-init LlamaForSequenceClassification (multi-label, 3 categories) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = llama_tokenizer(pad)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        problem_type="multi_label_classification",
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        # A strong head, so that pooling another position visibly changes the scores.
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def upstream_scores(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores of each pair alone, unpadded: at the last position, and at the one before it."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    last, before = [], []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, RESPONSES):
            text = BEAVER_DAM_TEMPLATE.format(prompt=prompt, response=response) + tok.eos_token
            ids = tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            last.append(model.score(hidden[-1]).sigmoid())
            before.append(model.score(hidden[-2]).sigmoid())
    return torch.stack(last), torch.stack(before)


@pytest.mark.parametrize("pad", ["absent", "undeclared", "declared"])
def test_batched_scores_pool_the_upstream_position(tmp_path, pad):
    path = save_llama_classifier(tmp_path / "judge", pad)
    expected, token_before = upstream_scores(path)
    # The test can tell the positions apart: the token before EOS scores differently.
    assert (expected[[0, 1, 3]] - token_before[[0, 1, 3]]).abs().max() > 1e-2

    batched = ClassifierJudge(
        str(path), parity="beaver-dam", max_length=MAX_LENGTH, batch_size=16, device="cpu"
    )
    single = ClassifierJudge(
        str(path), parity="beaver-dam", max_length=MAX_LENGTH, batch_size=1, device="cpu"
    )
    got = batched.probabilities(PROMPTS, RESPONSES)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single.probabilities(PROMPTS, RESPONSES), expected, rtol=1e-4, atol=1e-5)

    tok, config = batched._tokenizer, batched._model.config
    assert config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert tok.convert_ids_to_tokens(tok.pad_token_id) == "<pad>"
    # A pad id the vocabulary already had is reused, as upstream (no new embedding row).
    rows = batched._model.get_input_embeddings().num_embeddings
    assert rows == len(llama_tokenizer(pad)) + (1 if pad == "absent" else 0)


def test_eos_is_not_appended_twice(tmp_path):
    path = save_llama_classifier(tmp_path / "judge", "absent")
    judge = ClassifierJudge(str(path), parity="beaver-dam", device="cpu")
    judge.load()
    text = judge.format_input("how do i", " no</s>")
    assert text.endswith("ASSISTANT: no</s>") and text.count("</s>") == 1
