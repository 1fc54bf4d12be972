"""The offline real-data pipeline (configs/offline/) end to end on ../shared/data, shrunk to seconds.

The committed configs run unchanged except for step counts, sample counts and prompt limits, so a
broken data path, field mapping or stage hand-over fails here rather than 15 minutes into a run.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}"),
]
QUIET = "--trainer.enable_progress_bar=false"


@pytest.fixture
def offline_workdir(tmp_path):
    """A working directory laid out like the repository root: configs/ and callbacks/ beside it,
    ../shared/data two levels up, so the configs' relative paths resolve unchanged."""
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    for name in ("configs", "callbacks"):
        (work / name).symlink_to(REPO / name)
    cwd = os.getcwd()
    os.chdir(work)
    yield work
    os.chdir(cwd)


def shrunk_pipeline(work) -> str:
    cfg = yaml.safe_load((REPO / "configs/offline/pipeline.yaml").read_text())
    small = {
        "tokenizer": ["--vocab_size=1024"],
        "pretrain": ["--trainer.max_steps=3", QUIET],
        "aligned": ["--trainer.max_steps=2", QUIET],
        "finetuned_p0": ["--trainer.max_epochs=1", "--data.init_args.num_samples=32", QUIET],
        "finetuned": ["--trainer.max_epochs=1", "--data.init_args.num_samples=32", QUIET],
    }
    assert [s["name"] for s in cfg["stages"]] == list(small)
    for stage in cfg["stages"]:
        stage["overrides"] = [*stage.get("overrides", []), *small[stage["name"]]]
    eval_cfg = yaml.safe_load((REPO / cfg["evaluation"]).read_text())
    eval_cfg["data"]["init_args"].update(harmful_limit=6, task_limit=6)
    eval_cfg["model"]["init_args"].update(harmful_max_new_tokens=4, task_max_new_tokens=2)
    (work / "eval_small.yaml").write_text(yaml.safe_dump(eval_cfg))
    cfg["evaluation"] = "eval_small.yaml"
    cfg["repair"]["alphas"] = [0.1]
    (work / "pipeline_small.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return "pipeline_small.yaml"


def test_offline_pipeline_runs_end_to_end(offline_workdir):
    from antidote_pl.commands.dispatch import run

    report = run(["pipeline", "--config", shrunk_pipeline(offline_workdir)])
    rows = [(r["method"], r["alpha"]) for r in report["rows"]]
    assert rows == [
        ("aligned", None),
        ("finetuned_p0", None),
        ("finetuned", None),
        ("none", 0.0),
        ("wanda", 0.1),
        ("random", 0.1),
    ]
    for r in report["rows"]:
        assert r["n_harmful_score"] == 6 and r["n_finetune_accuracy"] == 6
    out = offline_workdir / "outputs/offline"
    build = json.loads((out / "tokenizer/tokenizer_build.json").read_text())
    assert build["records"] > 5000 and build["template"] == "alpaca"
    # Every model stage carries the locally trained tokenizer, not a hub or tiny-world one.
    tokenizer_json = (out / "tokenizer/tokenizer.json").read_text()
    for stage in ("pretrain", "align", "finetune", "finetune_p0"):
        assert (out / stage / "tokenizer.json").read_text() == tokenizer_json, stage
    # The control was fine-tuned with no harmful sample, the attack with p = 0.1 (resolved configs).
    for stage, ratio in (("finetune_p0", 0.0), ("finetune", 0.1)):
        resolved = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert resolved["data"]["init_args"]["harmful_ratio"] == ratio, stage
    for name in ("report.md", "report.json", "report.png"):
        assert (out / "pipeline" / name).stat().st_size > 0
