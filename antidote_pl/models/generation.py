"""Batched, left-padded greedy generation, plus helpers to shard prompts over DDP ranks.

The official Antidote evaluation generates one prompt at a time (reference C.0, G.9). Here prompts
are sorted by length, packed into left-padded batches and decoded back in their original order;
with the same greedy settings the text is identical to the one-at-a-time loop (see
``tests/test_eval_generation.py``), only faster (``benchmarks/bench_generation.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from antidote_pl.errors import bad_value
from antidote_pl.utils.io import atomic_write_text

T = TypeVar("T")


def _check_args(prompts: Sequence[str], max_new_tokens: int, batch_size: int = 1) -> None:
    if isinstance(prompts, str):
        raise bad_value("prompts", prompts, "a list of strings, not a single string")
    if max_new_tokens < 1:
        raise bad_value("max_new_tokens", max_new_tokens, "an integer >= 1")
    if batch_size < 1:
        raise bad_value("batch_size", batch_size, "an integer >= 1")


def _generation_kwargs(tokenizer, max_new_tokens: int, greedy: bool, stop_at_eos: bool) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` shared by the batched and the reference loop.

    Every sampling knob is given explicitly because ``generate`` otherwise falls back to the
    model's own ``generation_config`` (chat models often ship ``do_sample=True``, ``top_p=0.9``).
    """
    # Called inside ``_generation_mode``, which guarantees a pad token.
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "do_sample": not greedy,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not greedy:
        # Plain ancestral sampling: no temperature, nucleus or top-k filtering inherited silently.
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
    if not stop_at_eos:
        # ``eos_token_id=None`` would be refilled from the model's generation_config; an empty list
        # means "no stop token" (checked with transformers 5.24).
        kwargs["eos_token_id"] = []
    elif tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return kwargs


