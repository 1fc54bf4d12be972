"""Wanda pruning under DDP: two CPU ranks, each scoring its shard, must derive the 1-process mask.

``ddp_spawn`` runs in process (plain ``ddp`` would re-launch pytest for rank 1, see
lightning-conventions.md §2.5); rank 0 writes its artefacts into ``tmp_path``, which survives the spawn.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_finetune_data
from test_prune_callback import make_stages, repair_module, run_repair

from antidote_pl.callbacks import WandaPruneCallback
from antidote_pl.pruning import load_tensors

# 10 samples in batches of 3 give 4 batches: rank 0 scores batches 0 and 2 (6 samples), rank 1
# batches 1 and 3 (4 samples, one of them alone), so the shards are uneven and padded differently.
REALIGNMENT_SIZE, BATCH_SIZE = 10, 3
# Both normalisations, so both all-reduced sums are checked. One spawn serves both: the second
# callback scores the model the first one pruned, identically in either run.
STATISTICS = ("sample_mean", "sample_token_mean")


def _repair(stages, root, tag: str, **trainer_kw) -> dict[str, tuple[dict, dict, dict]]:
    callbacks = [
        WandaPruneCallback(
            alpha=0.25, batch_size=BATCH_SIZE, statistic=s, save_scores=True, output_dir=str(root / tag / s)
        )
        for s in STATISTICS
    ]
    data = tiny_finetune_data(realignment_size=REALIGNMENT_SIZE)
    run_repair(repair_module(stages), callbacks, root, data, **trainer_kw)
    results = {}
    for s in STATISTICS:
        out = root / tag / s
        masks, scores = (load_tensors(out / f"{kind}.safetensors") for kind in ("mask", "scores"))
        results[s] = (masks, scores, json.loads((out / "mask.json").read_text()))
    return results


@pytest.mark.slow
def test_ddp_masks_equal_single_process(tmp_path):
    stages = make_stages(tmp_path / "stages")
    single = _repair(stages, tmp_path, "single")
    ddp = _repair(stages, tmp_path, "ddp", strategy="ddp_spawn", accelerator="cpu", devices=2)

    for statistic in STATISTICS:
        (single_masks, single_scores, single_report), (ddp_masks, ddp_scores, ddp_report) = (
            single[statistic],
            ddp[statistic],
        )
        assert (single_report["world_size"], ddp_report["world_size"]) == (1, 2)
        # Counts are all-reduced: both runs saw the whole set.
        assert single_report["calibration_samples"] == ddp_report["calibration_samples"] == REALIGNMENT_SIZE
        assert single_report["dataset_fingerprint"] == ddp_report["dataset_fingerprint"]
        assert set(ddp_masks) == set(single_masks) and len(single_masks) == 12
        for name, mask in single_masks.items():
            assert torch.equal(ddp_masks[name], mask), f"{statistic} {name}: DDP mask differs from 1 process"
            # One process and two shards sum in different orders: scores agree to rounding only.
            torch.testing.assert_close(ddp_scores[name], single_scores[name], rtol=1e-5, atol=0)
