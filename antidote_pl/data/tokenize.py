"""Tokenisation with prompt masking, truncation accounting, and the right-padding collator.

Two ways to build a sample (``tokenization``):

* ``joint`` (the official Antidote code, used by ``configs/paper``): ``tokenizer(prompt + response)``
  plus EOS, with the first ``len(tokenizer(prompt))`` positions masked. On SentencePiece/Metaspace
  tokenizers (Llama-2, Mistral) the first response token then carries no word-start prefix, exactly as
  in the paper's runs; where a merge crosses the boundary the mask can be off by a token, as upstream.
* ``separate`` (the default elsewhere): ``tokenizer(prompt) + tokenizer(response) + [eos]``, so the
  supervised span starts exactly at the first response token whatever the tokenizer.

Truncation is counted and reported, never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from antidote_pl.data.records import Record
from antidote_pl.data.templates import get_template, render
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_int

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TOKENIZATIONS = ("separate", "joint")


def _check_max_length(max_length: int) -> None:
    check_int("max_length", max_length, 1)


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise bad_value("tokenizer.eos_token_id", eos, "a tokenizer with an EOS token")
    return int(eos)


def _prompt_ids(tokenizer: Any, prompt: str, eos: int) -> list[int]:
    """Tokenises the prompt with the tokenizer's special tokens (BOS where it adds one).

    Some tokenizers append EOS to every encoded sequence; that EOS would sit between prompt and
    response, so it is dropped. A lone special token (e.g. OPT, whose BOS id equals its EOS id, on
    the empty prompt of the ``raw`` template) is kept.
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos_text = tokenizer.eos_token or ""
    if len(ids) > 1 and ids[-1] == eos and not (eos_text and prompt.endswith(eos_text)):
        ids.pop()
    return ids


def check_tokenization(tokenization: str, field: str = "tokenization") -> str:
    """Returns ``tokenization`` if it is one of :data:`TOKENIZATIONS`, else raises a ConfigError."""
    check_choice(field, tokenization, TOKENIZATIONS)
    return tokenization


def _sample_ids(tokenizer: Any, prompt: str, response: str, eos: int, tokenization: str):
    """``(input_ids, n_prompt)`` of one sample, EOS appended, before truncation."""
    prompt_ids = _prompt_ids(tokenizer, prompt, eos)
    if tokenization == "joint":
        # As upstream: the joint string's ids, the prompt masked by the length of its own ids.
        ids = _prompt_ids(tokenizer, prompt + response, eos) if response else prompt_ids
        return [*ids, eos], min(len(prompt_ids), len(ids))
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    return [*prompt_ids, *response_ids, eos], len(prompt_ids)


def tokenize_record(
    tokenizer: Any, record: Record, template: str, max_length: int, tokenization: str = "separate"
) -> dict[str, Any]:
    """Tokenises one record with labels masked on the prompt.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        record: A record (see :mod:`antidote_pl.data.records`).
        template: A key of :data:`antidote_pl.data.templates.TEMPLATES`.
        max_length: Maximum sequence length; longer samples lose their tail.
        tokenization: ``separate`` or ``joint`` (official); see the module docstring.

    Returns:
        ``input_ids`` and ``labels`` (lists of ints, ``-100`` on the prompt), ``truncated`` and
        ``n_response_tokens`` (supervised positions left after truncation, EOS included).

    Raises:
        ConfigError: on a bad template, ``max_length`` or ``tokenization``, or a tokenizer without EOS.
    """
    _check_max_length(max_length)
    check_tokenization(tokenization)
    eos = _eos_id(tokenizer)
    prompt, response = render(record, template, tokenizer)
    input_ids, n_prompt = _sample_ids(tokenizer, prompt, response, eos, tokenization)
    labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    n_response = sum(1 for x in labels if x != IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated, "n_response_tokens": n_response}


class TokenizedDataset(Dataset):
    """Tokenised samples plus the statistics of how they were built.

    Attributes:
        samples: Dicts with ``input_ids`` and ``labels`` (lists of ints).
        n_total: Number of samples.
        n_truncated: Samples cut at ``max_length``.
        n_without_response: Samples whose labels are all ``-100`` (prompt alone filled ``max_length``).
        max_length: The limit used.
    """

    def __init__(
        self, samples: list[dict[str, list[int]]], n_truncated: int, n_without_response: int, max_length: int
    ):
        self.samples = samples
        self.n_total = len(samples)
        self.n_truncated = n_truncated
        self.n_without_response = n_without_response
        self.max_length = max_length

    def __len__(self) -> int:
        return self.n_total

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[index]

    def stats(self) -> dict[str, int]:
        """Returns the counts, for logging and run metadata."""
        return {
            "n_total": self.n_total,
            "n_truncated": self.n_truncated,
            "n_without_response": self.n_without_response,
        }


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Record],
    template: str,
    max_length: int,
    name: str = "data",
    tokenization: str = "separate",
) -> TokenizedDataset:
    """Tokenises records into a :class:`TokenizedDataset`, reporting truncation.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        records: Records to tokenise, in order.
        template: A key of :data:`antidote_pl.data.templates.TEMPLATES`.
        max_length: Maximum sequence length.
        name: What the records are (used in log and error messages).
        tokenization: ``separate`` or ``joint`` (official); see the module docstring.

    Raises:
        ConfigError: on an empty record list, a bad template/``max_length``, or when no sample keeps a
            single response token (``max_length`` shorter than every prompt).
    """
    _check_max_length(max_length)
    get_template(template)
    check_tokenization(tokenization)
    if not records:
        raise ConfigError(f"{name}: no records to tokenise (the source or the selection is empty).")
    samples, n_truncated, n_without = [], 0, 0
    for record in records:
        s = tokenize_record(tokenizer, record, template, max_length, tokenization)
        n_truncated += s["truncated"]
        n_without += s["n_response_tokens"] == 0
        samples.append({"input_ids": s["input_ids"], "labels": s["labels"]})
    if n_truncated:
        log.warning(
            "%s: %d of %d samples truncated at max_length=%d (%d left without any response token).",
            name,
            n_truncated,
            len(samples),
            max_length,
            n_without,
        )
    if n_without == len(samples):
        raise bad_value(
            "max_length",
            max_length,
            f"a length above the prompt lengths: all {len(samples)} {name} samples lost every response token",
        )
    return TokenizedDataset(samples, n_truncated, n_without, max_length)


class SFTCollator:
    """Right-pads a list of samples into a training batch.

    ``attention_mask`` comes from the true lengths rather than ``input_ids != pad``, because the pad
    id often equals the EOS id and the supervised EOS must stay visible.

    Args:
        pad_token_id: Id used to pad ``input_ids``.

    Raises:
        ConfigError: if ``pad_token_id`` is not an int.
    """

    def __init__(self, pad_token_id: int):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise bad_value("pad_token_id", pad_token_id, "an int (set tokenizer.pad_token)")
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Returns ``input_ids``, ``attention_mask`` and ``labels`` as ``(B, T)`` long tensors."""
        width = max(len(s["input_ids"]) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            n = len(s["input_ids"])
            input_ids[row, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(s["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
