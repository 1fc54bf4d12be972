"""Pipeline stages without training: a stage as a list of config files, and how a stage is run."""

from __future__ import annotations

from argparse import ArgumentError

import pytest
import yaml
from conftest import REPO

from antidote_pl.errors import ConfigError
from antidote_pl.experiment import pipeline
from antidote_pl.experiment.pipeline import _key
from antidote_pl.experiment.specs import StageSpec, stage_output_dir, stage_text
from antidote_pl.stages.cli import validate_config

ALIGN = str(REPO / "configs/tiny/align.yaml")


def vaccine_fragment(tmp_path, output_dir="outputs/tiny/align_vaccine") -> str:
    """A defense fragment over align.yaml: what configs/tiny/defenses/vaccine_align.yaml adds."""
    fragment = tmp_path / "vaccine.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {
                        "output_dir": output_dir,
                        "defense": {"class_path": "antidote_pl.defenses.Vaccine", "init_args": {"rho": 2.0}},
                    }
                }
            }
        )
    )
    return str(fragment)


def test_single_config_keeps_its_cache_key():
    """A plain string config gives exactly the text (and so the key) it had before lists existed."""
    text = (REPO / "configs/tiny/align.yaml").read_text()
    spec = StageSpec("aligned", ALIGN, ["--trainer.max_steps=5"])
    assert stage_text(spec, "stages[0]") == text
    assert _key("up", stage_text(spec, "s"), *spec.overrides) == _key("up", text, "--trainer.max_steps=5")
    assert spec.configs == [ALIGN]


def test_list_config_text_covers_every_file(tmp_path):
    fragment = vaccine_fragment(tmp_path)
    spec = StageSpec("aligned_vaccine", [ALIGN, fragment])
    text = stage_text(spec, "stages[0]")
    assert text != stage_text(StageSpec("aligned", ALIGN), "s")
    # Editing the fragment (not only the base) retrains the stage.
    (tmp_path / "vaccine.yaml").write_text((tmp_path / "vaccine.yaml").read_text().replace("2.0", "3.0"))
    assert stage_text(spec, "stages[0]") != text
    with pytest.raises(ConfigError, match=r"stages\[2\]\.config\[1\]=.*missing.yaml"):
        stage_text(StageSpec("x", [ALIGN, str(tmp_path / "missing.yaml")]), "stages[2]")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.config=\[\]"):
        stage_text(StageSpec("x", []), "stages[0]")


def test_list_config_output_dir_is_the_composed_one(tmp_path):
    spec = StageSpec("aligned_vaccine", [ALIGN, vaccine_fragment(tmp_path)])
    assert stage_output_dir(spec, "s") == "outputs/tiny/align_vaccine"
    # Read through the command's own parser, not a YAML merge: a fragment without a class_path
    # before its base is refused here exactly as `fit --config fragment --config align.yaml` is.
    upside_down = [vaccine_fragment(tmp_path), ALIGN]
    with pytest.raises(ArgumentError, match="defense.init_args.rho"):
        validate_config(upside_down)
    with pytest.raises(ArgumentError, match="defense.init_args.rho"):
        stage_output_dir(StageSpec("a", upside_down), "s")


def test_list_config_is_validated_and_run_as_repeated_config(tmp_path, monkeypatch):
    fragment = vaccine_fragment(tmp_path)
    pipeline._validate_stage(StageSpec("v", [ALIGN, fragment]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    defense_typo: 1\n")
    # The fragment is parsed with the base: a bad key in the second file fails validation.
    with pytest.raises(Exception, match="defense_typo"):
        pipeline._validate_stage(StageSpec("v", [ALIGN, str(bad)]))
    calls = []
    monkeypatch.setattr(pipeline, "run_fit", lambda configs, values, args: calls.append((configs, args)))
    pipeline._run_command(StageSpec("v", [ALIGN, fragment], ["--trainer.max_steps=1"]))
    assert calls == [([ALIGN, fragment], ["--trainer.max_steps=1"])]


def test_pipeline_yaml_accepts_a_list_config(tmp_path):
    from antidote_pl.commands.pipeline import build_parser

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "output_dir": "o",
                "stages": [{"name": "a", "config": ["x.yaml", "y.yaml"]}, {"name": "b", "config": "z.yaml"}],
                "repair": {"config": "r.yaml", "alphas": [0.1], "methods": {"w": "w.yaml"}},
                "evaluation": "e.yaml",
            }
        )
    )
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(["--config", str(cfg)]))
    assert init.stages[0].configs == ["x.yaml", "y.yaml"] and init.stages[1].configs == ["z.yaml"]


def test_validate_config_values_override_files_and_args():
    from antidote_pl.stages.cli import validate_config

    repair = [str(REPO / "configs/tiny/repair.yaml"), str(REPO / "callbacks/random.yaml")]
    cfg = validate_config(
        repair,
        ["--pruner.init_args.alpha=0.3", "--model.init_args.output_dir=from_args"],
        {"model.init_args.output_dir": None, "pruner.init_args.alpha": 0.2},
    )
    assert cfg.pruner.class_path.endswith("RandomPruneCallback")
    # Values are Python values (None, not the text "null"), set after files and arguments.
    assert cfg.model.init_args.output_dir is None and cfg.pruner.init_args.alpha == 0.2
    with pytest.raises(Exception, match="nope"):
        validate_config(repair, values={"model.init_args.nope": 1})
    with pytest.raises(Exception, match="max_steps"):
        validate_config(repair, values={"trainer.max_steps": "many"})


def test_run_fit_runs_a_stage_from_files_args_and_values(tmp_path):
    from antidote_pl.stages.cli import run_fit

    out = tmp_path / "out"
    cli = run_fit(
        [str(REPO / "configs/tiny/pretrain.yaml")],
        {"model.init_args.output_dir": str(out), "trainer.max_steps": 1, "trainer.logger": False},
        args=["--model.init_args.model_config=tiny-world-fast", "--trainer.max_steps=7"],
    )
    assert cli.subcommand == "fit" and cli.trainer.global_step == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 1
    assert saved["model"]["init_args"]["model_config"] == "tiny-world-fast"
    assert (out / "antidote_stage.json").is_file()
