"""One evaluation process on both cores against two one-thread processes side by side.

Issue #26 asks whether the pipeline should give both cores to one job or run independent
evaluations side by side with one thread each. This runs ``benchmarks/profile_evaluation.py``
(the pipeline's ``AdapterSweep``, the model loaded once, ``--repeats`` evaluations) as one process
with ``threads: 2``, then as two concurrent processes with ``threads: 1``, and compares
steady-state evaluations per minute (the first evaluation of each process, which also loads the
LM judge's backbone, is left out). The thread count goes in as a config fragment appended to
``--configs``, as a user would add one. From the repository root::

    python benchmarks/bench_eval_threads.py outputs/smol/seed0/finetune \\
        --configs configs/smol/eval.yaml configs/smol/judges/lm_judge_eval.yaml \\
        --repeats 4 --out benchmarks/results/eval_threads_smol_fp32.json

Each process writes its evaluations under a new temporary directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from antidote_pl.utils.io import atomic_write_json

PROFILE = Path(__file__).with_name("profile_evaluation.py")


def _start(stage: str, configs: list[str], threads: int, work: Path, name: str, repeats: int):
    """Starts one profiling process with ``threads`` pinned by a config fragment."""
    fragment = work / f"{name}_threads.yaml"  # one per process: never rewritten while read
    fragment.write_text(f"threads: {threads}\n")
    command = [
        sys.executable,
        str(PROFILE),
        stage,
        "--configs",
        *configs,
        str(fragment),
        "--out_dir",
        str(work / name),
        "--repeats",
        str(repeats),
        "--json",
        str(work / f"{name}.json"),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL), work / f"{name}.json"


def _steady(path: Path) -> dict[str, Any]:
    """One process's evaluations (seconds and parts) and the median seconds after the first."""
    load, *runs = json.loads(path.read_text())["runs"]
    seconds = [run["seconds"] for run in runs]
    return {**load, "evaluations": runs, "median_s": statistics.median(seconds[1:])}


def measure(stage: str, configs: list[str], repeats: int) -> dict[str, Any]:
    """Runs both layouts one after the other and returns their timings and throughputs."""
    with tempfile.TemporaryDirectory(prefix="bench_eval_threads_") as tmp:
        work = Path(tmp)
        one, one_json = _start(stage, configs, 2, work, "one_2threads", repeats)
        if one.wait() != 0:
            raise SystemExit(f"profile_evaluation.py failed (exit {one.returncode})")
        pair = [_start(stage, configs, 1, work, f"side{i}_1thread", repeats) for i in (0, 1)]
        for process, _ in pair:
            if process.wait() != 0:
                raise SystemExit(f"profile_evaluation.py failed (exit {process.returncode})")
        single = _steady(one_json)
        sides = [_steady(path) for _, path in pair]
    per_minute_one = 60 / single["median_s"]
    per_minute_pair = sum(60 / side["median_s"] for side in sides)
    return {
        "stage": stage,
        "configs": configs,
        "repeats": repeats,
        "one_process_2_threads": single,
        "two_processes_1_thread": sides,
        "evaluations_per_minute": {"one_process": per_minute_one, "side_by_side": per_minute_pair},
        "side_by_side_over_one_process": per_minute_pair / per_minute_one,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="a stage output directory (the fine-tuned adapter)")
    parser.add_argument("--configs", nargs="+", required=True, help="the evaluation config files, in order")
    parser.add_argument("--repeats", type=int, default=4, help="evaluations per process (>= 3)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats={args.repeats}: expected >= 3 (the first is left out)")
    result = measure(args.stage, args.configs, args.repeats)
    atomic_write_json(args.out, result)
    rates = result["evaluations_per_minute"]
    print(
        f"one process, 2 threads: {rates['one_process']:.2f} evaluations/min; "
        f"two 1-thread processes side by side: {rates['side_by_side']:.2f} "
        f"({result['side_by_side_over_one_process']:.2f}x)"
    )


if __name__ == "__main__":
    main()
