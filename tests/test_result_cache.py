"""Cached pipeline results are checked when reused (issue #25): an edited ``result.json`` fails
naming the file, before any report is written from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.cache import ResultCache, StepTimes

RESULT = {
    "harmful_score": 82.0,
    "n_harmful_score": 300,
    "harmful_score/KeywordJudge": 82.0,
    "n_harmful_score/KeywordJudge": 300,
    "finetune_accuracy": 87.5,
    "n_finetune_accuracy": 200,
    "coherent_rate": 100.0,
    "n_coherent_rate": 300,
    "harmful_score_by_category": {"drugs": 79.6, "fraud": 55.8},
    "eval_fingerprint": "02fa1ede39186176",
    "stage": "outputs/tiny/finetune",
}


def cached(tmp_path: Path) -> tuple[ResultCache, Path]:
    """A cache holding ``RESULT`` for variant ``v`` under key ``k``."""
    cache = ResultCache(tmp_path, StepTimes())
    assert cache.get("v", "k", lambda d: dict(RESULT)) == RESULT
    return cache, tmp_path / "v" / "result.json"


def never(_dir):
    raise AssertionError("recomputed")


def test_an_unchanged_result_is_reused(tmp_path):
    cache, _ = cached(tmp_path)
    assert cache.get("v", "k", never) == RESULT
    curves = {"none": [{"step": 0, **RESULT}], "wanda a0.1": [{"step": 0, **RESULT}]}
    assert cache.get("reattack", "k", lambda d: curves) == curves  # nested results are checked too
    assert cache.get("reattack", "k", never) == curves


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"harmful_score": 250.0}, r"result.harmful_score=250.0 is not a rate in \[0, 100\]"),
        ({"finetune_accuracy": "87.5"}, r"result.finetune_accuracy='87.5' is not a rate"),
        ({"n_harmful_score": -1}, r"result.n_harmful_score=-1 is not a count"),
        ({"n_coherent_rate": None}, r"result.n_coherent_rate=None is not a count"),
        ({"harmful_score_by_category": {"drugs": 120.0}}, r"result.harmful_score_by_category=.*not a rate"),
    ],
)
def test_an_out_of_range_result_is_refused_naming_the_file(tmp_path, edit, problem):
    cache, path = cached(tmp_path)
    saved = json.loads(path.read_text())
    saved["result"].update(edit)
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^{path}: {problem}"):
        cache.get("v", "k", never)


def test_a_missing_count_is_refused(tmp_path):
    cache, path = cached(tmp_path)
    saved = json.loads(path.read_text())
    del saved["result"]["n_finetune_accuracy"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^{path}: result.finetune_accuracy has no count"):
        cache.get("v", "k", never)


def test_an_in_range_edit_is_refused_by_the_recorded_hash(tmp_path):
    cache, path = cached(tmp_path)
    saved = json.loads(path.read_text())
    saved["result"]["harmful_score"] = 12.0
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^{path}: its result differs from the one written"):
        cache.get("v", "k", never)


def test_an_edited_re_attack_point_is_refused(tmp_path):
    cache = ResultCache(tmp_path, StepTimes())
    cache.get("reattack", "k", lambda d: {"none": [{"step": 0, **RESULT}]})
    path = tmp_path / "reattack" / "result.json"
    saved = json.loads(path.read_text())
    saved["result"]["none"][0]["harmful_score"] = -3
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"result.none\[0\].harmful_score=-3 is not a rate"):
        cache.get("reattack", "k", never)
