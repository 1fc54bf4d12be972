"""Every YAML under configs/ (and every callback fragment) parses against the CLI, without running.

Stage configs parse alone; fragments (defenses, judges, precision, paper model/task/sweep/trainer/align
fragments) are composed over the stage configs they change, as ``--config base --config fragment``, and
must hold only what differs from them. Every file under configs/ must be one of these kinds.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from antidote_pl.commands.dispatch import run
from antidote_pl.stages.cli import _ValidatingCLI

CONFIGS_DIR = REPO / "configs"
ALL = sorted(CONFIGS_DIR.rglob("*.yaml"))
PIPELINES = [p for p in ALL if p.name.startswith("pipeline")]
# Fragments of a world's pipeline.yaml (e.g. its multi-seed variant), parsed composed over it.
PIPELINE_FRAGMENTS = [p for p in ALL if p.stem == "seeds"]
TOKENIZERS = [p for p in ALL if p.name.startswith("tokenizer")]
# Source specs (class_path/init_args of one record source), referenced by path from stage configs.
SOURCE_FRAGMENTS = sorted((CONFIGS_DIR / "paper" / "fragments" / "data").glob("*.yaml"))
STAGES = ("pretrain", "align", "finetune", "repair", "eval")
CALLBACK_FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))


def bases_of(path: Path) -> list[Path]:
    """The stage configs a fragment is composed over; ``[]`` for a stage config itself.

    Raises:
        ValueError: for a file that is none of the known kinds (so a new kind must be added here).
    """
    world, *rest = path.relative_to(CONFIGS_DIR).parts
    root = CONFIGS_DIR / world
    stage = path.stem.rsplit("_", 1)[-1]
    if len(rest) == 1 and path.stem in STAGES:
        return []
    if rest[0] in ("defenses", "judges") and stage in STAGES:
        return [root / f"{stage}.yaml"]
    if rest[0] == "precision":  # compute settings: every stage of the world and its evaluation
        return [root / f"{s}.yaml" for s in ("align", "finetune", "repair", "eval")]
    if rest[0] == "fragments":
        kind = rest[1]
        if kind == "model":
            return [root / f"{s}.yaml" for s in ("align", "finetune", "repair")]
        if kind == "trainer":  # training settings: the repair stage does not train
            return [root / f"{s}.yaml" for s in ("align", "finetune")]
        if kind == "task" or (kind == "sweep" and stage in STAGES):
            return [root / f"{stage}.yaml"]
        if kind == "align":
            return [root / "align.yaml"]
    raise ValueError(f"{path}: not a stage config, pipeline, tokenizer config or known fragment")


KINDS = [p for p in ALL if p not in PIPELINES + PIPELINE_FRAGMENTS + TOKENIZERS + SOURCE_FRAGMENTS]
CONFIGS = [p for p in KINDS if not bases_of(p)]
COMPOSED = [(base, p) for p in KINDS for base in bases_of(p)]


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def resolve(*configs, args=()) -> dict:
    """The config as ``fit`` sees it, links applied (``--print_config`` prints it before them)."""
    argv = [a for c in configs for a in ("--config", str(c))] + list(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ValidatingCLI(args=argv, run=False)
    dumped = cli.parser.dump(cli.config, skip_none=False, skip_validation=True, skip_link_targets=False)
    return yaml.safe_load(dumped)


def print_config(*configs) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def leaves(node, prefix="") -> dict[str, object]:
    """A YAML mapping flattened to ``dotted.key -> value`` (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_every_config_is_of_a_known_kind():
    assert len(CONFIGS) >= 4 and len(CALLBACK_FRAGMENTS) >= 5 and len(COMPOSED) >= 20
    for path in KINDS:
        bases_of(path)  # raises for an unknown kind


@pytest.mark.parametrize("config", CONFIGS, ids=rel)
def test_config_parses(config):
    resolved = resolve(config)
    assert resolved["model"]["class_path"].startswith("antidote_pl.")
    assert isinstance(resolved["seed_everything"], int), "configs must fix the seed"
    assert print_config(config)["model"]["class_path"] == resolved["model"]["class_path"]


@pytest.mark.parametrize(("base", "fragment"), COMPOSED, ids=lambda p: rel(p))
def test_fragment_composes_over_its_base(base, fragment):
    """``--config base --config fragment`` parses, and the fragment holds only what differs."""
    composed, alone = resolve(base, fragment), resolve(base)
    assert composed != alone, f"{rel(fragment)} changes nothing in {rel(base)}"
    base_raw = leaves(yaml.safe_load(base.read_text()))
    restated = {
        k: v
        for k, v in leaves(yaml.safe_load(fragment.read_text())).items()
        if base_raw.get(k, object()) == v
    }
    assert not restated, f"{rel(fragment)} repeats {rel(base)}: {restated}"


REPAIRS = sorted(CONFIGS_DIR.glob("*/repair.yaml"))


@pytest.mark.parametrize("callback", CALLBACK_FRAGMENTS, ids=rel)
def test_callback_fragments_compose_over_every_repair_config(callback):
    expected = yaml.safe_load(callback.read_text())["pruner"]["class_path"]
    for repair in REPAIRS:
        assert resolve(repair, callback)["pruner"]["class_path"] == expected, rel(repair)


@pytest.mark.parametrize("stage", ["align", "finetune", "repair"])
def test_paper_model_and_task_fragments_combine_in_either_order(stage):
    paper = CONFIGS_DIR / "paper"
    model = paper / "fragments/model/gemma-7b.yaml"
    task = paper / f"fragments/task/gsm8k/{stage}.yaml"
    task = [task] if task.is_file() else []
    one, other = (
        resolve(paper / f"{stage}.yaml", model, *task),
        resolve(paper / f"{stage}.yaml", *task, model),
    )
    assert one == other
    args = one["model"]["init_args"]
    assert args["model_name_or_path"] == "google/gemma-7b"
    assert one["data"]["init_args"]["tokenizer"] == "google/gemma-7b"
    if stage == "align":
        assert args["output_dir"] == "outputs/gemma-7b/align"
        return
    assert args["merge_adapters"] == ["outputs/gemma-7b/align"]
    assert (
        args["output_dir"]
        == f"outputs/gemma-7b/gsm8k/default/{'finetune' if stage == 'finetune' else 'antidote'}"
    )
    if stage == "repair":
        assert (
            args["adapter_path"]
            == one["data"]["init_args"]["adapter_path"]
            == ("outputs/gemma-7b/gsm8k/default/finetune")
        )


def test_a_placeholder_without_its_run_name_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", str(CONFIGS_DIR / "paper/finetune.yaml"), "--run.task=null"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        "model.init_args.output_dir='outputs/{model}/{task}/{variant}/finetune'" in err and "run.task" in err
    )


