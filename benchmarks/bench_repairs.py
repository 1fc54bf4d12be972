"""Repair cost per method: each repair callback's run against one Wanda scoring pass, same model.

Every method of the repair slot (``callbacks/*.yaml``) is run as the user runs it, one process each:
``python -m antidote_pl fit --config <repair config> --config callbacks/<method>.yaml`` with
``--model.init_args.output_dir`` in a temporary directory. Per method: the process's wall time,
CPU time (user + system, children included) and peak resident memory, and the callback's own time
(``repair_seconds`` in ``repair.json``, ``scoring_seconds`` in ``mask.json``: the repair itself,
without loading the model or writing the stage). Ratios are against ``wanda`` (the baseline, run in
the same invocation). Each method runs ``--repeats`` times; medians are reported.

Run from the repository root after the stages exist (e.g. the tiny main job, or one seed of the
SmolLM2 pipeline)::

    python benchmarks/bench_repairs.py --repair-config configs/tiny/repair.yaml \
        --out benchmarks/results/repairs_tiny.json
    python benchmarks/bench_repairs.py --repair-config configs/smol/repair.yaml \
        --set model.init_args.adapter_path=outputs/smol/seed0/finetune \
        --out benchmarks/results/repairs_smol.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = (
    "wanda",
    "wanda_delta",
    "magnitude",
    "delta_scaling",
    "resta",
    "safelora",
    "safelora_exact",
    "safe_delta",
    "refusal_k1",
    "refusal_k8",
    "refusal_k64",
)


def run_one(repair_config: str, method: str, extra: list[str], threads: int) -> dict:
    """One repair run in a child process: wall, CPU, peak RSS and the callback's own seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "repair"
        cmd = [sys.executable, "-m", "antidote_pl", "fit", "--config", repair_config]
        cmd += ["--config", f"callbacks/{method}.yaml", f"--model.init_args.output_dir={out}", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err = proc.stderr.read() if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{method}: the repair run failed:\n{err[-2000:]}")
        report = out / ("mask.json" if (out / "mask.json").is_file() else "repair.json")
        meta = json.loads(report.read_text())
        own = meta.get("scoring_seconds", meta.get("repair_seconds"))
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "method_s": own,
    }


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repair-config", default="configs/tiny/repair.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--set", nargs="*", default=[], help="extra dotted overrides, key=value")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    extra = [f"--{kv}" for kv in args.set]
    methods = ["wanda", *(m for m in args.methods if m != "wanda")]
    load = os.getloadavg()
    results = {
        m: median_of([run_one(args.repair_config, m, extra, args.threads) for _ in range(args.repeats)])
        for m in methods
    }
    base = results["wanda"]
    print("| method | wall s | CPU s | peak RSS MiB | method s | method / Wanda scoring |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        ratio = r["method_s"] / base["method_s"] if base["method_s"] else float("nan")
        cells = f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['method_s']:.2f}"
        print(f"| {m} | {cells} | {ratio:.2f}x |")
    summary = {
        "repair_config": args.repair_config,
        "overrides": args.set,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    if args.out:
        from antidote_pl.utils.io import atomic_write_json

        atomic_write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
