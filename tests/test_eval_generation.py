"""Batched generation equals the one-at-a-time reference loop; sharding over ranks round-trips."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.multiprocessing as mp

from antidote_pl.errors import ConfigError
from antidote_pl.models.generation import (
    gather_objects,
    generate,
    generate_distributed,
    generate_one_by_one,
    interleave_shards,
    length_sorted_batches,
    shard_for_rank,
    write_generations_jsonl,
)

WORDS = [f"w{i}" for i in range(36)]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Runs each test on one torch thread.

    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the default two
    threads oversubscribe the cores (forwards measured 60x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_tokenizer(words=WORDS, pad: bool = True):
    """A whitespace word-level tokenizer that prepends ``<bos>`` (like Llama's) and pads right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    core.decoder = decoders.WordPiece()  # joins words with single spaces
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if pad:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=core, padding_side="right", **specials)


def tiny_llama(vocab_size: int, seed: int = 0, attn: str = "sdpa", hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).float()


def random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_equals_one_by_one(attn):
    tok = word_tokenizer()
    model = tiny_llama(len(tok), attn=attn)
    prompts = random_prompts(11)
    assert len({len(p.split()) for p in prompts}) > 3, "prompts must differ in length to test padding"
    ref = generate_one_by_one(model, tok, prompts, max_new_tokens=16)
    for bs in (1, 4, 32):
        assert generate(model, tok, prompts, max_new_tokens=16, batch_size=bs) == ref


def test_stop_at_eos_truncates_a_prefix():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    prompts = random_prompts(11)
    stopped = generate(model, tok, prompts, max_new_tokens=24, batch_size=4)
    full = generate(model, tok, prompts, max_new_tokens=24, batch_size=4, stop_at_eos=False)
    assert all(f.startswith(s) for s, f in zip(stopped, full))
    # The fixed seed yields EOS for some prompts, so stopping is really exercised.
    assert any(len(s) < len(f) for s, f in zip(stopped, full))
    # Without EOS stopping every response has the full budget (EOS tokens are skipped in decoding).
    n_words = [len(f.split()) for f in full]
    assert max(n_words) == 24 and all(n <= 24 for n in n_words)


def test_sampling_is_seeded_and_differs_from_greedy():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    prompts = random_prompts(6, seed=1)
    torch.manual_seed(123)
    first = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, greedy=False)
    torch.manual_seed(123)
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=3, greedy=False) == first
    assert first != generate(model, tok, prompts, max_new_tokens=12, batch_size=3)


def test_state_restored_and_order_kept():
    tok = word_tokenizer()
    model = tiny_llama(len(tok)).train()
    prompts = ["w1 w2 w3 w4 w5", "w1", "w1 w2 w3 w4 w5", "w7 w8"]
    out = generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert model.training and tok.padding_side == "right"
    assert out[0] == out[2]
    assert out[1] == generate(model, tok, ["w1"], max_new_tokens=5)[0]
    assert generate(model, tok, [], max_new_tokens=5) == []


def test_head_sees_contiguous_inputs_while_generating_and_the_hook_goes_after():
    """The prefill's last-position slice reaches the head contiguous (a strided one sends bf16
    ``linear`` on CPU through a batched matmul that copies the head's weight per prompt)."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    head = model.get_output_embeddings()
    seen: list[bool] = []
    # A forward hook sees the input as the head's forward got it, after every pre-hook.
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        generate(model, tok, random_prompts(6, seed=2), max_new_tokens=3, batch_size=3)
    finally:
        probe.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks  # nothing of generate's stays on the model
    # The slice really is strided: without generate's hook, a prefill hands the head a view.
    seen.clear()
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = tok(["w1 w2 w3", "w4 w5 w6"], return_tensors="pt")["input_ids"]
    model(input_ids=ids, logits_to_keep=1)
    probe.remove()
    assert seen == [False]


def test_borrows_eos_as_pad_and_restores():
    tok = word_tokenizer(pad=False)
    model = tiny_llama(len(tok))
    prompts = random_prompts(5, seed=3)
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=5) == generate_one_by_one(
        model, tok, prompts, max_new_tokens=6
    )
    assert tok.pad_token is None


def test_bad_arguments_raise_config_error():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    with pytest.raises(ConfigError, match="prompts"):
        generate(model, tok, "w1 w2", max_new_tokens=4)
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        generate(model, tok, ["w1"], max_new_tokens=0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        generate(model, tok, ["w1"], max_new_tokens=2, batch_size=0)


def test_length_sorted_batches_cover_all_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [lengths[i] for i in batches[0]] == [9, 9, 7]
    assert all(len(b) <= 3 for b in batches)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_and_interleave_round_trip(n, world):
    items = list(range(n))
    shards = [shard_for_rank(items, r, world) for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert interleave_shards(shards) == items
    assert gather_objects(shards[0]) == shards[0]  # no process group: identity


def test_shard_for_rank_rejects_bad_rank():
    with pytest.raises(ConfigError, match="rank=2"):
        shard_for_rank([1, 2], 2, 2)
    with pytest.raises(ConfigError, match="world_size=0"):
        shard_for_rank([1, 2], 0, 0)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        tok = word_tokenizer()
        model = tiny_llama(len(tok))
        prompts = random_prompts(7, seed=5)
        texts = generate_distributed(model, tok, prompts, max_new_tokens=8, batch_size=2)
        numbers = gather_objects(shard_for_rank(list(range(9)), rank, world_size))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"texts": texts, "numbers": numbers}, f)
        # Without it a rank can tear its gloo pairs down while the other still talks to it
        # ("terminate called without an active exception", SIGABRT) about one run in three.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_generate_distributed_two_gloo_ranks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    tok = word_tokenizer()
    expected = generate(tiny_llama(len(tok)), tok, random_prompts(7, seed=5), max_new_tokens=8)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["texts"] == expected
        assert got["numbers"] == list(range(9))


def test_write_generations_jsonl(tmp_path):
    rows = [
        {"prompt": "p1", "response": "r é", "verdict": True, "category": "x"},
        {"prompt": "p2", "response": "", "verdict": False, "category": None},
    ]
    path = tmp_path / "sub" / "gen.jsonl"
    write_generations_jsonl(path, rows)
    text = path.read_text(encoding="utf-8")
    assert "r é" in text
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["gen.jsonl"]  # no temp files left


# ------------------------------------------------------------------------- stopping and batching order
def _eos_after(model, steps_by_row: list[int], eos: int = 2) -> list[int]:
    """Makes row ``r`` of every batch choose EOS from its ``steps_by_row[r]``-th new token on; returns
    the list that counts the model's forward calls (one per generated token)."""
    calls: list[int] = []

    def hook(module, args, logits):
        calls.append(1)
        step = len(calls)
        bonus = torch.zeros_like(logits)
        for row, at in enumerate(steps_by_row):
            if step >= at:
                bonus[row, :, eos] = 1e4
        return logits + bonus

    model.lm_head.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(("ends", "expected_calls"), [([3, 3], 3), ([1, 5], 5)])
