"""DataModules: harmful/task mixing, realignment disjointness, parity windows, loaders, bad input."""

from __future__ import annotations

import pytest
import torch
from test_data_templates import word_tokenizer  # shared test helper (tests/ is on sys.path)

from antidote_pl.data.records import Source
from antidote_pl.data.tokenize import IGNORE_INDEX, tokenize_record
from antidote_pl.errors import ConfigError
from antidote_pl.training.datamodules import AlignmentDataModule, HarmfulFinetuneDataModule, SFTDataModule

WORDS = ["user", ":", "assistant", "harmful", "task", "answer", "sure", "refuse", "benign"]


class ListSource(Source):
    """In-memory records; ``load`` returns copies so callers cannot mutate the pool."""

    def __init__(self, records):
        self.records = records

    def load(self):
        return [dict(r) for r in self.records]


def pool(kind: str, n: int) -> ListSource:
    """Index-bearing records: ``instruction`` ends with the pool index."""
    return ListSource(
        [{"instruction": f"{kind} {i}", "input": "", "output": f"answer {i}"} for i in range(n)]
    )


def index_of(record) -> int:
    return int(record["instruction"].split()[-1])


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def finetune(tok, **kw) -> HarmfulFinetuneDataModule:
    args = {
        "tokenizer": tok,
        "harmful": pool("harmful", 300),
        "task": pool("task", 500),
        "num_samples": 100,
        "harmful_ratio": 0.2,
        "realignment_size": 50,
        "template": "tiny",
        "max_length": 32,
        "batch_size": 4,
    }
    return HarmfulFinetuneDataModule(**{**args, **kw})


# -- random mode ---------------------------------------------------------------------------------


def test_random_mode_counts_and_tags(tok):
    dm = finetune(tok)
    train = dm.train_records
    harmful = [r for r in train if r["harmful"]]
    task = [r for r in train if not r["harmful"]]
    assert (len(harmful), len(task)) == (20, 80)
    assert all(r["instruction"].startswith("harmful") for r in harmful)
    assert all(r["instruction"].startswith("task") for r in task)
    assert len({index_of(r) for r in harmful}) == 20 and len({index_of(r) for r in task}) == 80
    # Shuffled together rather than harmful-first.
    assert [r["harmful"] for r in train] != sorted((r["harmful"] for r in train), reverse=True)
    counts = dm.counts()
    assert counts["n_harmful"] == 20 and counts["n_task"] == 80 and counts["n_realignment"] == 50
    assert counts["harmful_fraction"] == pytest.approx(0.2)


def test_realignment_is_disjoint_by_index_and_content(tok):
    # Every harmful record appears twice in the pool: index-disjoint draws could still share content.
    base = pool("harmful", 150).records
    dm = finetune(tok, harmful=ListSource(base + [dict(r) for r in base]), realignment_size=100)
    ft = [r for r in dm.train_records if r["harmful"]]
    realign = dm.realignment_records
    assert len(realign) == 100 and all(r["harmful"] for r in realign)
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert not {key(r) for r in ft} & {key(r) for r in realign}


def test_random_mode_is_seeded_and_nested(tok):
    a, b = finetune(tok, seed=7), finetune(tok, seed=7)
    assert a.train_records == b.train_records
    assert a.realignment_records == b.realignment_records
    assert finetune(tok, seed=8).train_records != a.train_records
    small = finetune(tok, seed=7, harmful_ratio=0.1)
    ids = lambda dm: {r["instruction"] for r in dm.train_records if r["harmful"]}  # noqa: E731
    assert ids(small) < ids(a)
    assert small.realignment_records == a.realignment_records


def test_task_calibration_records(tok):
    dm = finetune(tok)
    used = [r["instruction"] for r in dm.train_records if not r["harmful"]]
    assert sorted(r["instruction"] for r in dm.task_calibration_records) == sorted(used)
    few = finetune(tok, task_calibration_size=10)
    assert few.task_calibration_records == dm.task_calibration_records[:10]
    with pytest.raises(ConfigError, match="task_calibration_size=81.*80"):
        _ = finetune(tok, task_calibration_size=81).task_calibration_records
    with pytest.raises(ConfigError, match="harmful_ratio"):
        finetune(tok, harmful_ratio=1.0).task_calibration_dataloader()


