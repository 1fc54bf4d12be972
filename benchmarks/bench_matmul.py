"""The physical limit: fp32 vs bf16 matmul throughput on this CPU at SmolLM2-135M's shapes (issue #26).

Each case is one ``torch.nn.functional.linear`` (what every ``nn.Linear`` of the model runs):
an ``[M, K]`` input times a ``[N, K]`` weight, ``2*M*K*N`` floating-point operations. The shapes are
SmolLM2's (hidden 576, intermediate 1536, vocabulary 49,152) at the pipeline's two operating points:
a training step of 8 x 128 tokens (M = 1024) and a generation step of a 40-prompt batch (M = 40).
For every case, thread count and dtype: GFLOP/s from the median over ``--repeats`` timed batches of
calls (each batch lasting at least ``--min-seconds``), wall and process CPU time; the dtypes
alternate within each repeat so that machine load hits both alike.

:func:`step_flops` estimates the FLOPs of each pipeline step (a LoRA training step, generation with a
KV cache, a scoring forward), so that a measured step time gives the fraction of the limit it reaches
(``BENCHMARKS.md``). Run from the repository root on a quiet machine::

    python benchmarks/bench_matmul.py --threads 1 2 --out benchmarks/results/matmul_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that set a Llama-style model's FLOPs (defaults: SmolLM2-135M)."""

    hidden: int = 576
    intermediate: int = 1536
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152

    @property
    def body_params(self) -> int:
        """Weights multiplied per token in the decoder layers (q, k, v, o and the gated MLP)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (q_o + k_v + 3 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        """The LM head's weights (tied to the embedding in SmolLM2; the lookup itself is free)."""
        return self.hidden * self.vocab

    def attention_flops(self, queries: int, keys: int) -> int:
        """Scores and weighted values of ``queries`` positions over ``keys`` positions, all layers."""
        return 2 * 2 * queries * keys * self.heads * self.head_dim * self.layers

    def lora_params(self, rank: int, targets: tuple[str, ...] = ("q", "k", "v")) -> int:
        """Weights of a rank-``rank`` LoRA on the given projections, all layers."""
        out = {"q": self.heads * self.head_dim, "k": self.kv_heads * self.head_dim}
        out |= {"v": out["k"], "o": self.hidden}
        return self.layers * sum(rank * (self.hidden + out[t]) for t in targets)


SMOLLM2 = LlamaShape()


def step_flops(step: str, shape: LlamaShape = SMOLLM2, *, rank: int = 16, **sizes: int) -> dict[str, float]:
    """Estimated FLOPs of one pipeline step (matmuls and attention; norms, activations and the
    optimizer are ignored, under 1% here).

    Args:
        step: ``train`` (``batch`` x ``tokens``: a LoRA step on a frozen base: the forward,
            input gradients through every frozen matmul (1x forward) and weight plus input gradients
            of the LoRA factors (2x their forward); logits for every position),
            ``generate`` (``prompts`` x ``prompt_tokens`` prompt, ``new_tokens`` greedy tokens with
            a KV cache; the head runs for the last position only), or ``score`` (the Wanda
            calibration forward over ``samples`` x ``tokens``, without the LM head, which the early
            stop skips; an upper bound, the last layer also stops early).
        shape: The model's sizes.
        rank: LoRA rank (``train``).
        **sizes: The step's sizes named above.

    Returns:
        ``{"forward": ..., "backward": ..., "total": ...}`` in FLOPs (backward 0 outside ``train``).
    """
    if step == "train":
        batch, tokens = sizes["batch"], sizes["tokens"]
        n = batch * tokens
        matmul = 2 * (shape.body_params + shape.head_params) * n
        attention = batch * shape.attention_flops(tokens, tokens)
        lora = 2 * shape.lora_params(rank) * n
        forward = matmul + attention + lora
        backward = matmul + 2 * attention + 2 * lora
    elif step == "generate":
        prompts, prompt_tokens, new = sizes["prompts"], sizes["prompt_tokens"], sizes["new_tokens"]
        prefill = 2 * shape.body_params * prompts * prompt_tokens + 2 * shape.head_params * prompts
        prefill += prompts * shape.attention_flops(prompt_tokens, prompt_tokens)
        # Each later token: one position through the whole model, attending to the cache so far.
        decode = sum(
            prompts
            * (2 * (shape.body_params + shape.head_params) + shape.attention_flops(1, prompt_tokens + t))
            for t in range(1, new)
        )
        forward, backward = prefill + decode, 0
    elif step == "score":
        samples, tokens = sizes["samples"], sizes["tokens"]
        forward = 2 * shape.body_params * samples * tokens + samples * shape.attention_flops(tokens, tokens)
        backward = 0
    else:
        raise ValueError(f"step={step!r}: expected 'train', 'generate' or 'score'")
    return {"forward": float(forward), "backward": float(backward), "total": float(forward + backward)}