def test_generation_stops_once_every_sequence_has_ended(ends, expected_calls):
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    calls = _eos_after(model, ends)
    out = generate(model, tok, ["w1 w2 w3", "w4 w5 w6"], max_new_tokens=200, batch_size=2)
    # One forward per new token up to the last sequence's EOS, not the 200 of the budget.
    assert len(calls) == expected_calls
    # Tokens before EOS only (EOS and other special tokens are not decoded).
    assert all(len(o.split()) <= e - 1 for o, e in zip(out, ends))


def test_generation_without_eos_stopping_uses_the_whole_budget():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    calls = _eos_after(model, [1, 1])
    generate(model, tok, ["w1 w2", "w3 w4"], max_new_tokens=7, batch_size=2, stop_at_eos=False)
    assert len(calls) == 7


def _eval_data(sort_by_length: bool):
    from antidote_pl.evaluation.evaluator import EvalDataModule
    from antidote_pl.tinyworld.world import TinyWorldSource

    return EvalDataModule(
        harmful=TinyWorldSource("harmful_answer", split="eval", limit=9),
        task=TinyWorldSource("sentiment", split="eval"),
        task_name="sst2",
        template="tiny",
        task_limit=7,
        fa_validation_size=5,
        batch_size=4,
        sort_by_length=sort_by_length,
    )


def test_sorted_batches_keep_kinds_apart_longest_first():
    from antidote_pl.tinyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    plain, ordered = _eval_data(False), _eval_data(True)
    ordered.order_by_length(tok)
    batches = list(ordered.test_dataloader())
    items = [i for b in batches for i in b]
    assert sorted(i["index"] for i in items) == list(range(21))
    assert ordered.fingerprint() == plain.fingerprint()  # the prompts are the same, only batched otherwise
    kinds = [i["kind"] for i in items]
    assert kinds == ["harmful"] * 9 + ["task"] * 7 + ["task_val"] * 5
    lengths = [len(tok(i["prompt"])["input_ids"]) for i in items]
    for kind in ("harmful", "task", "task_val"):
        own = [n for n, k in zip(lengths, kinds) if k == kind]
        assert own == sorted(own, reverse=True)
    assert len(set(lengths[:9])) > 1, "prompts must differ in length for the order to mean anything"
    # Unsorted, the loader keeps the items' order.
    assert [i["index"] for b in plain.test_dataloader() for i in b] == list(range(21))


def test_evaluator_reports_sorted_batches_in_the_original_order(tmp_path, monkeypatch):
    import lightning as L
    from conftest import TINY_LLAMA, quiet_trainer_kwargs

    from antidote_pl.evaluation import evaluator as ev
    from antidote_pl.training.sft import CausalLMSFTModule

    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(tmp_path / "stage")
    )
    seen: list[list[str]] = []

    def answer(model, tok, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return [f"answer {len(p)} {p[-12:]}" for p in prompts]  # a function of the prompt alone

    monkeypatch.setattr(ev, "generate", answer)

    def run(sort: bool, name: str):
        evaluator = ev.StageEvaluator(str(tmp_path / "stage"), output_dir=str(tmp_path / name))
        trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path))
        trainer.test(evaluator, datamodule=_eval_data(sort), verbose=False)
        return evaluator.results, (tmp_path / name / "generations.jsonl").read_text()

    plain_results, plain_rows = run(False, "plain")
    plain_calls = list(seen)
    seen.clear()
    sorted_results, sorted_rows = run(True, "sorted")
    # Same answers and rates; the results record how the prompts were batched.
    assert (sorted_results.pop("sort_by_length"), plain_results.pop("sort_by_length")) == (True, False)
    assert sorted_rows == plain_rows and sorted_results == plain_results
    assert sorted(p for c in seen for p in c) == sorted(p for c in plain_calls for p in c)
    assert seen != plain_calls  # the batches really were formed otherwise
