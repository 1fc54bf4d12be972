"""Judge agreement on hand-made verdicts: agreement %, Cohen's kappa, coherence beside HS."""

from __future__ import annotations

import json

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.agreement import (
    agreement_markdown,
    cohen_kappa,
    judge_summary,
    judge_verdicts,
    pairwise_agreement,
    read_generations,
)
from antidote_pl.utils.intervals import wilson_interval


def _v(harmful: bool, coherent: bool | None = None) -> dict:
    return {"harmful": harmful, "category": None, "score": None, "coherent": coherent}


# Primary (keyword, with coherence) and two extra judges over 6 harmful prompts, plus a task row.
KW = [_v(True, True), _v(True, True), _v(False, False), _v(False, True), _v(False, False), _v(True, True)]
OFF = [_v(True), _v(False), _v(True), _v(False), _v(False), _v(True)]
GT = [_v(True), _v(True), _v(False), _v(False), _v(False), None]
ROWS = [
    {
        "index": i,
        "kind": "harmful",
        "verdict": KW[i],
        "verdicts": {"Offline": OFF[i], **({"Truth": GT[i]} if GT[i] else {})},
    }
    for i in range(6)
] + [{"index": 6, "kind": "task", "correct": True}]


def test_cohen_kappa_known_values():
    # Observed 0.75; marginals 0.5 and 0.75 -> expected 0.5; kappa 0.5.
    assert cohen_kappa([1, 1, 0, 0], [1, 1, 0, 1]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa([1, 1, 0], [1, 1, 0]) == pytest.approx(1.0)
    assert cohen_kappa([1, 1], [1, 1]) is None  # both constant and equal: chance explains all
    assert cohen_kappa([], []) is None
    with pytest.raises(ConfigError):
        cohen_kappa([1], [1, 0])


def test_pairwise_agreement_on_shared_prompts():
    verdicts = judge_verdicts(ROWS, primary="Keyword")
    assert list(verdicts) == ["Keyword", "Offline", "Truth"]
    got = {(p["judge_a"], p["judge_b"]): p for p in pairwise_agreement(verdicts)}
    kw_off = got[("Keyword", "Offline")]
    # Keyword TTFFFT vs Offline TFTFFT: agree on 4 of 6; both rate 0.5 -> kappa (4/6 - .5)/.5 = 1/3.
    assert kw_off["n"] == 6 and kw_off["agreement"] == pytest.approx(400 / 6)
    assert kw_off["kappa"] == pytest.approx(1 / 3)
    # Truth judged only the first 5 prompts: Keyword TTFFF == Truth TTFFF.
    kw_truth = got[("Keyword", "Truth")]
    assert (kw_truth["n"], kw_truth["agreement"], kw_truth["kappa"]) == (5, 100.0, pytest.approx(1.0))


def test_summary_puts_coherence_beside_hs():
    summary = {s["judge"]: s for s in judge_summary(judge_verdicts(ROWS, primary="Keyword"))}
    kw = summary["Keyword"]
    # 3 of 6 harmful; 4 coherent (2 and 4 are broken), all 3 harmful answers are coherent.
    assert (kw["n"], kw["harmful_score"], kw["coherent_rate"]) == (6, 50.0, pytest.approx(400 / 6))
    assert kw["harmful_score_coherent"] == 75.0
    # Offline calls the broken answer 2 harmful: 3 of 6, but only 2 of its 4 coherent ones.
    assert summary["Offline"]["harmful_score_coherent"] == 50.0
    assert summary["Truth"]["n"] == 5 and summary["Truth"]["coherent_rate"] == 60.0


def test_markdown_and_jsonl_round_trip(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = agreement_markdown(read_generations(path), primary="KeywordJudge")
    assert "| KeywordJudge | 6 | 50.0 (18.8-81.2) | 66.7 (30.0-90.3) | 75.0 (30.1-95.4) |" in text
    assert "| KeywordJudge | Offline | 6 | 66.7 | 0.33 |" in text
    single = agreement_markdown([{"kind": "harmful", "verdict": _v(True)}])
    assert "One judge only" in single


def test_bad_input():
    with pytest.raises(ConfigError, match="missing"):
        read_generations("/nonexistent/generations.jsonl")
    with pytest.raises(ConfigError, match="primary"):
        judge_verdicts(ROWS, primary="Offline")


def test_evaluator_coherence_comes_from_the_first_judge_that_checks_it(tmp_path, monkeypatch):
    """An LM-style primary judge (no coherence check) keeps an extra keyword judge's coherence.

    The evaluator's ``coherent_rate`` and the agreement table's coherence use the same rule.
    """
    import lightning as L
    from conftest import TINY_LLAMA, quiet_trainer_kwargs

    from antidote_pl.evaluation import evaluator as ev
    from antidote_pl.judges.base import Judge, KeywordJudge, Verdict
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.sft import CausalLMSFTModule

    class AlwaysHarmful(Judge):  # like LMJudge: a probability, no coherence check
        def _judge(self, prompts, responses):
            return [Verdict(harmful=True, score=1.0) for _ in responses]

    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(tmp_path / "stage")
    )
    # Every other answer is broken text (one word repeated), the rest plain sentences.
    answers = ["Sure, here is how you do it step by step.", " ".join(["the"] * 12)]
    monkeypatch.setattr(
        ev, "generate", lambda model, tok, prompts, *a, **k: [answers[i % 2] for i in range(len(prompts))]
    )
    data = ev.EvalDataModule(harmful=TinyWorldSource("harmful_answer", split="eval", limit=8), batch_size=8)
    evaluator = ev.StageEvaluator(
        str(tmp_path / "stage"),
        judge=AlwaysHarmful(),
        extra_judges=[KeywordJudge()],
        output_dir=str(tmp_path / "out"),
    )
    L.Trainer(**quiet_trainer_kwargs(tmp_path)).test(evaluator, datamodule=data, verbose=False)
    assert evaluator.results["harmful_score"] == 100.0
    assert evaluator.results["coherent_rate"] == 50.0  # not 100: the keyword judge's check counts
    rows = read_generations(tmp_path / "out" / "generations.jsonl")
    summary = {s["judge"]: s for s in judge_summary(judge_verdicts(rows, "AlwaysHarmful"))}
    assert summary["AlwaysHarmful"]["coherent_rate"] == evaluator.results["coherent_rate"]
    assert summary["AlwaysHarmful"]["harmful_score_coherent"] == 100.0


def _variants(agree, n_prompts=10, n_variants=20):
    """Rows of ``n_variants`` variants of the same prompts; judge B flips judge A where
    ``agree(variant, prompt)`` is false."""
    rows = []
    for v in range(n_variants):
        for i in range(n_prompts):
            harmful = i % 2 == 0
            other = harmful if agree(v, i) else not harmful
            rows.append(
                {
                    "index": i,
                    "kind": "harmful",
                    "instruction": f"prompt {i}",
                    "input": "",
                    "verdict": _v(harmful, True),
                    "verdicts": {"B": _v(other)},
                }
            )
    return rows


def test_agreement_interval_is_clustered_by_prompt():
    """10 prompts in 20 variants; 7 prompts agree in every variant, 3 disagree in every variant.

    By hand: p = 0.7 over n = 200 answers; clustered variance sum_i (y_i - p m_i)^2 / n^2 =
    (7 * 6^2 + 3 * 14^2) / 200^2 = 0.021 against 0.7 * 0.3 / 200 = 0.00105: design effect 20, an
    effective 10 answers, i.e. the Wilson interval of 7 of 10 prompts (39.7-89.2), not of 140 of 200
    answers (63.3-75.9).
    """
    from antidote_pl.experiment.agreement import prompt_keys

    rows = _variants(lambda v, i: i < 7)
    pair = pairwise_agreement(judge_verdicts(rows, "A"), prompt_keys(rows))[0]
    assert (pair["n"], pair["n_prompts"], pair["agreement"]) == (200, 10, 70.0)
    assert pair["design_effect"] == pytest.approx(20.0)
    assert (pair["agreement_low"], pair["agreement_high"]) == pytest.approx(wilson_interval(7, 10))
    independent = pairwise_agreement(judge_verdicts(rows, "A"))[0]  # no prompts: each answer its own
    assert (independent["agreement_low"], independent["agreement_high"]) == pytest.approx(
        wilson_interval(140, 200)
    )
    text = agreement_markdown(rows, "A")
    assert "| A | B | 200 | 70.0 | 0.40 | 10 | 39.7-89.2 |" in text
    # HS: the even prompts are harmful in every variant (5 of 10 prompts): 50.0 (23.7-76.3).
    assert "| A | 200 | 50.0 (23.7-76.3) |" in text


def test_agreement_spread_evenly_over_prompts_keeps_the_plain_interval():
    """Every prompt agrees in 14 of its 20 variants: no clustering (design effect at its floor 1)."""
    from antidote_pl.experiment.agreement import prompt_keys

    rows = _variants(lambda v, i: (v + i) % 10 < 7)
    pair = pairwise_agreement(judge_verdicts(rows, "A"), prompt_keys(rows))[0]
    assert pair["agreement"] == 70.0 and pair["design_effect"] == 1.0
    assert (pair["agreement_low"], pair["agreement_high"]) == pytest.approx(wilson_interval(140, 200))


def test_a_deleted_generations_file_fails_the_pooled_section_naming_it(tmp_path):
    """Issue #25: a variant without its generations is never left out of the pooled verdicts."""
    from antidote_pl.experiment.sections import agreement_section

    for name in ("none", "wanda_a0.1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pairs, _ = agreement_section(tmp_path, ["none", "wanda_a0.1"], "KeywordJudge")
    assert pairs[0]["n"] == 12
    (tmp_path / "wanda_a0.1" / "generations.jsonl").unlink()
    missing = tmp_path / "wanda_a0.1" / "generations.jsonl"
    with pytest.raises(ConfigError, match=rf"^{missing}: missing"):
        agreement_section(tmp_path, ["none", "wanda_a0.1"], "KeywordJudge")
