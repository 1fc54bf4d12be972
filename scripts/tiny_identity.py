"""Does a code change leave the tiny world's results alone? The main job at two commits, compared.

Each commit is checked out into a fresh git worktree (in a temporary directory this script creates
and removes) and runs README's main job there from an empty ``outputs/``, both side by side with one
torch thread each (``OMP_NUM_THREADS=1``, so neither depends on the machine's core count). Compared:
``report.md`` byte for byte; ``report.json`` with every timing and memory figure left out; every
``.jsonl`` and ``.md`` output byte for byte; every ``.safetensors`` output tensor for tensor (their
metadata holds timings). Issue #23 asks that its restructure change no result::

    python scripts/tiny_identity.py --before 071afe6 --after 107a09c --out outputs/tiny_identity.json

Exit code 0 when everything compared is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from antidote_pl.utils.io import atomic_write_json

COMMAND = [sys.executable, "-m", "antidote_pl", "pipeline", "--config", "configs/tiny/pipeline.yaml"]
#: Keys of report.json that measure time or memory, not results.
VOLATILE = ("seconds", "peak_memory", "written", "wall")


def without_timings(value: object) -> object:
    """``value`` with every key naming a timing or memory figure dropped, recursively."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(w in k for w in VOLATILE)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def same_output(a: Path, b: Path) -> bool:
    """Whether two output files hold the same results (see the module docstring)."""
    if a.suffix == ".safetensors":
        ta, tb = load_file(a), load_file(b)
        return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    if a.name == "report.json":
        return without_timings(json.loads(a.read_text())) == without_timings(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def compare(before: Path, after: Path) -> dict[str, object]:
    """Compares the ``outputs/`` trees of the two runs."""
    kinds = (".safetensors", ".jsonl", ".md", ".json")
    files = {
        name: {p.relative_to(root) for p in root.rglob("*") if p.suffix in kinds}
        for name, root in (("before", before), ("after", after))
    }
    # Other .json files (stage records, manifests) hold timings and absolute paths by design.
    both = files["before"] & files["after"]
    shared = sorted(p for p in both if p.suffix != ".json" or p.name == "report.json")
    differ = [str(p) for p in shared if not same_output(before / p, after / p)]
    return {
        "compared": len(shared),
        "differ": differ,
        "only_before": sorted(str(p) for p in files["before"] - files["after"]),
        "only_after": sorted(str(p) for p in files["after"] - files["before"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="commit before the change")
    parser.add_argument("--after", default="HEAD", help="commit after the change (default HEAD)")
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="tiny_identity_") as tmp:
        trees = {c: Path(tmp) / c for c in (args.before, args.after)}
        try:
            for commit, tree in trees.items():
                subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
            jobs = [subprocess.Popen(COMMAND, cwd=tree, env=env) for tree in trees.values()]
            codes = [job.wait() for job in jobs]
            if any(codes):
                raise SystemExit(f"tiny_identity: the main job failed (exit codes {codes})")
            result = compare(*(tree / "outputs" / "tiny" for tree in trees.values()))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)
    result = {"before": args.before, "after": args.after, **result}
    atomic_write_json(args.out, result)
    same = not (result["differ"] or result["only_before"] or result["only_after"])
    print(f"{result['compared']} outputs compared: {'identical' if same else 'DIFFERENT'}; see {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
