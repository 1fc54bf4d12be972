"""The fine-tune stage records its realignment window; the repair stage rebuilds it from there."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, make_stages, tiny_finetune_data
from test_prune_callback import repair_module, run_repair

from antidote_pl.callbacks import WandaPruneCallback
from antidote_pl.data.mixtures import ConcatSource
from antidote_pl.data.records import source_from_spec
from antidote_pl.data.sources import LocalSource
from antidote_pl.data.window import read_window
from antidote_pl.errors import ConfigError
from antidote_pl.pruning.artifacts import load_tensors
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.datamodules import _content_key
from antidote_pl.training.realignment import RealignmentDataModule
from antidote_pl.utils.files import REALIGNMENT_WINDOW_KEY, STAGE_FILE


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("window_stages"))


def window_dm(adapter) -> RealignmentDataModule:
    return RealignmentDataModule(adapter_path=str(adapter), tokenizer="tiny-world")


def edited_stage(adapter, tmp_path, edit) -> str:
    """A copy of the adapter stage whose ``antidote_stage.json`` went through ``edit(meta)``."""
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    meta = json.loads((copy / STAGE_FILE).read_text())
    edit(meta)
    (copy / STAGE_FILE).write_text(json.dumps(meta))
    return str(copy)


def test_fine_tune_records_a_disjoint_window_that_rebuilds_the_same_records(stages):
    _, adapter = stages
    window = read_window(str(adapter))
    drawn = tiny_finetune_data()  # the fine-tune's data module, drawn again with the same settings
    realignment, harmful = window.sets["realignment"].indices, window.sets["harmful"].indices
    assert len(realignment) == 8 and len(harmful) == 8
    assert not set(realignment) & set(harmful)
    pool = TinyWorldSource("harmful_answer").load()
    assert not {_content_key(pool[i]) for i in realignment} & {_content_key(pool[i]) for i in harmful}
    assert window.settings["template"] == "tiny" and window.settings["max_length"] == 64

    dm = window_dm(adapter)
    assert dm.realignment_records == drawn.realignment_records
    assert dm.task_calibration_records == drawn.task_calibration_records
    assert all(r["harmful"] for r in dm.realignment_records)


@pytest.mark.parametrize("calibration", ["realignment", "task"])
def test_repair_from_the_window_gives_the_scores_of_the_copied_data_block(stages, tmp_path, calibration):
    """Same realignment records -> the same scores and masks as the old copied data block."""
    outputs = {}
    for name, data in (("copied", tiny_finetune_data()), ("window", window_dm(stages[1]))):
        out = tmp_path / name
        callback = WandaPruneCallback(
            alpha=0.25, output_dir=str(out), save_scores=True, calibration=calibration
        )
        run_repair(repair_module(stages), [callback], tmp_path, data)
        outputs[name] = out
    for file in ("scores.safetensors", "mask.safetensors"):
        got, want = load_tensors(outputs["window"] / file), load_tensors(outputs["copied"] / file)
        assert set(got) == set(want) and all(got[k].equal(want[k]) for k in want), file
    meta = json.loads((outputs["window"] / STAGE_FILE).read_text())
    assert (
        meta[REALIGNMENT_WINDOW_KEY]
        == json.loads((stages[1] / STAGE_FILE).read_text())[REALIGNMENT_WINDOW_KEY]
    )


def test_adapter_without_a_window_names_the_file_and_the_fix(stages, tmp_path):
    adapter = edited_stage(stages[1], tmp_path, lambda meta: meta.pop(REALIGNMENT_WINDOW_KEY))
    dm = window_dm(adapter)  # a pipeline validates the config before the fine-tune reruns: no error yet
    with pytest.raises(ConfigError, match="Re-run the fine-tune stage") as err:
        dm.setup("fit")
    assert f"{adapter}/{STAGE_FILE}" in str(err.value)


def test_changed_source_data_is_refused(stages, tmp_path):
    def edit(meta):
        meta[REALIGNMENT_WINDOW_KEY]["realignment"]["fingerprint"] = "0" * 16

    with pytest.raises(ConfigError, match="do not match the recorded fingerprint"):
        window_dm(edited_stage(stages[1], tmp_path, edit)).setup("fit")


def test_overlapping_windows_are_refused(stages, tmp_path):
    def edit(meta):
        window = meta[REALIGNMENT_WINDOW_KEY]
        window["realignment"]["indices"][0] = window["harmful"]["indices"][0]

    with pytest.raises(ConfigError, match="must be disjoint"):
        window_dm(edited_stage(stages[1], tmp_path, edit)).setup("fit")


def test_repair_data_module_refuses_training(stages, tmp_path):
    import lightning as L
    from conftest import quiet_trainer_kwargs

    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        L.Trainer(max_epochs=1, **quiet_trainer_kwargs(tmp_path)).fit(
            repair_module(stages), datamodule=window_dm(stages[1])
        )


def test_parity_window_indices_are_the_official_ones():
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(40)]
    from test_datamodules import ListSource

    dm = tiny_finetune_data(
        harmful=ListSource(records),
        num_samples=20,
        harmful_ratio=0.25,
        mode="parity",
        realignment_start=10,
        realignment_size=6,
    )
    window = dm.realignment_window()
    assert window["harmful"]["indices"] == [1, 2, 3, 4]
    assert window["realignment"]["indices"] == [11, 12, 13, 14, 15]


def test_source_specs_rebuild_nested_sources(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": "a", "r": "b", "label": 1}\n{"q": "c", "r": "d", "label": 0}\n')
    local = LocalSource(path=path, fields={"instruction": "q", "output": "r"}, filters={"label": 1})
    nested = ConcatSource([local, TinyWorldSource("sentiment", limit=3)], dedupe=False)
    rebuilt = source_from_spec(json.loads(json.dumps(nested.spec())), "spec")
    assert rebuilt.load() == nested.load()
    assert nested.spec()["init_args"]["sources"][0]["init_args"]["path"] == str(path)
    with pytest.raises(ConfigError, match="cannot import source class"):
        source_from_spec({"class_path": "antidote_pl.nowhere.Source", "init_args": {}}, "spec")


def test_tiny_repair_config_reads_the_window_from_the_adapter():
    """configs/tiny/repair.yaml has no data block of its own: the adapter path is linked into it."""
    import warnings

    from antidote_pl.stages.cli import _ValidatingCLI

    repair = REPO / "configs/tiny/repair.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ValidatingCLI(
            args=["--config", str(repair), "--model.init_args.adapter_path=x/finetune"], run=False
        )
    data = cli.config.data
    assert data.class_path == "antidote_pl.training.realignment.RealignmentDataModule"
    assert data.init_args.adapter_path == "x/finetune"
    assert data.init_args.tokenizer == "outputs/tiny/align"
    for path in sorted((REPO / "configs").rglob("repair.yaml")):
        assert "harmful_ratio" not in path.read_text() and "num_samples" not in path.read_text(), path


def test_repair_data_adapter_follows_the_model_and_may_not_differ(capsys):
    from antidote_pl.commands.dispatch import run

    repair = str(REPO / "configs/tiny/repair.yaml")
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", repair, "--data.init_args.adapter_path=somewhere/else"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "data.init_args.adapter_path='somewhere/else' differs from model.init_args.adapter_path" in err