@contextlib.contextmanager
def _generation_mode(model: nn.Module, tokenizer) -> Iterator[None]:
    """Eval mode, inference mode and left padding (borrowing EOS as pad if needed), then restored."""
    was_training = model.training
    padding_side = tokenizer.padding_side
    borrow_pad = tokenizer.pad_token is None
    if borrow_pad:
        if tokenizer.eos_token is None:
            raise bad_value("tokenizer.pad_token", None, "a pad or EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    # Left padding keeps every prompt's last token at the right edge, where generation appends.
    tokenizer.padding_side = "left"
    hook = _contiguous_head_input(model)
    try:
        with torch.inference_mode():
            yield
    finally:
        if hook is not None:
            hook.remove()
        tokenizer.padding_side = padding_side
        if borrow_pad:
            tokenizer.pad_token = None
        model.train(was_training)


def _contiguous_head_input(model: nn.Module):
    """Makes the output head's input contiguous while generating; returns the hook's handle.

    Why: the prefill hands the LM head only the last position, a strided view of the hidden states
    (``logits_to_keep=1``). On CPU, bf16 ``linear`` over that view with a frozen weight (torch
    2.13) falls back to a batched matmul that first copies the head's weight once per prompt
    (40 x 49,152 x 576 values for a SmolLM2 batch): 60-70% of a bf16 prefill's time
    (``benchmarks/bench_prefill.py``). A contiguous input takes the plain matrix product: the same
    products, summed by another kernel (bf16 logits may differ in their last bit).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return None
    return head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def _device_of(model: nn.Module) -> torch.device:
    # HF models expose ``device`` (the input embedding's device, also right for device_map models).
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _progress(enabled: bool):
    """A transient rich progress bar, or ``None`` (through a null context) when disabled."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import Progress

    return Progress(transient=True)


def _decode_new(tokenizer, output_ids: torch.Tensor, prompt_len: int) -> list[str]:
    return tokenizer.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Groups indices into batches of similar length, longest first.

    Longest-first puts the most memory-hungry batch at the start, so an out-of-memory error shows
    up immediately rather than after most of the work.

    Args:
        lengths: Token length of each prompt.
        batch_size: Maximum batch size.

    Returns:
        Lists of original indices; together they cover ``range(len(lengths))`` exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    greedy: bool = True,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> list[str]:
    """Generates a completion for every prompt, in batches, and returns them in input order.

    Prompts are tokenized with the tokenizer's own special-token settings, sorted by length and
    left-padded per batch. Only the new tokens are decoded (special tokens skipped), so each result
    is the response alone, like the official ``split("### Response:")[1]`` without the split.

    Args:
        model: A Hugging Face causal LM (anything with ``generate``).
        tokenizer: The matching tokenizer; needs a pad or EOS token. Its padding side is restored.
        prompts: Fully formatted prompts.
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per ``generate`` call.
        greedy: Greedy decoding (the paper's setting); ``False`` samples at temperature 1.
        stop_at_eos: Stop a sequence at the tokenizer's EOS token; ``False`` always generates
            ``max_new_tokens`` tokens (useful for throughput measurements).
        progress: Show a progress bar.

    Returns:
        One decoded response per prompt, in the order of ``prompts``.

    Raises:
        ConfigError: on a bad ``max_new_tokens`` or ``batch_size``, or a string instead of a list.
    """
    _check_args(prompts, max_new_tokens, batch_size)
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    results: list[str | None] = [None] * len(prompts)
    device = _device_of(model)
    with _generation_mode(model, tokenizer), _progress(progress) as bar:
        kwargs = _generation_kwargs(tokenizer, max_new_tokens, greedy, stop_at_eos)
        task = bar.add_task("generating", total=len(prompts)) if bar is not None else None
        for batch in length_sorted_batches(lengths, batch_size):
            # Re-tokenizing the batch is cheap and avoids the slow ``tokenizer.pad`` path.
            padded = tokenizer([prompts[i] for i in batch], padding=True, return_tensors="pt")
            input_ids = padded["input_ids"].to(device)
            # HF derives position ids from the attention mask, so left padding does not shift them.
            out = model.generate(
                input_ids=input_ids, attention_mask=padded["attention_mask"].to(device), **kwargs
            )
            for i, text in zip(batch, _decode_new(tokenizer, out, input_ids.shape[1])):
                results[i] = text
            if bar is not None:
                bar.advance(task, len(batch))
    return results  # type: ignore[return-value]


def generate_one_by_one(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    greedy: bool = True,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> list[str]:
    """The unbatched reference loop (how the official scripts generate), for tests and benchmarks.

    Same arguments and result as :func:`generate`, without ``batch_size``.
    """
    _check_args(prompts, max_new_tokens)
    device = _device_of(model)
    results = []
    with _generation_mode(model, tokenizer), _progress(progress) as bar:
        kwargs = _generation_kwargs(tokenizer, max_new_tokens, greedy, stop_at_eos)
        task = bar.add_task("generating", total=len(prompts)) if bar is not None else None
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            input_ids = enc["input_ids"].to(device)
            out = model.generate(
                input_ids=input_ids, attention_mask=enc["attention_mask"].to(device), **kwargs
            )
            results.extend(_decode_new(tokenizer, out, input_ids.shape[1]))
            if bar is not None:
                bar.advance(task, 1)
    return results


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_for_rank(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``.

    Strided (not contiguous) sharding keeps shard sizes within one of each other and spreads long
    and short prompts evenly; :func:`gather_objects` undoes it.

    Raises:
        ConfigError: if ``world_size < 1`` or ``rank`` is outside ``[0, world_size)``.
    """
    if world_size < 1:
        raise bad_value("world_size", world_size, "an integer >= 1")
    if not 0 <= rank < world_size:
        raise bad_value("rank", rank, f"an integer in [0, {world_size})")
    return list(items[rank::world_size])


def interleave_shards(shards: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of :func:`shard_for_rank`: ``shards[r]`` is rank ``r``'s list, in rank order."""
    world_size = len(shards)
    total = sum(len(s) for s in shards)
    out: list[Any] = [None] * total
    for rank, shard in enumerate(shards):
        out[rank::world_size] = list(shard)
    return out


def gather_objects(local: Sequence[T], group=None) -> list[T]:
    """Collects every rank's shard (made by :func:`shard_for_rank`) back into the original order.

    Uses ``torch.distributed.all_gather_object``, so every rank receives the full list. Outside a
    distributed run it returns ``list(local)``.

    Args:
        local: This rank's results, aligned with ``shard_for_rank(items, rank, world_size)``.
        group: Optional process group; the default group otherwise.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(local)
    world_size = torch.distributed.get_world_size(group)
    shards: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(shards, list(local), group=group)
    return interleave_shards(shards)


def generate_distributed(model: nn.Module, tokenizer, prompts: list[str], **kwargs: Any) -> list[str]:
    """:func:`generate` on this rank's shard of ``prompts``; every rank gets all results, in order.

    Args:
        model: The (replicated) model on this rank's device.
        tokenizer: Its tokenizer.
        prompts: The full prompt list, identical on every rank.
        **kwargs: Passed to :func:`generate`.
    """
    rank, world_size = rank_and_world_size()
    local = generate(model, tokenizer, shard_for_rank(prompts, rank, world_size), **kwargs)
    return gather_objects(local)


def write_generations_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object per line (``prompt``, ``response``, ``verdict``, ``category``, ...).

    The file is written atomically; non-ASCII text is kept readable rather than escaped.
    """
    lines = [json.dumps(row, ensure_ascii=False, default=str) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
