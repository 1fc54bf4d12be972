"""Two CPU ranks must reproduce one process: the same trained weights and the same evaluation.

* Training: 2 ranks x batch ``b`` against 1 process x batch ``2b``, in a fixed sample order. Every
  sample has the same number of supervised tokens, so the per-rank token mean averaged over ranks
  (DDP's gradient all-reduce) equals the token mean of the single-process batch.
* Evaluation: ``StageEvaluator`` on 2 ranks (prompts sharded without padding) must give exactly
  the metrics and the ``generations.jsonl`` of one process.

``ddp_spawn`` runs in process (plain ``ddp`` would re-launch pytest for rank 1, see
lightning-conventions.md §2.5); rank 0 writes its outputs into ``tmp_path``, which outlives the spawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer_kwargs
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from antidote_pl.data.records import Record, Source
from antidote_pl.evaluation.evaluator import EvalDataModule, StageEvaluator
from antidote_pl.judges.base import TinyWorldJudge
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.datamodules import SFTDataModule
from antidote_pl.training.sft import CausalLMSFTModule

DDP = {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2}
PER_RANK_BATCH, STEPS, SEQ_LEN = 4, 3, 16
# Gradients are summed in another order (per-rank means, then a gloo all-reduce) and the forward
# runs on batches of another shape than in one batch of 2b, so the weights agree to float32
# rounding (observed: <= 6e-8 after 3 steps), never bitwise. Adam moves a weight by about
# lr = 1e-3 per step, ~1000x the tolerance (checked below: the comparison cannot pass on untrained
# weights).
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as each DDP rank gets on this 2-core machine (lightning-conventions §2.5).

    The single-process baselines then run the same kernels as the ranks, and the tiny models avoid
    OpenMP oversubscription, which slows them down ~15x when other processes share the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _RecordsSource(Source):
    """Fixed in-memory records (a mix no single tiny-world source offers)."""

    def __init__(self, records: list[Record]) -> None:
        self._records = [dict(r) for r in records]

    def load(self) -> list[Record]:
        return [dict(r) for r in self._records]


class _OrderedSFTData(SFTDataModule):
    """Training data in file order, dealt round-robin to the ranks: each 2-rank step then sees
    exactly the samples of the 1-process batch of ``2b``.

    Lightning replaces a training loader's sampler under DDP with a *shuffling* ``DistributedSampler``
    (whatever the loader's own ``shuffle``), but leaves a ``DistributedSampler`` instance alone.
    """

    def train_dataloader(self) -> DataLoader:
        shuffled = super().train_dataloader()
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = DistributedSampler(shuffled.dataset, shuffle=False)
        return DataLoader(
            shuffled.dataset, batch_size=shuffled.batch_size, sampler=sampler, collate_fn=shuffled.collate_fn
        )


# --------------------------------------------------------------------------- training
def _fit(root: Path, tag: str, batch_size: int, **trainer_kw) -> tuple[dict, dict, dict]:
    """Trains a fresh seeded tiny Llama (all weights) and returns (initial, saved, stage metadata)."""
    L.seed_everything(0)
    module = CausalLMSFTModule(
        model_config=TINY_LLAMA,
        tokenizer="tiny-world",
        finetuning="full",
        learning_rate=1e-3,
        output_dir=str(root / tag),
    )
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    # Pretraining text (template raw: loss on every token) cut to SEQ_LEN: equal lengths, no padding.
    data = _OrderedSFTData(
        "tiny-world",
        [TinyWorldSource("pretrain", limit=2 * PER_RANK_BATCH * STEPS)],
        template="raw",
        max_length=SEQ_LEN,
        batch_size=batch_size,
    )
    data.setup("fit")
    assert data.counts()["train_truncated"] == 2 * PER_RANK_BATCH * STEPS, "samples must have equal length"
    L.Trainer(**quiet_trainer_kwargs(root, max_steps=STEPS, **trainer_kw)).fit(module, datamodule=data)
    saved = load_file(str(root / tag / "model.safetensors"))
    meta = json.loads((root / tag / "antidote_stage.json").read_text())
    return initial, saved, meta


@pytest.mark.slow
def test_ddp_fit_matches_single_process_with_same_global_batch(tmp_path):
    init_1, single, meta_1 = _fit(tmp_path, "single", batch_size=2 * PER_RANK_BATCH)
    init_2, ddp, meta_2 = _fit(tmp_path, "ddp", batch_size=PER_RANK_BATCH, **DDP)

    assert meta_1["global_step"] == meta_2["global_step"] == STEPS
    assert set(single) == set(ddp) and len(single) > 0
    moved = 0.0
    for name, weight in single.items():
        torch.testing.assert_close(init_2[name], init_1[name], rtol=0, atol=0)
        torch.testing.assert_close(ddp[name], weight, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, float((weight - init_1[name]).abs().max()))
    # Training really moved the weights, by far more than the tolerance.
    assert moved > 1000 * ATOL


# --------------------------------------------------------------------------- evaluation
N_HARMFUL, N_TASK, EVAL_BATCH = 23, 24, 5


@pytest.fixture(scope="module")
def eval_stage(tmp_path_factory) -> Path:
    """A tiny full model that answers half of its harmful prompts and refuses the other half.

    A random model would refuse nothing and answer no review, making every rate trivially 0; a few
    seconds of training give non-trivial HS, FA and per-category rates to compare.
    """
    root = tmp_path_factory.mktemp("eval_stage")
    answers = TinyWorldSource("harmful_answer", limit=N_HARMFUL).load()
    refusals = TinyWorldSource("harmful_refusal", limit=N_HARMFUL).load()
    half = N_HARMFUL // 2
    records = answers[:half] + refusals[half:] + TinyWorldSource("sentiment", limit=48).load()
    L.seed_everything(0)
    module = CausalLMSFTModule(
        model_config=TINY_LLAMA,
        tokenizer="tiny-world",
        finetuning="full",
        learning_rate=3e-3,
        weight_decay=0.0,
    )
    data = SFTDataModule(
        "tiny-world", [_RecordsSource(records)], template="tiny", max_length=64, batch_size=16
    )
    L.Trainer(**quiet_trainer_kwargs(root, max_steps=150)).fit(module, datamodule=data)
    return module.save_stage(str(root / "stage"))


def _evaluate(stage: Path, out: Path, **trainer_kw) -> tuple[dict, list[dict], dict]:
    """Runs ``test`` and returns (metrics.json, generations.jsonl rows, logged metrics)."""
    evaluator = StageEvaluator(
        str(stage),
        judge=TinyWorldJudge(),
        harmful_max_new_tokens=12,
        task_max_new_tokens=3,
        output_dir=str(out),
    )
    # 47 prompts in batches of 5: rank 0 gets 24 and rank 1 23, in batches that mix harmful and
    # task prompts and pad differently than in one process.
    data = EvalDataModule(
        harmful=TinyWorldSource("harmful_answer", limit=N_HARMFUL),
        task=TinyWorldSource("sentiment", split="eval", limit=N_TASK),
        task_name="sst2",
        template="tiny",
        batch_size=EVAL_BATCH,
    )
    trainer = L.Trainer(**quiet_trainer_kwargs(out, **trainer_kw))
    trainer.test(evaluator, datamodule=data, verbose=False)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, rows, logged


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(eval_stage, tmp_path):
    single, single_rows, single_logged = _evaluate(eval_stage, tmp_path / "single")
    ddp, ddp_rows, ddp_logged = _evaluate(eval_stage, tmp_path / "ddp", **DDP)

    # The comparison is only meaningful if the rates are neither 0 nor 100 everywhere.
    assert 0 < single["harmful_score"] < 100, single
    assert 0 < single["finetune_accuracy"] <= 100, single
    assert (single["n_harmful_score"], single["n_finetune_accuracy"]) == (N_HARMFUL, N_TASK)
    assert len(single["harmful_score_by_category"]) > 1

    # Every prompt answered exactly once, in index order, with identical text and verdicts.
    assert [r["index"] for r in ddp_rows] == list(range(N_HARMFUL + N_TASK))
    assert ddp_rows == single_rows
    # Same counts, rates (exact: sum-reduced integer counters), per-category rates and fingerprint;
    # only the recorded process count differs.
    assert (ddp.pop("world_size"), single.pop("world_size")) == (DDP["devices"], 1)
    assert ddp == single
    assert ddp_logged == single_logged and "test/harmful_score" in ddp_logged
