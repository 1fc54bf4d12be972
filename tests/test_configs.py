"""Every YAML under configs/ (and every callback fragment) parses against the CLI, without running."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import yaml
from conftest import REPO

from antidote_pl.cli import main

ALL = sorted((REPO / "configs").rglob("*.yaml"))
# Fragments only parse combined with a stage config; tests/test_paper_configs.py parses those combinations.
FRAGMENT_DIR = REPO / "configs" / "paper" / "fragments"
PIPELINES = [p for p in ALL if p.name.startswith("pipeline")]
TOKENIZERS = [p for p in ALL if p.name.startswith("tokenizer")]
CONFIGS = [p for p in ALL if FRAGMENT_DIR not in p.parents and p not in PIPELINES + TOKENIZERS]
FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))


def print_config(*configs) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_there_are_configs():
    assert len(CONFIGS) >= 4 and len(FRAGMENTS) >= 5


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses(config):
    resolved = print_config(config)
    assert resolved["model"]["class_path"].startswith("antidote_pl.")
    assert isinstance(resolved["seed_everything"], int), "configs must fix the seed"


@pytest.mark.parametrize("config", PIPELINES, ids=lambda p: str(p.relative_to(REPO)))
def test_pipeline_config_parses(config):
    from antidote_pl.experiment import build_parser

    parser = build_parser()
    cfg = parser.parse_args(["--config", str(config)])
    for path in [s.config for s in parser.instantiate_classes(cfg).stages] + [
        cfg.repair.config,
        cfg.evaluation,
    ]:
        assert (REPO / path).is_file(), path
    for fragment in cfg.repair.methods.values():
        assert (REPO / fragment).is_file(), fragment
    for base in parser.instantiate_classes(cfg).baselines or []:
        for stage in base.stages:
            assert (REPO / stage.config).is_file(), stage.config
        assert base.repair_fragment is None or (REPO / base.repair_fragment).is_file()


@pytest.mark.parametrize("config", TOKENIZERS, ids=lambda p: str(p.relative_to(REPO)))
def test_tokenizer_config_parses(config):
    from antidote_pl.data.bpe import build_parser, check_bpe_args, corpus_from_config

    parser = build_parser()
    cfg = parser.parse_args(["--config", str(config)])
    check_bpe_args(cfg.vocab_size, cfg.min_frequency, cfg.model_max_length)
    if cfg.corpus_config is not None:
        sources, _ = corpus_from_config(str(REPO / cfg.corpus_config))
        # The corpus sources parse (and instantiate: constructors validate) like inline ones.
        parsed = parser.parse_object({"sources": sources, "output_dir": cfg.output_dir})
        assert len(parser.instantiate_classes(parsed).sources) == len(sources)
    else:
        assert cfg.sources


def test_tokenizer_mismatch_fails_before_loading(tmp_path, capsys):
    bad = tmp_path / "mismatch.yaml"
    bad.write_text("data:\n  init_args:\n    tokenizer: some/other-tokenizer\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs/tiny/finetune.yaml"), "--config", str(bad)])
    assert exc.value.code == 2
    assert "data.init_args.tokenizer='some/other-tokenizer'" in capsys.readouterr().err
