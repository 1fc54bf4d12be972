"""The whole test suite at two commits, side by side: did the suite get slower? (issue #26)

Each commit is checked out into a fresh git worktree (a directory beside the checkout, so that
``../shared`` resolves as there, created and removed by this script), so both runs see what a fresh
clone sees: no ``outputs/``, an empty GGUF cache (``ANTIDOTE_PL_GGUF_CACHE`` in a temporary
directory). There README's test command at that commit runs (the ``python -m pytest`` line of its
README, e.g. ``python -m pytest -q`` before the suite ran on two xdist workers and
``python -m pytest -q -n 2`` since; plus ``--junitxml`` for the per-test times), one commit after
the other, in this interpreter's environment with ``PYTHONPATH`` set to the worktree. Reported per
commit: the wall time (what CI waits for), the number of tests by outcome and the summed test times;
and over the tests present at both commits (same node id) their summed times and the ratio, since a
suite that gained tests takes longer without any test getting slower. With workers, a test's time
also holds the other worker's load on the shared cores, so summed times exceed the wall time.

Run from the repository root, with nothing else using the cores::

    python benchmarks/bench_suite.py --baseline 93baa58 --candidate HEAD --repeats 3 \\
        --out benchmarks/results/suite.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from antidote_pl.utils.io import atomic_write_json

REPO = Path(__file__).resolve().parent.parent


def test_times(junit_xml: Path) -> dict[str, dict[str, object]]:
    """``{node id: {"seconds", "outcome"}}`` from pytest's JUnit XML."""
    times = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        node = f"{case.get('classname', '')}::{case.get('name', '')}"
        times[node] = {"seconds": float(case.get("time", 0.0)), "outcome": outcome}
    return times


def readme_test_command(tree: Path) -> list[str]:
    """The README's test command at a checkout (its first line starting ``python -m pytest``), with
    this interpreter for ``python``."""
    for line in (tree / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("python -m pytest"):
            return [sys.executable, *shlex.split(line)[1:]]
    raise SystemExit(f"{tree / 'README.md'} has no line starting 'python -m pytest'")


@contextlib.contextmanager
def worktree(commit: str, prefix: str) -> Iterator[Path]:
    """A fresh git worktree of ``commit`` beside this checkout (so that ``../shared`` resolves as
    for the checkout), removed afterwards; also used by ``bench_memory.py``."""
    tree = Path(tempfile.mkdtemp(prefix=f"{prefix}_{commit}_", dir=REPO.parent))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True)
        if tree.exists():
            tree.rmdir()


def full_sha(commit: str) -> str:
    """The commit's full hash."""
    done = subprocess.run(["git", "rev-parse", commit], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def run_suite(commit: str, scratch: Path) -> dict[str, object]:
    """Runs README's test command at ``commit`` in a fresh worktree; the JUnit XML and GGUF cache go
    under ``scratch``."""
    xml = scratch / f"junit_{commit}.xml"
    with worktree(commit, "bench_suite") as tree:
        # PYTHONPATH: subprocesses started by tests import this commit's package, not the installed one.
        env = dict(os.environ, ANTIDOTE_PL_GGUF_CACHE=str(scratch / f"gguf_{commit}"), PYTHONPATH=str(tree))
        command = readme_test_command(tree)
        start = time.perf_counter()
        done = subprocess.run(
            [*command, "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=tree, env=env, check=False
        )
        wall = time.perf_counter() - start
    tests = test_times(xml)
    outcomes = [t["outcome"] for t in tests.values()]
    return {
        "commit": full_sha(commit),
        "command": " ".join(["python", *command[1:]]),
        "exit_code": done.returncode,
        "wall_seconds": wall,
        "tests": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "test_seconds": sum(t["seconds"] for t in tests.values()),
        "per_test": tests,
    }


def common_times(baseline: dict, candidate: dict) -> dict[str, float]:
    """Summed times of the tests present at both commits, and their ratio (candidate / baseline)."""
    shared = sorted(set(baseline["per_test"]) & set(candidate["per_test"]))
    base = sum(baseline["per_test"][n]["seconds"] for n in shared)
    cand = sum(candidate["per_test"][n]["seconds"] for n in shared)
    return {"tests": len(shared), "baseline_seconds": base, "candidate_seconds": cand, "ratio": cand / base}


def repeated(runs: list[dict]) -> dict[str, object]:
    """One commit's runs: the first run's record (per-test times included), every run's wall time and
    their median."""
    walls = [r["wall_seconds"] for r in runs]
    worst = max(r["exit_code"] for r in runs)
    median = statistics.median(walls)
    return {**runs[0], "exit_code": worst, "wall_seconds_runs": walls, "wall_seconds": median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against")
    parser.add_argument("--candidate", default="HEAD", help="commit measured (default HEAD)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per commit, alternating (default 1)")
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be an int >= 1, got {args.repeats}")
    names = ("baseline", "candidate")
    done: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
        # Alternating, so a drift of the machine's speed over the hour reaches both commits alike.
        for i in range(args.repeats):
            scratch = Path(tmp) / f"run{i}"
            scratch.mkdir()
            for name in names:
                done[name].append(run_suite(getattr(args, name), scratch))
    runs = {name: repeated(done[name]) for name in names}
    common = common_times(runs["baseline"], runs["candidate"])
    atomic_write_json(args.out, {"machine": f"{os.cpu_count()} CPU cores", **runs, "common": common})
    for name, r in runs.items():
        walls = ", ".join(f"{w:.0f}" for w in r["wall_seconds_runs"])
        median = r["wall_seconds"]
        print(f"{name} {r['commit'][:7]}: wall {walls} s (median {median:.0f}), tests {r['tests']}")
    print(
        f"{common['tests']} tests at both commits (first runs): {common['baseline_seconds']:.0f} s -> "
        f"{common['candidate_seconds']:.0f} s ({common['ratio']:.2f}x)"
    )


if __name__ == "__main__":
    main()
