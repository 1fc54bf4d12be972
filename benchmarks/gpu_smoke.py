"""GPU smoke test and scoring benchmark for a machine with one CUDA device (H100/H200, no internet).

1. **Tiny-world pipeline on CUDA in bf16.** ``configs/tiny/pipeline.yaml`` (pretrain -> align ->
   harmful fine-tune -> four repair methods over the alpha sweep -> evaluation -> report), with every
   stage, scoring and evaluation config copied into a temporary directory with
   ``trainer.accelerator: gpu`` and ``trainer.precision: bf16-mixed``; the stage outputs go there
   too (the configs' relative ``outputs/...`` paths resolve against it). It checks that the attack
   reproduces (aligned HS low, fine-tuned HS high) and prints the report.
2. **Wanda scoring on a ~1B-parameter (0.95B) random-init Llama** (hidden 2048, 16 layers, 16 heads,
   FFN 5632, vocab 32000) with a LoRA (r=8) on q/k/v whose ``lora_B`` is non-zero, in bf16:
   256 samples x 512 tokens in batches of 16. The scoring path and the plain-forward baseline are
   those of ``benchmarks/bench_scoring.py`` (imported, not copied); here they run on CUDA with
   ``torch.cuda.synchronize`` around each timing and ``torch.cuda.max_memory_allocated`` for the
   peak, compared with the model's own size.

Run from the repository root (``benchmarks/gpu_smoke.sh`` wraps it)::

    python benchmarks/gpu_smoke.py                 # both parts
    python benchmarks/gpu_smoke.py --skip-pipeline # the benchmark only

A markdown table goes to stdout; with ``$OUT`` set (or ``--out``) the results are written as
``gpu_smoke.json`` and the pipeline report as ``tiny_pipeline_report.{md,json}``.

Exit codes: 0 on success, and also when there is no CUDA device (it prints "no CUDA device" and
does nothing, so a CPU-only CI job can call it); 2 with ``--require-cuda`` and no device; 1 when a
part fails. ``--device cpu`` runs part 2 on the CPU (use small ``--hidden-size`` etc.) to check the
script itself on a machine without a GPU; its memory columns are then ``n/a``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import bench_scoring  # noqa: E402  (needs the paths above)

from antidote_pl.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

TINY_PIPELINE = REPO / "configs" / "tiny" / "pipeline.yaml"
GPU_TRAINER = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}
EXIT_NO_CUDA_REQUIRED, EXIT_FAILED = 2, 1
# The attack must reproduce on the GPU as on the CPU (docs/guide/worlds.md: aligned HS 0, fine-tuned HS 100).
ALIGNED_HS_MAX, FINETUNED_HS_MIN = 10.0, 80.0


# --------------------------------------------------------------------------- part 1: tiny pipeline
def _gpu_copy(config: Path, dest: Path) -> str:
    """Writes ``config`` with the GPU bf16 trainer settings to ``dest``; returns its path."""
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"] = {**(cfg.get("trainer") or {}), **GPU_TRAINER}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(dest)


def write_gpu_pipeline(workdir: Path, pipeline: Path = TINY_PIPELINE) -> Path:
    """A copy of ``pipeline`` whose stage, repair and evaluation configs run on CUDA in bf16.

    Config paths in the pipeline file are relative to the repository root; the copies live in
    ``workdir/configs`` and the callback fragments are referenced in place.
    """
    cfg = yaml.safe_load(pipeline.read_text())
    configs = workdir / "configs"
    for stage in cfg["stages"]:
        stage["config"] = _gpu_copy(REPO / stage["config"], configs / Path(stage["config"]).name)
    cfg["repair"]["config"] = _gpu_copy(REPO / cfg["repair"]["config"], configs / "repair.yaml")
    cfg["repair"]["methods"] = {m: str(REPO / f) for m, f in cfg["repair"]["methods"].items()}
    cfg["evaluation"] = _gpu_copy(REPO / cfg["evaluation"], configs / "eval.yaml")
    out = workdir / "pipeline.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _reference_hs(report: dict, method: str) -> float | None:
    return next((r.get("harmful_score") for r in report["rows"] if r["method"] == method), None)


def run_tiny_pipeline(workdir: Path, timeout_s: int) -> dict:
    """Runs the GPU copy of the tiny pipeline in a subprocess (its CUDA memory is freed on exit)."""
    config = write_gpu_pipeline(workdir)
    paths = [str(REPO), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "antidote_pl", "pipeline", "--config", str(config)],
        cwd=workdir,
        env=env,
        check=True,
        timeout=timeout_s,
    )
    wall = time.perf_counter() - started
    out_dir = workdir / yaml.safe_load(config.read_text())["output_dir"]
    report = json.loads((out_dir / "report.json").read_text())
    aligned, finetuned = _reference_hs(report, "aligned"), _reference_hs(report, "finetuned")
    return {
        "wall_s": wall,
        "aligned_hs": aligned,
        "finetuned_hs": finetuned,
        "attack_reproduced": aligned is not None
        and finetuned is not None
        and aligned <= ALIGNED_HS_MAX
        and finetuned >= FINETUNED_HS_MIN,
        "report": report,
        "report_md": (out_dir / "report.md").read_text(),
    }


# --------------------------------------------------------------------------- part 2: scoring at 1B
def llama_1b_config(args: argparse.Namespace):
    """The benchmark model's config (0.95B parameters with the defaults, untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
        pad_token_id=bench_scoring.PAD_ID,
    )


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """``bench_scoring.build_model`` (LoRA r=8 on q/k/v, non-zero B) at this script's size, in bf16.

    The weights are created directly on ``device`` (a 1B fp32 init on the CPU takes a while).
    """
    config = llama_1b_config(args)
    with device, mock.patch.object(bench_scoring, "llama_config", lambda name: config):
        model = bench_scoring.build_model("1b", args.seed)
    return model.to(dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs (model included), or ``None`` off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


def bench_scoring_1b(args: argparse.Namespace, device: torch.device) -> dict:
    """Times Wanda scoring against a plain forward over the same batches; measures peak memory."""
    model = build_model(args, device)
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in bench_scoring.make_batches(
            model.config.vocab_size, args.samples, args.seq_len, args.seq_len, args.batch_size, args.seed
        )
    ]
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    def forward():
        bench_scoring.forward_pass(model, batches)

    stats_box: dict = {}

    def scoring():
        stats_box["stats"], _ = bench_scoring.scoring_pass(model, batches, args.alpha)

    # Warm-up on one batch: CUDA context, kernel selection, allocator pools.
    bench_scoring.forward_pass(model, batches[:1])
    bench_scoring.scoring_pass(model, batches[:1], args.alpha)
    times: dict[str, list[float]] = {"forward": [], "scoring": []}
    for repeat in range(args.repeats):
        order = ("forward", "scoring") if repeat % 2 == 0 else ("scoring", "forward")
        for path in order:
            times[path].append(_timed(forward if path == "forward" else scoring, device))
    forward_peak = _peak_bytes(forward, device)
    scoring_peak = _peak_bytes(scoring, device)
    forward_s, scoring_s = statistics.median(times["forward"]), statistics.median(times["scoring"])
    row = {
        "device": _device_name(device),
        "model": f"llama h{args.hidden_size} L{args.layers} ffn{args.intermediate_size} v{args.vocab_size}",
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": "bf16",
        "targets": len(stats_box["stats"].names),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens": args.samples * args.seq_len,
        "forward_s": forward_s,
        "scoring_s": scoring_s,
        "ratio": scoring_s / forward_s,
        "times": times,
        "model_bytes": bench_scoring.model_bytes(model),
        "resident_bytes": resident,
        "accumulator_bytes": bench_scoring.accumulator_bytes(stats_box["stats"]),
        "forward_peak_bytes": forward_peak,
        "scoring_peak_bytes": scoring_peak,
    }
    return row


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def markdown_table(row: dict) -> str:
    """One-row markdown table of the scoring benchmark."""
    model = row["model_bytes"]
    peaks = [row["forward_peak_bytes"], row["scoring_peak_bytes"]]
    rel = ["n/a" if p is None else f"{p / model:.2f}x" for p in peaks]
    extra = "n/a" if None in peaks else f"{(peaks[1] - peaks[0]) / 2**20:+.1f} MiB"
    header = (
        "| card | params | dtype | samples x tokens | batch | forward s | scoring s | ratio "
        "| model GiB | forward peak GiB | scoring peak GiB | scoring peak / model | scoring - forward peak "
        "| accumulators |"
    )
    return "\n".join(
        [
            header,
            "|" + "---|" * (header.count("|") - 1),
            f"| {row['device']} | {_count(row['params'])} | {row['dtype']} | {row['samples']} x "
            f"{row['seq_len']} | {row['batch_size']} | {row['forward_s']:.3f} | {row['scoring_s']:.3f} "
            f"| {row['ratio']:.3f} | {_gib(model)} | {_gib(peaks[0])} | {_gib(peaks[1])} | {rel[1]} "
            f"| {extra} | {row['accumulator_bytes'] / 2**10:.1f} KiB |",
        ]
    )


