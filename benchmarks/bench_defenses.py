"""Training cost of each baseline defense relative to plain SFT, on the tiny world model.

Alignment-stage defenses (Vaccine, RepNoise, Booster) are compared with plain full-weight SFT on the
tiny world alignment data (harmful requests -> refusals plus benign answers), as in
``configs/tiny/align.yaml``; fine-tuning-stage defenses (Lisa, LDIFS) with plain LoRA SFT on the
poisoned sentiment mix, as in ``configs/tiny/finetune.yaml``. The model is the tiny world's random-init
Llama (``--size default``: hidden 128, 4 layers; ``fast``: 64 x 2), batch 32, max length 96.

What is measured, per method, each in a fresh worker process (so one method's memory cannot hide in
another's numbers):

* **time per step**: median process CPU time (``time.process_time``) and median wall time from
  ``on_train_batch_start`` to ``on_train_batch_end`` over ``--steps`` optimizer steps after
  ``--warmup`` steps; it covers the defense's forward and backward passes, the extra auxiliary batch
  it draws, and the optimizer step, but not the user's data loading. With one intra-op thread, CPU
  time is the compute actually spent and hardly depends on other jobs on the machine; wall time does
  (on a shared machine it varied by up to 1.7x between runs), so the ratios use CPU time.
* **tokens per sample**: mean length of the user's samples and of the defense's auxiliary samples
  (harmful set or guide data); a defense whose auxiliary samples are longer pays for that too.
* **peak RSS**: the worker's lifetime peak resident set size (``resource.getrusage``, ``ru_maxrss``),
  which includes the Python interpreter, torch and the tokenised data (a few hundred MiB of fixed
  cost); and **training peak - pre-fit RSS**, the peak minus the resident size just before
  ``Trainer.fit``, which is closer to what the defense itself adds (activations kept for the extra
  passes, reference copies, anchors, the auxiliary data). Both are CPU host memory; on a GPU the
  ratios of activation memory would be the relevant figure and are not measured here.

Intra-op threads default to 1 (``--threads``): on a busy machine torch's default threads make every
tiny op wait on the others.

Run from the repository root::

    python benchmarks/bench_defenses.py --size default --steps 20 --warmup 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from step_timer import StepTimer

ALIGN_METHODS = ("sft_full", "vaccine", "repnoise", "booster")
FINETUNE_METHODS = ("sft_lora", "lisa", "ldifs")
METHODS = ALIGN_METHODS + FINETUNE_METHODS
BASELINE = {m: "sft_full" for m in ALIGN_METHODS} | {m: "sft_lora" for m in FINETUNE_METHODS}


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``)."""
    import os

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mean_tokens(dataset) -> float:
    """Mean sample length (tokens before padding) of a tokenised dataset."""
    return statistics.mean(len(s["input_ids"]) for s in dataset.samples)


def _defense(method: str):
    from antidote_pl.defenses import LDIFS, Booster, Lisa, RepNoise, Vaccine
    from antidote_pl.tinyworld.world import TinyWorldSource

    harmful = TinyWorldSource("harmful_answer", split="realign")
    guide = [TinyWorldSource("harmful_refusal", limit=1000), TinyWorldSource("benign", limit=1000)]
    return {
        "sft_full": None,
        "sft_lora": None,
        "vaccine": lambda: Vaccine(rho=2.0),
        "repnoise": lambda: RepNoise(harmful, alpha=0.1, beta=0.001),
        "booster": lambda: Booster(harmful, lam=5.0, alpha=0.1),
        # Short phases and an immediate proximal term, so the measured steps cover both states.
        "lisa": lambda: Lisa(guide, align_steps=2, finetune_steps=2, proximal_start=0.0),
        "ldifs": lambda: LDIFS(rho=1e-4, representation="mlp", reduction="sum"),
    }[method]


def _data(method: str):
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.datamodules import AlignmentDataModule, HarmfulFinetuneDataModule

    common = {"tokenizer": "tiny-world", "template": "tiny", "max_length": 96, "batch_size": 32}
    if method in ALIGN_METHODS:
        return AlignmentDataModule(
            harmful=TinyWorldSource("harmful_refusal", limit=1000),
            benign=TinyWorldSource("benign", limit=1000),
            **common,
        )
    return HarmfulFinetuneDataModule(
        harmful=TinyWorldSource("harmful_answer"),
        task=TinyWorldSource("sentiment"),
        num_samples=1000,
        harmful_ratio=0.1,
        **common,
    )


def worker(method: str, size: str, steps: int, warmup: int, threads: int) -> dict:
    """Trains ``warmup + steps`` steps of one method in this process and returns its measurements."""
    import lightning as L
    import torch

    from antidote_pl.training.sft import CausalLMSFTModule

    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    make_defense = _defense(method)
    module = CausalLMSFTModule(
        model_config="tiny-world" if size == "default" else "tiny-world-fast",
        tokenizer="tiny-world",
        finetuning="full" if method in ALIGN_METHODS else "lora",
        lora_r=8,
        lora_alpha=16,
        learning_rate=1e-3,
        weight_decay=0.0,
        defense=make_defense() if make_defense else None,
    )
    data = _data(method)
    data.setup("fit")
    timer = StepTimer()
    times = timer.times

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    before = _rss_mib()
    trainer.fit(module, datamodule=data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    measured = times[warmup:]
    stream = getattr(module.defense, "stream", None)
    aux = _mean_tokens(stream.dataset) if stream is not None else 0.0
    return {
        "user_tokens": _mean_tokens(data.train_dataloader().dataset),
        "aux_tokens": aux,
        "method": method,
        "step_cpu_ms": 1000 * statistics.median(t[0] for t in measured),
        "step_wall_ms": 1000 * statistics.median(t[1] for t in measured),
        "peak_rss_mib": peak,
        "train_delta_mib": peak - before,
        "steps": len(measured),
    }


def _table(results: dict[str, dict]) -> str:
    lines = [
        "| method | stage | user / aux tokens per sample | CPU ms/step | x SFT | wall ms/step "
        "| peak RSS (MiB) | x SFT | peak - pre-fit RSS (MiB) | x SFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        r, b = results[method], results[BASELINE[method]]
        stage = "align (full)" if method in ALIGN_METHODS else "finetune (LoRA)"
        aux = f"{r['aux_tokens']:.0f}" if r["aux_tokens"] else "-"
        lines.append(
            f"| {method} | {stage} | {r['user_tokens']:.0f} / {aux} | "
            f"{r['step_cpu_ms']:.1f} | {r['step_cpu_ms'] / b['step_cpu_ms']:.2f} | {r['step_wall_ms']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / b['peak_rss_mib']:.2f} | "
            f"{r['train_delta_mib']:.0f} | {r['train_delta_mib'] / max(b['train_delta_mib'], 1e-9):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("default", "fast"), default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.steps, args.warmup, args.threads)))
        return
    methods = sorted(set(args.methods) | {BASELINE[m] for m in args.methods}, key=METHODS.index)
    results = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, "--size", args.size, "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(f"{method}: {results[method]['step_cpu_ms']:.1f} CPU ms/step", file=sys.stderr, flush=True)
    print(
        f"tiny world model '{args.size}', batch 32, max_length 96, "
        f"{args.steps} steps after {args.warmup} warmup, {args.threads} thread(s)\n"
    )
    print(_table({m: results[m] for m in methods}) if set(methods) == set(METHODS) else json.dumps(results))


if __name__ == "__main__":
    main()