def test_a_seed_placeholder_in_a_stage_path_is_an_error(capsys):
    """Only the pipeline fills {seed}, in the overrides it passes: one in a stage path is refused."""
    with pytest.raises(SystemExit) as exc:
        run(
            [
                "fit",
                "--config",
                str(CONFIGS_DIR / "tiny/finetune.yaml"),
                "--model.init_args.output_dir=outputs/tiny/seed{seed}/finetune",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "outputs/tiny/seed{seed}/finetune" in err and "list of seeds" in err


@pytest.mark.parametrize("fragment", SOURCE_FRAGMENTS, ids=rel)
def test_source_fragments_build_sources(fragment):
    from antidote_pl.data.records import Source, source_from_spec

    assert isinstance(source_from_spec(yaml.safe_load(fragment.read_text()), rel(fragment)), Source)


def test_tokenizer_is_stated_once():
    """Stage configs name the tokenizer in the model only; the data module follows it."""
    for config in CONFIGS + [f for _, f in COMPOSED]:
        data = (yaml.safe_load(config.read_text()).get("data") or {}).get("init_args") or {}
        assert "tokenizer" not in data, rel(config)
    assert (
        resolve(CONFIGS_DIR / "tiny/finetune.yaml")["data"]["init_args"]["tokenizer"] == "outputs/tiny/align"
    )
    assert resolve(CONFIGS_DIR / "tiny/pretrain.yaml")["data"]["init_args"]["tokenizer"] == "tiny-world"


PIPELINE_CASES = [[p] for p in PIPELINES] + [[p.parent / "pipeline.yaml", p] for p in PIPELINE_FRAGMENTS]


@pytest.mark.parametrize("configs", PIPELINE_CASES, ids=lambda c: "+".join(rel(p) for p in c))
def test_pipeline_config_parses(configs):
    from antidote_pl.commands.pipeline import build_parser

    parser = build_parser()
    cfg = parser.parse_args([a for c in configs for a in ("--config", str(c))])
    built = parser.instantiate_classes(cfg)
    stages = list(built.stages) + [s for b in built.baselines or [] for s in b.stages]
    for stage in stages:
        files = [stage.config] if isinstance(stage.config, str) else list(stage.config)
        for path in files:
            assert (REPO / path).is_file(), path
        if stage.command == "fit":
            resolve(*(REPO / f for f in files))  # a base and its fragment compose
    evaluation = [cfg.evaluation] if isinstance(cfg.evaluation, str) else list(cfg.evaluation)
    repair = [cfg.repair.config] if isinstance(cfg.repair.config, str) else list(cfg.repair.config)
    for path in [*repair, *evaluation, *cfg.repair.methods.values()]:
        assert (REPO / path).is_file(), path
    if len(repair) > 1:
        resolve(*(REPO / f for f in repair))  # the repair's files compose too
    if len(evaluation) > 1:
        resolve(*(REPO / f for f in evaluation))  # the evaluation's files compose too
    for base in built.baselines or []:
        assert base.repair_fragment is None or (REPO / base.repair_fragment).is_file()


@pytest.mark.parametrize("config", TOKENIZERS, ids=rel)
def test_tokenizer_config_parses(config):
    from antidote_pl.data.bpe import check_bpe_args, corpus_from_config
    from antidote_pl.stages.tokenizer import build_parser

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
        run(["fit", "--config", str(REPO / "configs/tiny/finetune.yaml"), "--config", str(bad)])
    assert exc.value.code == 2
    assert "data.init_args.tokenizer='some/other-tokenizer'" in capsys.readouterr().err
