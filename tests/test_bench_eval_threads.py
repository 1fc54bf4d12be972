"""The threads benchmark's bookkeeping (benchmarks/bench_eval_threads.py), without running a model."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_eval_threads import _steady, main


def test_steady_leaves_out_the_first_evaluation(tmp_path):
    # The first evaluation also loads the LM judge's backbone: it must not enter the median.
    runs = [{"load_seconds": 3.0, "threads": 2}] + [
        {"seconds": s, "parts": {}} for s in (100.0, 10.0, 30.0, 20.0)
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"runs": runs}))
    steady = _steady(path)
    assert steady["median_s"] == 20.0
    assert steady["threads"] == 2 and steady["load_seconds"] == 3.0
    assert [e["seconds"] for e in steady["evaluations"]] == [100.0, 10.0, 30.0, 20.0]


def test_too_few_repeats_is_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["stage", "--configs", "eval.yaml", "--repeats", "2", "--out", str(tmp_path / "x.json")])
    assert "--repeats=2: expected >= 3" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
