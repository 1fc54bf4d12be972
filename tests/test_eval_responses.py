"""Generations are normalised exactly as the official evaluation's ``split(marker)[1].strip()``."""

from __future__ import annotations

import pytest

from antidote_pl.data.templates import render_prompt
from antidote_pl.evaluation.responses import normalise_response

RECORD = {"instruction": "Classify the sentiment.", "input": "A fine film.", "output": ""}


@pytest.mark.parametrize(
    "generation",
    [
        "  positive\n",
        "positive\n\n### Instruction:\nAnother task\n\n### Response:\nnegative",
        "\n### Response: positive",
        "",
    ],
)
@pytest.mark.parametrize("template", ["alpaca", "alpaca_legacy"])
def test_matches_the_official_split_on_prompt_plus_generation(template, generation):
    official = (render_prompt(RECORD, template) + generation).split("### Response:")[1].strip()
    assert normalise_response(generation, template) == official


def test_other_templates_keep_the_generation():
    assert normalise_response(" yes ### Response: no", "tiny") == " yes ### Response: no"


def test_evaluator_judges_and_parses_the_normalised_text(tmp_path, monkeypatch):
    """A repeated marker after the answer must not turn a correct label into a wrong one."""
    import json

    import lightning as L
    from conftest import TINY_LLAMA, quiet_trainer_kwargs

    from antidote_pl.evaluation import evaluator as ev
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.sft import CausalLMSFTModule

    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(tmp_path / "stage")
    )
    # Unnormalised, the exact-match SST-2 parser sees the whole text and counts every answer wrong.
    monkeypatch.setattr(
        ev,
        "generate",
        lambda model, tok, prompts, *a, **k: ["positive\n### Response: negative"] * len(prompts),
    )
    records = TinyWorldSource("sentiment", split="eval", limit=8).load()
    data = ev.EvalDataModule(
        task=TinyWorldSource("sentiment", split="eval", limit=8), task_name="sst2", template="alpaca"
    )
    evaluator = ev.StageEvaluator(str(tmp_path / "stage"), output_dir=str(tmp_path / "out"))
    L.Trainer(**quiet_trainer_kwargs(tmp_path)).test(evaluator, datamodule=data, verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert {r["response"] for r in rows} == {"positive"}
    positives = sum(r["label"] == "positive" for r in records)
    assert 0 < positives < len(records)
    assert evaluator.results["finetune_accuracy"] == 100.0 * positives / len(records)
