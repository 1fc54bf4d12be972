"""Resident memory of a shrunk one-seed SmolLM2 pipeline at two commits, side by side (issue #26).

The pipeline runs many steps in one process; a step's peak (refusal re-alignment with k = 64 trains
64 sequences in one batch) used to stay resident through every later step, and the full 3-seed
fp32 run was killed by the out-of-memory killer on a 24 GiB machine. This runs
``configs/smol/pipeline.yaml`` for seed 0 with every repair method but shrunk (2 training steps of
2 sequences at 64 tokens, 16 fine-tuning samples with a 64-record realignment set, 2 harmful prompts
per source and 3 task questions per evaluation, the keyword and n-gram judges only, so no trained LM
judge is needed) in a fresh worktree of each commit (``bench_suite.worktree``; empty GGUF cache,
empty ``outputs/``), one after the other, and samples the process's resident size (``VmRSS``) and
peak (``VmHWM``) from ``/proc`` twice a second. Reported per commit: wall time, peak, the median and
90th percentile of the samples, and the samples themselves; a plot of both curves.

Run from the repository root, with nothing else using the cores (about 6 minutes a commit)::

    python benchmarks/bench_memory.py --baseline 068e8b3 --candidate HEAD --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_suite import full_sha, worktree

from antidote_pl.utils.io import atomic_write_json

SHRUNK_STAGE = ["--trainer.max_steps=2", "--data.init_args.batch_size=2", "--data.init_args.max_length=64"]
SHRUNK_DATA = ["--data.init_args.num_samples=16", "--data.init_args.realignment_size=64"]


def write_shrunk_config(tree: Path) -> str:
    """Writes the shrunk one-seed pipeline (and its evaluation config) into ``tree``; returns its name."""
    cfg = yaml.safe_load((tree / "configs/smol/pipeline.yaml").read_text())
    cfg["seeds"] = [0]
    for stage in cfg["stages"]:
        data = SHRUNK_DATA if stage["name"] != "aligned" else []
        stage["overrides"] = [*stage.get("overrides", []), *SHRUNK_STAGE, *data]
    cfg["repair"]["overrides"] += ["--data.init_args.batch_size=4"]
    evaluation = yaml.safe_load((tree / "configs/smol/eval.yaml").read_text())
    evaluation["data"]["init_args"].update(task_limit=3, fa_validation_size=2, batch_size=8)
    evaluation["data"]["init_args"]["harmful"]["init_args"]["limit_each"] = 2
    evaluation["model"]["init_args"].update(harmful_max_new_tokens=8, task_max_new_tokens=2)
    (tree / "bench_memory_eval.yaml").write_text(yaml.safe_dump(evaluation))
    cfg["evaluation"] = "bench_memory_eval.yaml"
    (tree / "bench_memory.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return "bench_memory.yaml"


def status_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of a process in MB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("VmRSS", "VmHWM")))
    return {f[0].rstrip(":"): int(f[1]) / 1024 for f in fields}


def run_sampled(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, object]:
    """Runs ``command``, sampling its memory every 0.5 s; its output goes to ``cwd/bench_memory.log``."""
    samples, peak = [], 0.0
    start = time.perf_counter()
    with open(cwd / "bench_memory.log", "w") as log:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while child.poll() is None:
            now = status_mb(child.pid)
            if "VmRSS" in now:
                samples.append([round(time.perf_counter() - start, 1), round(now["VmRSS"])])
                peak = max(peak, now["VmHWM"])
            time.sleep(0.5)
    rss = [s[1] for s in samples]
    return {
        "exit_code": child.returncode,
        "wall_seconds": time.perf_counter() - start,
        "peak_mb": round(peak),
        "median_mb": round(statistics.median(rss)),
        "p90_mb": round(statistics.quantiles(rss, n=10)[-1]),
        "samples": samples,
    }


def measure(commit: str, scratch: Path) -> dict[str, object]:
    """The shrunk pipeline at ``commit`` in a fresh worktree, with its memory samples."""
    with worktree(commit, "bench_memory") as tree:
        env = dict(os.environ, ANTIDOTE_PL_GGUF_CACHE=str(scratch / f"gguf_{commit}"), PYTHONPATH=str(tree))
        config = write_shrunk_config(tree)
        command = [sys.executable, "-m", "antidote_pl", "pipeline", "--config", config]
        result = run_sampled(command, tree, env)
        if result["exit_code"] != 0:
            sys.stderr.write((tree / "bench_memory.log").read_text()[-3000:])
            raise SystemExit(f"the pipeline at {commit} failed (exit {result['exit_code']})")
    return {"commit": full_sha(commit), **result}


def plot(runs: dict[str, dict], path: Path) -> None:
    """Both commits' resident size over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in runs.items():
        t, mb = zip(*r["samples"])
        ax.plot(t, [m / 1024 for m in mb], label=f"{name} {r['commit'][:7]}")
    ax.set(xlabel="seconds", ylabel="resident GB", title="Shrunk one-seed SmolLM2 pipeline, every method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against")
    parser.add_argument("--candidate", default="HEAD", help="commit measured (default HEAD)")
    parser.add_argument("--out", required=True, help="JSON written here (the plot beside it, .png)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        runs = {name: measure(getattr(args, name), Path(tmp)) for name in ("baseline", "candidate")}
    atomic_write_json(args.out, {"machine": f"{os.cpu_count()} CPU cores", **runs})
    plot(runs, Path(args.out).with_suffix(".png"))
    for name, r in runs.items():
        print(
            f"{name} {r['commit'][:7]}: wall {r['wall_seconds']:.0f} s, peak {r['peak_mb']} MB, "
            f"median {r['median_mb']} MB, p90 {r['p90_mb']} MB"
        )


if __name__ == "__main__":
    main()