# -- parity mode ---------------------------------------------------------------------------------


def test_parity_windows_match_official(tok):
    dm = finetune(
        tok,
        harmful=pool("harmful", 8000),
        task=pool("task", 6000),
        num_samples=5000,
        harmful_ratio=0.2,
        realignment_size=2000,
        mode="parity",
    )
    train = dm.train_records
    harmful = [index_of(r) for r in train if r["harmful"]]
    task = [index_of(r) for r in train if not r["harmful"]]
    assert harmful == list(range(1, 1000))
    assert task == list(range(4000))
    assert [r["harmful"] for r in train] == [True] * 999 + [False] * 4000
    assert [index_of(r) for r in dm.realignment_records] == list(range(5001, 7000))
    assert dm.counts()["n_train"] == 4999


def test_parity_zero_ratio(tok):
    dm = finetune(
        tok,
        harmful=pool("harmful", 300),
        num_samples=100,
        harmful_ratio=0.0,
        mode="parity",
        realignment_start=10,
    )
    assert [index_of(r) for r in dm.train_records] == list(range(100))
    assert [index_of(r) for r in dm.realignment_records] == list(range(11, 60))


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"harmful_ratio": 0.5, "realignment_start": 1000}, r"realignment_start=1000.*>= 2499"),
        ({"realignment_size": 3001}, r"realignment_size=3001.*at most 3000.*8000"),
        ({"harmful": pool("harmful", 500)}, r"num_samples=5000.*harmful pool.*500 records.*needs 1000"),
        ({"task": pool("task", 3999)}, r"num_samples=5000.*task pool.*3999 records.*needs 4000"),
    ],
)
def test_parity_errors(tok, kw, pattern):
    args = {
        "harmful": pool("harmful", 8000),
        "task": pool("task", 6000),
        "num_samples": 5000,
        "mode": "parity",
    }
    dm = finetune(tok, **{**args, **kw})
    with pytest.raises(ConfigError, match=pattern):
        dm.setup("fit")


# -- loaders -------------------------------------------------------------------------------------


def test_setup_is_idempotent_and_loaders_batch(tok):
    dm = finetune(tok)
    dm.setup("fit")
    train_ds = dm._train_ds
    dm.setup("validate")
    assert dm._train_ds is train_ds
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, batch["attention_mask"].sum(1).max().item())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert dm.val_dataloader() == []
    assert dm.counts()["train_truncated"] == 0


def test_train_shuffle_is_seeded(tok):
    first = [next(iter(finetune(tok).train_dataloader()))["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])


def test_realignment_loader_is_unshuffled(tok):
    dm = finetune(tok)
    loader = dm.realignment_dataloader(batch_size=1)
    assert len(loader) == 50
    expected = [tokenize_record(tok, r, "tiny", 32)["input_ids"] for r in dm.realignment_records]
    assert [b["input_ids"][0].tolist() for b in loader] == expected
    assert len(dm.task_calibration_dataloader()) == 80 // 4
    assert dm.counts()["realignment_truncated"] == 0


def test_val_split(tok):
    dm = finetune(tok, val_size=10)
    train, val = dm.train_records, dm.val_records
    assert (len(train), len(val)) == (90, 10)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    assert len(dm.val_dataloader()) == 3
    assert finetune(tok, val_size=10).val_records == val
    with pytest.raises(ConfigError, match="val_size=100"):
        finetune(tok, val_size=100).setup()


def test_sft_datamodule_concatenates_raw(tok):
    dm = SFTDataModule(tok, [pool("task", 3), pool("harmful", 2)], template="raw", max_length=16)
    assert [r["instruction"] for r in dm.train_records] == [
        "task 0",
        "task 1",
        "task 2",
        "harmful 0",
        "harmful 1",
    ]
    dm.setup()
    sample = dm._train_ds[0]
    assert sample["labels"][0] == IGNORE_INDEX and IGNORE_INDEX not in sample["labels"][1:]


def test_alignment_datamodule(tok):
    dm = AlignmentDataModule(
        tok, pool("harmful", 30), pool("benign", 100), benign_size=20, template="tiny", seed=3
    )
    records = dm.train_records
    assert len(records) == 50
    assert sum(r["instruction"].startswith("benign") for r in records) == 20
    again = AlignmentDataModule(
        tok, pool("harmful", 30), pool("benign", 100), benign_size=20, template="tiny", seed=3
    )
    assert again.train_records == records
    assert dm.counts()["n_benign"] == 20 and dm.counts()["n_refusal"] == 30
    with pytest.raises(ConfigError, match="benign_size=101.*100 records"):
        AlignmentDataModule(tok, pool("harmful", 3), pool("benign", 100), benign_size=101).setup()


def test_tokenizer_spec_is_loaded_lazily(tok, monkeypatch):
    import antidote_pl.models.loading as loading

    calls = []
    monkeypatch.setattr(loading, "load_tokenizer", lambda spec, field="tokenizer": calls.append(spec) or tok)
    dm = SFTDataModule("my-tokenizer", [pool("task", 4)], template="tiny")
    assert calls == []
    dm.setup("fit")
    dm.setup("fit")
    assert calls == ["my-tokenizer"] and dm.tokenizer is tok


@pytest.mark.filterwarnings("ignore:.*no `validation_step`.*")
def test_fit_runs_on_the_datamodule(tok):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tok), len(tok))

        def training_step(self, batch, _):
            logits = self.emb(batch["input_ids"])[:, :-1]
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=finetune(tok))
    assert trainer.global_step == 2