# --------------------------------------------------------------------------- entry point
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-pipeline", action="store_true", help="skip part 1 (tiny-world pipeline)")
    parser.add_argument("--skip-bench", action="store_true", help="skip part 2 (scoring benchmark)")
    parser.add_argument(
        "--require-cuda", action="store_true", help=f"exit {EXIT_NO_CUDA_REQUIRED} without CUDA"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: check the script only"
    )
    parser.add_argument("--pipeline-timeout", type=int, default=540, help="seconds for part 1")
    parser.add_argument("--workdir", type=Path, default=None, help="part 1 outputs (default: a temp dir)")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT if set)")
    args = parser.parse_args(argv)
    for flag in ("hidden_size", "layers", "heads", "intermediate_size", "vocab_size", "samples", "seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")
    if args.hidden_size % args.heads:
        parser.error(f"--hidden-size ({args.hidden_size}) must be divisible by --heads ({args.heads})")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])
    return args


def _run_part(name: str, fn: Callable[[], dict], results: dict) -> bool:
    print(f"\n== {name}", flush=True)
    try:
        results[name] = fn()
        return True
    except Exception as err:  # reported and counted; the other part still runs
        results[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"gpu_smoke: {name} FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_smoke: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "nothing to run."
        )
        return EXIT_NO_CUDA_REQUIRED if args.require_cuda else 0
    device = torch.device(args.device)
    results: dict = {
        "environment": {
            "device": _device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        }
    }
    ok = True
    if not args.skip_pipeline:
        if device.type != "cuda":
            print("gpu_smoke: the tiny pipeline part needs CUDA; skipped with --device cpu")
        else:
            # Outputs are scratch unless --workdir asks to keep them.
            scratch = tempfile.TemporaryDirectory(prefix="gpu_smoke_") if args.workdir is None else None
            workdir = args.workdir or Path(scratch.name)
            try:
                ok &= _run_part(
                    "tiny_pipeline", lambda: run_tiny_pipeline(workdir, args.pipeline_timeout), results
                )
            finally:
                if scratch is not None:
                    scratch.cleanup()
    if not args.skip_bench:
        ok &= _run_part("scoring_1b", lambda: bench_scoring_1b(args, device), results)

    pipeline = results.get("tiny_pipeline", {})
    if "report_md" in pipeline:
        card = results["environment"]["device"]
        print(f"\n## Tiny-world pipeline, bf16 on {card} ({pipeline['wall_s']:.0f} s)\n")
        print(pipeline["report_md"])
        verdict = "reproduced" if pipeline["attack_reproduced"] else "NOT reproduced"
        hs = f"aligned HS {pipeline['aligned_hs']}, fine-tuned HS {pipeline['finetuned_hs']}"
        print(f"attack {verdict}: {hs}")
        ok &= bool(pipeline["attack_reproduced"])
    if "forward_s" in results.get("scoring_1b", {}):
        print("\n## Wanda scoring vs plain forward\n")
        print(markdown_table(results["scoring_1b"]))
    if args.out is not None:
        if "report_md" in pipeline:
            atomic_write_text(args.out / "tiny_pipeline_report.md", pipeline.pop("report_md"))
            atomic_write_json(args.out / "tiny_pipeline_report.json", pipeline.pop("report"))
        atomic_write_json(args.out / "gpu_smoke.json", results)
        print(f"\nwrote {args.out / 'gpu_smoke.json'}")
    return 0 if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
