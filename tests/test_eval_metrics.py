"""Counter metrics: single-process values, input checks, and exact equality under 2-process DDP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from antidote_pl.errors import ConfigError
from antidote_pl.evaluation.metrics import HarmfulScore, RateByCategory, TaskAccuracy

CATEGORIES = ["fraud", "violence", "privacy"]


def _data(n: int = 13):
    gen = torch.Generator().manual_seed(7)
    flags = torch.rand(n, generator=gen) < 0.4
    correct = torch.rand(n, generator=gen) < 0.7
    cats = [CATEGORIES[i] for i in torch.randint(0, 2, (n,), generator=gen).tolist()]  # "privacy" unused
    return flags, correct, cats


def _compute_all(metrics) -> dict:
    hs, acc, by_cat = metrics
    return {
        "hs": float(hs.compute()),
        "acc": float(acc.compute()),
        "by_cat": {k: float(v) for k, v in by_cat.compute().items()},
        "hs_counts": hs.counts(),
        "cat_counts": by_cat.counts(),
    }


def _update(metrics, flags, correct, cats) -> None:
    hs, acc, by_cat = metrics
    hs.update(flags)
    acc.update(correct)
    by_cat.update(flags, cats)


def test_single_process_values():
    hs = HarmfulScore()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(hs.compute()))
    hs.update(torch.tensor([True, False, False, True]))
    hs.update([1, 0])
    assert float(hs.compute()) == pytest.approx(100 * 3 / 6)
    assert hs.counts() == {"hits": 3, "total": 6}
    acc = TaskAccuracy()
    acc.update(torch.tensor([[True, True], [True, False]]))
    assert float(acc.compute()) == 75.0
    by_cat = RateByCategory(CATEGORIES)
    by_cat.update(torch.tensor([True, False, True]), ["fraud", "fraud", "violence"])
    by_cat.update(torch.tensor([False]), torch.tensor([1]))
    rates = by_cat.compute()
    assert float(rates["fraud"]) == 50.0 and float(rates["violence"]) == 50.0
    assert math.isnan(float(rates["privacy"]))
    assert by_cat.counts()["violence"] == {"hits": 1, "total": 2}
    hs.reset()
    assert hs.counts() == {"hits": 0, "total": 0}


def test_bad_inputs():
    with pytest.raises(ConfigError, match="harmful"):
        HarmfulScore().update(torch.tensor([0, 2]))
    m = RateByCategory(CATEGORIES)
    with pytest.raises(ConfigError, match="'cyber'"):
        m.update([True], ["cyber"])
    with pytest.raises(ConfigError, match="indices below 3"):
        m.update([True], torch.tensor([3]))
    with pytest.raises(ConfigError, match="one per flag"):
        m.update([True, False], ["fraud"])
    with pytest.raises(ConfigError, match="distinct"):
        RateByCategory(["a", "a"])


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        flags, correct, cats = _data()
        # Uneven shards (5 and 8 items), rank 1 in two updates, to exercise the sum reduction.
        bounds = [(0, 5)] if rank == 0 else [(5, 9), (9, 13)]
        metrics = (HarmfulScore(), TaskAccuracy(), RateByCategory(CATEGORIES))
        for lo, hi in bounds:
            _update(metrics, flags[lo:hi], correct[lo:hi], cats[lo:hi])
        result = _compute_all(metrics)
        result["local_total_after"] = int(metrics[0].total)  # local state restored after sync
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        torch.distributed.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    metrics = (HarmfulScore(), TaskAccuracy(), RateByCategory(CATEGORIES))
    _update(metrics, *_data())
    expected = json.loads(json.dumps(_compute_all(metrics)))  # same NaN/float round trip as the ranks
    for rank, local_total in ((0, 5), (1, 8)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.pop("local_total_after") == local_total
        assert got.keys() == expected.keys()
        for key in ("hs", "acc", "hs_counts", "cat_counts"):
            assert got[key] == expected[key], key
        for cat, rate in expected["by_cat"].items():
            assert (math.isnan(rate) and math.isnan(got["by_cat"][cat])) or got["by_cat"][cat] == rate
    assert expected["hs_counts"]["total"] == 13
