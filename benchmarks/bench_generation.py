"""Throughput of batched generation vs the official one-prompt-at-a-time loop.

Both paths use the same tiny random-init Llama (the tiny world's default size: hidden 128, 4
layers, 4 heads, FFN 512, a ~600-word vocabulary), the same prompts, greedy decoding and the same
``max_new_tokens``. EOS stopping is off by default so that every prompt generates exactly
``max_new_tokens`` tokens and tokens/s compare like for like. The outputs of both paths are also
checked for equality. Threads are left at torch's default unless ``--threads`` is given: on a
machine whose cores are busy with other jobs, torch's default intra-op threads oversubscribe them
and every tiny op waits on the others (measured 60x slower forwards on a busy 2-core machine), so
pass ``--threads 1`` there.

Run from the repository root::

    python benchmarks/bench_generation.py --prompts 96 --max-new-tokens 32 --batch-sizes 8 32 96 --threads 1
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from antidote_pl.models.generation import generate, generate_one_by_one

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(vocab_words: int):
    """A whitespace word-level tokenizer over ``w0 .. w{n-1}`` that prepends ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    core.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(vocab_size: int, hidden: int, layers: int, max_positions: int, seed: int):
    """A random-init Llama in fp32 (the tiny world's architecture)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_prompts(n: int, vocab_words: int, min_len: int, max_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(rng.randint(min_len, max_len)))
        for _ in range(n)
    ]


def timed(fn, *args, **kwargs) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=96, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--min-prompt-words", type=int, default=8)
    parser.add_argument("--max-prompt-words", type=int, default=40)
    parser.add_argument("--vocab-words", type=int, default=560)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (token counts then vary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tok = build_tokenizer(args.vocab_words)
    max_positions = args.max_prompt_words + args.max_new_tokens + 8
    model = build_model(len(tok), args.hidden, args.layers, max_positions, args.seed)
    prompts = make_prompts(
        args.prompts, args.vocab_words, args.min_prompt_words, args.max_prompt_words, args.seed
    )
    opts = {"max_new_tokens": args.max_new_tokens, "stop_at_eos": args.stop_at_eos}
    generate(model, tok, prompts[:4], batch_size=4, **opts)  # warm-up (lazy init, allocator)

    def n_tokens(texts: list[str]) -> int:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    reference, ref_s = timed(generate_one_by_one, model, tok, prompts, **opts)
    ref_tps = n_tokens(reference) / ref_s
    rows = [("one-by-one", 1, ref_s, ref_tps, 1.0, True)]
    for bs in args.batch_sizes:
        out, secs = timed(generate, model, tok, prompts, batch_size=bs, **opts)
        tps = n_tokens(out) / secs
        rows.append(("batched", bs, secs, tps, tps / ref_tps, out == reference))

    print(
        f"\n{args.prompts} prompts of {args.min_prompt_words}-{args.max_prompt_words} words, "
        f"{args.max_new_tokens} new tokens each, greedy, fp32, Llama hidden {args.hidden} x "
        f"{args.layers} layers, vocab {len(tok)}, torch threads {torch.get_num_threads()}\n"
    )
    print("| method | batch size | seconds | generated tokens/s | speed-up | same text as one-by-one |")
    print("|---|---:|---:|---:|---:|---|")
    for method, bs, secs, tps, ratio, same in rows:
        print(f"| {method} | {bs} | {secs:.2f} | {tps:.0f} | {ratio:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
