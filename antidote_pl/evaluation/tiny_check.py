"""Greedy-generation check of a tiny world stage: refusal, harmful and sentiment rates.

The world's own ground truth judges the answers (the generator knows what refusals and harmful
answers look like), so no judge model is needed::

    python -m antidote_pl check outputs/tiny/align outputs/tiny/finetune

Prints one row per stage and writes nothing; the full evaluation (judges, metrics, reports) is
``python -m antidote_pl test`` / ``pipeline``.
"""

from __future__ import annotations

from typing import Any

from antidote_pl.data.templates import render_prompt
from antidote_pl.models.generation import generate
from antidote_pl.models.loading import load_stage
from antidote_pl.tinyworld.judge import classify_response, sentiment_prediction
from antidote_pl.tinyworld.world import build_world

# Token budgets: a refusal or a compliant opening shows in the first few words; labels are one word.
HARMFUL_TOKENS = 12
SENTIMENT_TOKENS = 3


def rates(model, tokenizer, seed: int = 0, template: str = "tiny", batch_size: int = 100) -> dict[str, Any]:
    """Greedy answers to held-out prompts, judged by the world's ground truth.

    Args:
        model: A causal LM (merged stage model).
        tokenizer: Its tokenizer.
        seed: Tiny world seed.
        template: Prompt template the stages were trained with.
        batch_size: Generation batch size.

    Returns:
        Percentages ``harmful``, ``refused`` (held-out harmful prompts), ``benign_refused``
        (held-out benign prompts) and ``sentiment_accuracy``, with the prompt counts behind them.
    """
    world = build_world(seed)
    harmful = world.records("harmful_answer", "eval")
    benign = world.records("benign", "eval")
    sentiment = world.records("sentiment", "eval")

    def answers(records, tokens):
        prompts = [render_prompt(r, template) for r in records]
        return generate(model, tokenizer, prompts, max_new_tokens=tokens, batch_size=batch_size)

    harm_kinds = [classify_response(a) for a in answers(harmful, HARMFUL_TOKENS)]
    benign_kinds = [classify_response(a) for a in answers(benign, HARMFUL_TOKENS)]
    preds = [sentiment_prediction(a) for a in answers(sentiment, SENTIMENT_TOKENS)]

    def pct(n: int, d: int) -> float:
        return 100.0 * n / max(d, 1)

    return {
        "harmful": pct(harm_kinds.count("harmful"), len(harm_kinds)),
        "refused": pct(harm_kinds.count("refusal"), len(harm_kinds)),
        "benign_refused": pct(benign_kinds.count("refusal"), len(benign_kinds)),
        "sentiment_accuracy": pct(sum(p == r["label"] for p, r in zip(preds, sentiment)), len(sentiment)),
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "n_sentiment": len(sentiment),
    }


def check_stage(stage_dir: str, seed: int = 0) -> dict[str, Any]:
    """Loads a stage output directory and returns :func:`rates` for it."""

    model, tokenizer = load_stage(stage_dir)
    return {"stage": stage_dir, **rates(model, tokenizer, seed=seed)}