#: (name, M, K, N): input rows, input features, output features of one linear.
CASES = (
    ("train q/o proj", 1024, 576, 576),
    ("train mlp up/gate", 1024, 576, 1536),
    ("train mlp down", 1024, 1536, 576),
    ("train lm head", 1024, 576, 49152),
    ("gen mlp up/gate", 40, 576, 1536),
    ("gen mlp down", 40, 1536, 576),
    ("gen lm head", 40, 576, 49152),
)


def _time_calls(x: torch.Tensor, w: torch.Tensor, calls: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        torch.nn.functional.linear(x, w)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(
    m: int, k: int, n: int, threads: int, repeats: int, min_seconds: float, dtypes: list[str]
) -> dict[str, dict[str, Any]]:
    """Median seconds per call and GFLOP/s of an ``[m, k] x [n, k]^T`` linear, per dtype."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        d: (torch.randn(m, k, generator=gen).to(DTYPES[d]), torch.randn(n, k, generator=gen).to(DTYPES[d]))
        for d in dtypes
    }
    calls = {}
    for d, (x, w) in tensors.items():
        _time_calls(x, w, 2)  # warm-up: kernel selection, caches
        once, _ = _time_calls(x, w, 1)
        calls[d] = max(1, int(min_seconds / max(once, 1e-6)))
    samples: dict[str, list[tuple[float, float]]] = {d: [] for d in dtypes}
    for _ in range(repeats):
        for d, (x, w) in tensors.items():
            wall, cpu = _time_calls(x, w, calls[d])
            samples[d].append((wall / calls[d], cpu / calls[d]))
    flops = 2 * m * k * n
    out = {}
    for d, s in samples.items():
        wall = statistics.median(w for w, _ in s)
        cpu = statistics.median(c for _, c in s)
        out[d] = {
            "seconds_per_call": wall,
            "cpu_seconds_per_call": cpu,
            "gflops": flops / wall / 1e9,
            "gflops_per_cpu_second": flops / cpu / 1e9 if cpu > 0 else None,
            "calls_per_repeat": calls[d],
        }
    return out


def cpu_flags() -> list[str]:
    """The CPU's matrix and vector extensions that decide bf16 speed (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return [f for f in wanted if f in flags]


def reference_steps() -> dict[str, dict[str, Any]]:
    """The SmolLM2 pipeline's steps at its configured sizes, with their estimated FLOPs."""
    steps = {
        "training step (8 x 128 tokens, LoRA r=16 on q/k/v)": ("train", {"batch": 8, "tokens": 128}),
        "generation (40 prompts x 60 tokens, 48 new)": (
            "generate",
            {"prompts": 40, "prompt_tokens": 60, "new_tokens": 48},
        ),
        "scoring forward (128 samples x 100 tokens)": ("score", {"samples": 128, "tokens": 100}),
    }
    return {name: {"step": s, "sizes": sz, **step_flops(s, **sz)} for name, (s, sz) in steps.items()}


def _table(results: list[dict[str, Any]], dtypes: list[str]) -> str:
    head = ["case", "M x K x N", "threads", *(f"{d} GFLOP/s" for d in dtypes)]
    if "fp32" in dtypes and "bf16" in dtypes:
        head.append("bf16 / fp32")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["case"], "x".join(map(str, r["shape"])), str(r["threads"])]
        cells += [f"{r['by_dtype'][d]['gflops']:.0f}" for d in dtypes]
        if "fp32" in dtypes and "bf16" in dtypes:
            cells.append(f"{r['by_dtype']['bf16']['gflops'] / r['by_dtype']['fp32']['gflops']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="length of one timed batch of calls")
    parser.add_argument("--cases", nargs="+", default=None, help="case names to run (default: all)")
    parser.add_argument("--out", default=None, help="JSON result file (written atomically)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_seconds <= 0 or any(t < 1 for t in args.threads):
        parser.error("--repeats and --threads must be >= 1, --min-seconds > 0")
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases]
    load_before = os.getloadavg()
    results = []
    for threads in args.threads:
        for name, m, k, n in cases:
            by_dtype = measure(m, k, n, threads, args.repeats, args.min_seconds, args.dtypes)
            results.append({"case": name, "shape": [m, k, n], "threads": threads, "by_dtype": by_dtype})
    result = {
        "command": " ".join(["python benchmarks/bench_matmul.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
        },
        "torch": torch.__version__,
        "repeats": args.repeats,
        "min_seconds": args.min_seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "model_shape": asdict(SMOLLM2),
        "steps": reference_steps(),
    }
    print(_table(results, args.dtypes))
    print(f"load average before {load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}")
    for name, s in result["steps"].items():
        print(f"{name}: {s['total'] / 1e9:.1f} GFLOP")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from antidote_pl.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