# -- bad constructor arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"harmful_ratio": -0.1}, "harmful_ratio"),
        ({"harmful_ratio": 1.5}, "harmful_ratio"),
        ({"harmful_ratio": True}, "harmful_ratio"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"mode": "sorted"}, "mode"),
        ({"realignment_size": 0}, "realignment_size"),
        ({"realignment_size": 1, "mode": "parity"}, "realignment_size"),
        ({"realignment_start": -1}, "realignment_start"),
        ({"task_calibration_size": 0}, "task_calibration_size"),
        ({"template": "chatml"}, "template"),
        ({"max_length": 0}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_size": -1}, "val_size"),
        ({"tokenizer": ""}, "tokenizer"),
    ],
)
def test_bad_finetune_args(tok, kw, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        finetune(tok, **kw)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"num_samples": 2000}, r"num_samples=2000.*harmful pool.*300 records.*needs 400"),
        ({"num_samples": 1000, "harmful_ratio": 0.1}, r"num_samples=1000.*task pool.*500 records.*needs 900"),
        ({"realignment_size": 281}, r"realignment_size=281.*at most 280"),
        ({"harmful": ListSource([])}, r"harmful=.*at least one record"),
        ({"task": ListSource([])}, r"task=.*at least one record"),
    ],
)
def test_pool_errors_at_setup(tok, kw, pattern):
    dm = finetune(tok, **kw)
    with pytest.raises(ConfigError, match=pattern):
        dm.setup("fit")


def test_bad_sft_and_alignment_args(tok):
    with pytest.raises(ConfigError, match="sources="):
        SFTDataModule(tok, [])
    with pytest.raises(ConfigError, match="benign_size=5"):
        AlignmentDataModule(tok, pool("harmful", 3), benign_size=5)
    with pytest.raises(ConfigError, match="benign_size=0"):
        AlignmentDataModule(tok, pool("harmful", 3), pool("benign", 3), benign_size=0)


def test_realign_start_is_still_accepted_with_a_warning(tok, caplog):
    """The old name of realignment_start keeps existing configs working."""
    kw = {"harmful": pool("harmful", 300), "num_samples": 100, "harmful_ratio": 0.1, "mode": "parity"}
    kw["realignment_size"] = 50
    with caplog.at_level("WARNING"):
        old = HarmfulFinetuneDataModule(tok, task=pool("task", 300), realign_start=150, **kw)
    assert "realign_start is deprecated: use realignment_start" in caplog.text
    new = HarmfulFinetuneDataModule(tok, task=pool("task", 300), realignment_start=150, **kw)
    assert old.realignment_records == new.realignment_records
    with pytest.raises(ConfigError, match="realign_start=150"):
        HarmfulFinetuneDataModule(tok, task=pool("task", 300), realign_start=150, realignment_start=120, **kw)
