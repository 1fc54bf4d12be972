"""Where one evaluation's time goes: harmful generation, task generation and each judge.

Loads a stage the way the pipeline's sweep does (``AdapterSweep``: the evaluation config, adapter
unmerged, the model loaded once) and evaluates it ``--repeats`` times in one process, timing the
evaluator's generation calls by their token budget (48 for harmful prompts, 4 for SST-2 in the
SmolLM2 world) and every judge. The first evaluation also loads the LM judge's backbone; later
ones show the steady state the pipeline sees. Results go to ``--out_dir/eval<N>`` (created; pass
a directory of your own) and the timings to ``--json``. From the repository root::

    python benchmarks/profile_evaluation.py outputs/smol_bf16/seed0/finetune \\
        --configs configs/smol/eval.yaml configs/smol/judges/lm_judge_eval.yaml \\
        configs/smol/precision/bf16.yaml \\
        --out_dir outputs/profile_evaluation --json benchmarks/results/evaluation_parts_smol_bf16.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch

from antidote_pl.evaluation.evaluator import StageEvaluator
from antidote_pl.experiment.sweep import AdapterSweep
from antidote_pl.judges.base import Judge


def _timed(owner: type, name: str, key, seconds: dict[str, float]) -> None:
    """Wraps ``owner.name`` so each call adds its wall time to ``seconds[key(self, *args)]``."""
    original = getattr(owner, name)

    def wrapper(self, *args):
        start = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            seconds[key(self, *args)] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def profile(stage: str, configs: list[str], out_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """One entry per evaluation: total seconds, seconds per part, HS and FA."""
    seconds: dict[str, float] = collections.defaultdict(float)
    _timed(StageEvaluator, "_answer", lambda _self, _items, tokens: f"generate {tokens} new tokens", seconds)
    _timed(Judge, "judge", lambda self, *_: f"judge {type(self).__name__}", seconds)
    start = time.perf_counter()
    sweep = AdapterSweep(configs, stage)
    load = time.perf_counter() - start
    runs = []
    for k in range(repeats):
        seconds.clear()
        start = time.perf_counter()
        result = sweep.evaluate(out_dir / f"eval{k}")
        runs.append(
            {
                "seconds": time.perf_counter() - start,
                "parts": dict(seconds),
                "harmful_score": result["harmful_score"],
                "finetune_accuracy": result["finetune_accuracy"],
            }
        )
        print(f"evaluation {k}: {runs[-1]['seconds']:.1f} s", {p: round(s, 1) for p, s in seconds.items()})
    return [{"load_seconds": load, "threads": torch.get_num_threads()}, *runs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="a stage output directory (the fine-tuned adapter)")
    parser.add_argument("--configs", nargs="+", required=True, help="the evaluation config files, in order")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = profile(args.stage, args.configs, args.out_dir, args.repeats)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"stage": args.stage, "configs": args.configs, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
