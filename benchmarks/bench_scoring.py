"""Cost of Antidote's Wanda scoring on CPU: time against a plain forward pass, and extra memory.

Scoring is what :class:`~antidote_pl.callbacks.WandaPruneCallback` runs in ``on_fit_end`` (without
DDP and file output): ``find_targets`` + ``collect`` + ``run_calibration`` + ``wanda_scores`` +
``select_masks``. The baseline is a plain ``torch.no_grad()`` forward in eval mode over the *same*
batches. Because no mask is applied while calibrating, scoring is one forward pass with hooks, so the
ratio measures the hooks' overhead (target: at most 1.15).

Two models, each a random-init Llama with a LoRA (r=8, alpha=16) on q/k/v whose ``lora_B`` is drawn
non-zero, as after fine-tuning:

* ``tiny``: the tiny world's default size (``antidote_pl.tinyworld.model.tiny_llama_config``);
* ``100m``: hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, tied embeddings (~110M).

Inputs are random token batches with lengths drawn in ``[min_len, max_len]``, right padded.

Time: a warm-up pass, then ``--repeats`` rounds that each run both paths, alternating which goes
first. The table gives the medians of wall time and their ratio, and also the ratio of median process
CPU times, which other jobs competing for the cores disturb less (with one torch thread it counts the
work done).

Memory: the accumulator bytes are computed exactly from the statistics object (two fp32 vectors of
``in_features`` per target). Peak resident memory is measured in a fresh subprocess per path (inside
one process the allocator keeps freed pages, so later peaks would read low), after resetting the
kernel's high-water mark (``/proc/self/clear_refs``, Linux), over the ``--memory-batches`` widest
batches: statistics are streamed, so the widest batch sets the peak. Both paths' peaks include that
batch's activations; their difference is the cost of scoring.

Other jobs on a shared machine inflate both paths alike but make single timings noisy; the load
average before and after is recorded. Run from the repository root::

    python benchmarks/bench_scoring.py --threads 1 --out outputs/bench_scoring.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from antidote_pl.pruning import (
    collect,
    find_targets,
    run_calibration,
    select_masks,
    target_weights,
    wanda_scores,
)
from antidote_pl.utils.io import atomic_write_json

MODELS = ("tiny", "100m")
PAD_ID = 0
IGNORE_INDEX = -100


def llama_config(name: str):
    """The LlamaConfig of a benchmark model."""
    from transformers import LlamaConfig

    if name == "tiny":
        from antidote_pl.tinyworld.model import tiny_llama_config

        return LlamaConfig(**tiny_llama_config("default"))
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
    )


def build_model(name: str, seed: int) -> torch.nn.Module:
    """A random-init Llama with a LoRA (r=8) on q/k/v and non-zero ``lora_B``, in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(name))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.02)  # a fresh LoRA has B = 0; a fine-tuned one does not
    return model.eval()


def make_batches(
    vocab_size: int, samples: int, min_len: int, max_len: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Random token batches, right padded, with labels -100 on padding (as the DataModule's)."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(samples)]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, samples, batch_size):
        chunk = lengths[start : start + batch_size]
        width = max(chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, n in enumerate(chunk):
            ids[row, :n] = torch.randint(1, vocab_size, (n,), generator=gen)
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def forward_pass(model: torch.nn.Module, batches) -> None:
    """The baseline: one no-grad eval forward per batch (labels not passed, as in scoring)."""
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def scoring_pass(model: torch.nn.Module, batches, alpha: float):
    """The callback's scoring path; returns the statistics (for their exact size) and the masks."""
    targets = find_targets(model, "lora")
    with collect(model, targets) as stats:
        run_calibration(model, batches, stats, token_mask="attention")
    masks = select_masks(wanda_scores(target_weights(targets), stats, "sample_mean"), alpha, "row")
    return stats, masks


def accumulator_bytes(stats) -> int:
    """Bytes held by the statistics' accumulators (every per-feature sum vector)."""
    vectors = [*stats.sum_sq.values(), *stats.sum_sample_mean_sq.values()]
    return sum(t.numel() * t.element_size() for t in vectors)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_child(args: argparse.Namespace) -> dict:
    """In this (fresh) process: peak RSS growth during one pass of ``args.child_memory``."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model(args.model, args.seed)
    batches = make_batches(
        model.config.vocab_size, args.samples, args.min_len, args.max_len, args.batch_size, args.seed
    )
    # Statistics are streamed, so the peak is set by the widest batch; the rest would only cost time.
    batches = sorted(batches, key=lambda b: b["input_ids"].shape[1], reverse=True)[: args.memory_batches]
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kb("VmRSS")
    if args.child_memory == "forward":
        forward_pass(model, batches)
    else:
        scoring_pass(model, batches, args.alpha)
    peak = _status_kb("VmHWM")
    if before is None or peak is None or not reset:
        return {"peak_rss_delta_bytes": None, "note": "needs Linux /proc/self/{status,clear_refs}"}
    return {"peak_rss_delta_bytes": (peak - before) * 1024}


def memory_in_subprocess(args: argparse.Namespace, name: str, path: str) -> int | None:
    cmd = [sys.executable, __file__, "--child-memory", path, "--model", name]
    for flag in ("samples", "min_len", "max_len", "batch_size", "seed", "alpha", "threads", "memory_batches"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_delta_bytes"]


def bench_model(args: argparse.Namespace, name: str) -> dict:
    model = build_model(name, args.seed)
    batches = make_batches(
        model.config.vocab_size, args.samples, args.min_len, args.max_len, args.batch_size, args.seed
    )
    forward_pass(model, batches[:1])  # warm-up: one-time kernel and allocator set-up
    scoring_pass(model, batches[:1], args.alpha)
    times: dict[str, list[float]] = {"forward": [], "scoring": []}
    cpu_times: dict[str, list[float]] = {"forward": [], "scoring": []}
    stats = None
    for repeat in range(args.repeats):
        order = ("forward", "scoring") if repeat % 2 == 0 else ("scoring", "forward")
        for path in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            if path == "forward":
                forward_pass(model, batches)
            else:
                stats, _ = scoring_pass(model, batches, args.alpha)
            times[path].append(time.perf_counter() - start)
            cpu_times[path].append(time.process_time() - cpu_start)
    forward_s, scoring_s = statistics.median(times["forward"]), statistics.median(times["scoring"])
    cpu_ratio = statistics.median(cpu_times["scoring"]) / statistics.median(cpu_times["forward"])
    row = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "targets": len(stats.names),
        "batch_size": args.batch_size,
        "batches": len(batches),
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "forward_s": forward_s,
        "scoring_s": scoring_s,
        "ratio": scoring_s / forward_s,
        "cpu_ratio": cpu_ratio,
        "times": times,
        "cpu_times": cpu_times,
        "accumulator_bytes": accumulator_bytes(stats),
        "model_bytes": model_bytes(model),
    }
    del model, batches, stats
    gc.collect()
    if not args.skip_memory:
        row["forward_peak_rss_delta_bytes"] = memory_in_subprocess(args, name, "forward")
        row["scoring_peak_rss_delta_bytes"] = memory_in_subprocess(args, name, "scoring")
    return row


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| model | params | batch size | forward s | scoring s | ratio | ratio (CPU time) "
        "| accumulator bytes | model bytes "
        "| forward peak RSS Δ | scoring peak RSS Δ |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['forward_s']:.3f} "
            f"| {r['scoring_s']:.3f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['accumulator_bytes']:,} "
            f"| {r['model_bytes']:,} | {_mib(r.get('forward_peak_rss_delta_bytes'))} "
            f"| {_mib(r.get('scoring_peak_rss_delta_bytes'))} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--min-len", dest="min_len", type=int, default=64)
    parser.add_argument("--max-len", dest="max_len", type=int, default=128)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-memory", dest="skip_memory", action="store_true")
    parser.add_argument(
        "--memory-batches",
        dest="memory_batches",
        type=int,
        default=2,
        help="widest batches run for the peak-memory measurement (the peak is per batch)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    # Internal: one memory measurement in a fresh process.
    parser.add_argument("--child-memory", dest="child_memory", choices=("forward", "scoring"), default=None)
    parser.add_argument("--model", choices=MODELS, default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("samples", "min_len", "batch_size", "repeats", "memory_batches"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_len < args.min_len:
        parser.error(f"--max-len ({args.max_len}) must be >= --min-len ({args.min_len})")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_memory is not None:
        print(json.dumps(measure_memory_child(args)))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = [bench_model(args, name) for name in args.models]
    result = {
        "rows": rows,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "wall_s": time.perf_counter() - started,
        },
    }
    print(markdown_table(rows))
    env = result["environment"]
    print(
        f"\n{env['threads']} torch thread(s), {env['cpu_count']} CPUs, load average "
        f"{load_before[0]:.2f} before / {env['load_average_after'][0]:.2f} after; {env['wall_s']:.0f}s wall"
    )
    if args.out is not None:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
