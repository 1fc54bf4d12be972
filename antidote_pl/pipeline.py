"""The one-command experiment: train, repair with every method over an alpha sweep, evaluate, report.

::

    python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml [--force]

1. Runs each training stage (``fit`` with its config, or ``tokenizer`` for a stage that trains a
   tokenizer), in order. A stage whose output directory already holds a finished result for the
   same config (and the same upstream stages) is reused; ``--force`` reruns everything.
2. Scores the fine-tuned model once per repair method, through the method's own callback fragment
   (``callbacks/*.yaml``) with ``save_scores``, so every alpha comes from one scoring pass.
3. Evaluates the reference stages (e.g. aligned, fine-tuned), the unrepaired model and every
   (method, alpha) by applying masks to the adapter in memory and restoring it afterwards.
4. Writes ``report.json``, ``report.md`` (HS and FA per variant and alpha, with the number of
   prompts behind each figure) and ``report.png`` (HS against FA, one curve per method).

Every result is written atomically and cached under ``output_dir``, so an interrupted run resumes
from the last finished step and never reports a half-written result.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from antidote_pl.cli import AntidoteCLI, validate_config
from antidote_pl.data.bpe import build_parser as tokenizer_parser
from antidote_pl.data.bpe import main as tokenizer_main
from antidote_pl.errors import ConfigError, bad_value, check_choice
from antidote_pl.eval.intervals import rate_interval
from antidote_pl.models.loading import read_stage_metadata
from antidote_pl.pruning import apply_target_masks_, find_targets, masks_for_alphas, overall_fraction
from antidote_pl.pruning.artifacts import artifacts_fingerprint, read_report, read_scores
from antidote_pl.pruning.select import check_alpha
from antidote_pl.pruning.targets import to_param_layout
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.hashing import directory_fingerprint
from antidote_pl.utils.io import (
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    claim_output_dir,
    mark_output_dir,
    overlap,
)

DONE_FILE = "pipeline_done.json"
# What an evaluation reads from a stage directory; anything else there (e.g. DONE_FILE, which
# carries a timestamp) must not change a result's cache key.
STAGE_FILES = (
    "*.safetensors",
    "antidote_stage.json",
    "adapter_config.json",
    "config.json",
    "mask.json",
    "tokenizer*",
)
#: The stage runs write only directories this pipeline owns (its stage and score outputs), so
#: replacing an earlier result there is allowed; an unmarked directory is still never replaced.
OVERWRITE_STAGE = "--model.init_args.overwrite=true"


@dataclass
class StageSpec:
    """One training stage.

    Args:
        name: Short name used in the report (e.g. ``align``).
        config: Config file for ``python -m antidote_pl <command>``, or a list of them composed in
            order like repeated ``--config`` (e.g. a base config and a defense fragment).
        overrides: Extra command-line arguments for that run.
        command: ``fit`` (a model stage, writing ``model.init_args.output_dir``) or ``tokenizer``
            (trains a tokenizer, writing the config's ``output_dir``; see :mod:`antidote_pl.data.bpe`).
    """

    name: str
    config: str | list[str]
    overrides: list[str] = field(default_factory=list)
    command: str = "fit"

    @property
    def configs(self) -> list[str]:
        """The config files, in composition order (one for a single ``config`` string)."""
        return [self.config] if isinstance(self.config, str) else list(self.config)


@dataclass
class RepairSpec:
    """The repair sweep.

    Args:
        config: Repair config (``fit`` with ``max_epochs: 0`` on the fine-tuned adapter).
        alphas: Fractions removed, each in (0, 1).
        methods: Method name -> callback fragment (``callbacks/*.yaml``).
        overrides: Extra command-line arguments for every scoring run (e.g. the fine-tuned adapter
            of one seed, see :mod:`antidote_pl.seeds`).
        method_overrides: Method name -> extra arguments for that method's scoring run only (e.g.
            ``--pruner.init_args.seed`` of the random ablation).
    """

    config: str
    alphas: list[float]
    methods: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class BaselineSpec:
    """A baseline defense: its own training stages, evaluated as one report row.

    Args:
        name: Row name (e.g. ``vaccine``).
        stages: Stages run after the main ones (e.g. a Vaccine alignment, then the same harmful
            fine-tuning on top of it); the last one is evaluated.
        repair_fragment: Optionally also repair the last stage with this callback fragment (e.g.
            ``callbacks/wanda.yaml``), reported as ``<name>+<method>`` (a combined defense).
        repair_alpha: Alpha for that repair.
    """

    name: str
    stages: list[StageSpec]
    repair_fragment: str | None = None
    repair_alpha: float = 0.1


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read(path: str, field: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise bad_value(field, path, "an existing YAML file")
    return p.read_text()


STAGE_COMMANDS = ("fit", "tokenizer")


def _override(overrides: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in command-line ``overrides`` (``--f=v`` or ``--f v``), if any."""
    for i, arg in enumerate(overrides):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(overrides):
            return overrides[i + 1]
    return None


def _config_fields(spec: StageSpec, field: str) -> list[tuple[str, str]]:
    """``(file, field)`` per config file of a stage; a list's items are named ``<field>.config[i]``."""
    if isinstance(spec.config, str):
        return [(spec.config, f"{field}.config")]
    if not spec.config:
        raise bad_value(f"{field}.config", spec.config, "a config file or a non-empty list of them")
    return [(c, f"{field}.config[{i}]") for i, c in enumerate(spec.config)]


def _composed_yaml(spec: StageSpec) -> dict[str, Any]:
    """The stage's config files merged in order (later files win, key by key), as ``--config`` does."""
    merged: dict[str, Any] = {}
    for config in spec.configs:
        _deep_update(merged, yaml.safe_load(Path(config).read_text()) or {})
    return merged


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _stage_text(spec: StageSpec, field: str) -> str:
    """A stage's config text for its cache key; a tokenizer's ``corpus_config`` text is part of it,
    so editing the pretraining data retrains the tokenizer too.

    Every file of a list is read (and must exist); a single file gives just its text, so the keys
    of existing caches stay valid.
    """
    text = "\0".join(_read(c, f) for c, f in _config_fields(spec, field))
    if spec.command == "tokenizer":
        corpus = _override(spec.overrides, "--corpus_config") or _composed_yaml(spec).get("corpus_config")
        if corpus:
            text += "\0" + _read(corpus, f"{field}.corpus_config")
    return text


def _stage_output_dir(spec: StageSpec, field: str) -> str:
    """The directory a stage writes (its config, or an override).

    ``fit`` stages write ``model.init_args.output_dir``, ``tokenizer`` stages ``output_dir``.
    """
    check_choice(f"{field}.command", spec.command, STAGE_COMMANDS)
    flag = "--model.init_args.output_dir" if spec.command == "fit" else "--output_dir"
    overridden = _override(spec.overrides, flag)
    if overridden is not None:
        return overridden
    cfg = _composed_yaml(spec)
    if spec.command == "fit":
        out = (cfg.get("model") or {}).get("init_args", {}).get("output_dir")
    else:
        out = cfg.get("output_dir")
    if not out:
        raise bad_value(f"{field}.config", spec.config, f"a {spec.command} config that sets {flag[2:]}")
    return out


def _is_done(directory: str | Path, key: str) -> bool:
    marker = Path(directory) / DONE_FILE
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def _mark_done(directory: str | Path, key: str, seconds: float | None = None) -> None:
    """Marks a finished step, with the seconds it took so that a resumed run's report counts them."""
    atomic_write_json(
        Path(directory) / DONE_FILE,
        {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds},
    )


def _done_seconds(directory: str | Path) -> float | None:
    return read_json_file(Path(directory) / DONE_FILE, "a pipeline step marker").get("seconds")


def _fit(configs: list[str], overrides: list[str]) -> None:

    args = ["fit"]
    for c in configs:
        args += ["--config", c]
    AntidoteCLI(args=[*args, *overrides])


def _config_args(spec: StageSpec) -> list[str]:
    return [a for c in spec.configs for a in ("--config", c)]


def _run_command(spec: StageSpec) -> None:
    if spec.command == "tokenizer":
        tokenizer_main([*_config_args(spec), *spec.overrides, "--overwrite=true"])
    else:
        _fit(spec.configs, [*spec.overrides, OVERWRITE_STAGE])


def _validate_stage(spec: StageSpec) -> None:
    if spec.command == "tokenizer":
        tokenizer_parser().parse_args([*_config_args(spec), *spec.overrides])
    else:
        validate_config(spec.configs, spec.overrides)


def _validate_configs(
    stages: list[StageSpec], repair: RepairSpec, evaluation: str, baselines: list[BaselineSpec]
) -> None:
    """Parses every config the run will use, as its step will, before the first step runs.

    Nothing is loaded; a typo in a late step (a method fragment, the judge's ``class_path``, a
    baseline) fails now rather than after an hour of training.
    """
    for spec in [*stages, *(s for b in baselines for s in b.stages)]:
        _validate_stage(spec)
    for method, fragment in repair.methods.items():
        validate_config(
            [repair.config, fragment],
            [*repair.overrides, *repair.method_overrides.get(method, [])],
        )
    for base in baselines:
        if base.repair_fragment is not None:
            validate_config([repair.config, base.repair_fragment])
    validate_config([evaluation])


def _evaluator(config: str, stage: str, merge: bool):

    cli = AntidoteCLI(
        args=[
            "--config",
            config,
            "--model.init_args.stage",
            stage,
            "--model.init_args.merge_adapter",
            str(merge).lower(),
            "--model.init_args.output_dir",
            "null",
        ],
        run=False,
    )
    return cli.model, cli.datamodule, cli.trainer


def _evaluate(evaluator, datamodule, trainer, out_dir: Path) -> dict[str, Any]:
    evaluator.output_dir = str(out_dir)
    evaluator.overwrite = True  # results/<name> is the pipeline's own: a recomputed result replaces it
    trainer.test(evaluator, datamodule=datamodule, verbose=False)
    return dict(evaluator.results)


def run_pipeline(
    stages: list[StageSpec],
    repair: RepairSpec,
    evaluation: str,
    output_dir: str,
    references: list[str] | None = None,
    force: bool = False,
    baselines: list[BaselineSpec] | None = None,
) -> dict[str, Any]:
    """Runs the whole experiment and writes the report; see the module docstring.

    Args:
        stages: Training stages in order; the last one is the fine-tuned model that gets repaired.
        repair: The repair config, alphas and methods.
        evaluation: Config for ``python -m antidote_pl test`` (StageEvaluator + EvalDataModule).
        output_dir: Where scores, per-variant results and the report go.
        references: Stage names evaluated as reference rows (default: every stage but the first).
        force: Rerun everything, ignoring finished results.
        baselines: Baseline defenses trained after the main stages, one report row each (plus a
            combined row when a baseline is also repaired).

    Returns:
        The report as a dict (also written to ``report.json``).

    Raises:
        ConfigError: for a missing config file, a bad alpha, an unknown reference, or an
            ``output_dir`` that may not be written (an unmarked non-empty directory, one inside a
            stage output, one another run is writing), before any work.
    """

    if not stages:
        raise bad_value("stages", stages, "at least one training stage")
    texts = {f"stages[{i}].config": _stage_text(s, f"stages[{i}]") for i, s in enumerate(stages)}
    repair_text = _read(repair.config, "repair.config")
    eval_text = _read(evaluation, "evaluation")
    fragments = {m: _read(f, f"repair.methods.{m}") for m, f in repair.methods.items()}
    if not repair.methods:
        raise bad_value("repair.methods", repair.methods, "at least one method -> callback fragment")
    alphas = sorted({check_alpha(a, "repair.alphas") for a in repair.alphas})
    if not alphas:
        raise bad_value("repair.alphas", repair.alphas, "at least one alpha in (0, 1)")
    names = [s.name for s in stages]
    references = names[1:] if references is None else references
    unknown = [r for r in references if r not in names]
    if unknown:
        raise bad_value("references", unknown, f"stage names from {names}")
    stage_dirs = {s.name: _stage_output_dir(s, f"stages[{i}]") for i, s in enumerate(stages)}
    models = [s.name for s in stages if s.command == "fit"]
    if stages[-1].command != "fit":
        raise bad_value(
            f"stages[{len(stages) - 1}].command", stages[-1].command, "'fit': the last stage is repaired"
        )
    not_models = [r for r in references if r not in models]
    if not_models:
        raise bad_value("references", not_models, f"names of fit stages (models) from {models}")
    baselines = list(baselines or [])
    baseline_texts: dict[str, list[str]] = {}
    for b, base in enumerate(baselines):
        field = f"baselines[{b}]"
        if not base.stages:
            raise bad_value(f"{field}.stages", base.stages, "at least one stage")
        baseline_texts[base.name] = [
            _stage_text(s, f"{field}.stages[{i}]") for i, s in enumerate(base.stages)
        ]
        for i, spec in enumerate(base.stages):
            stage_dirs[spec.name] = _stage_output_dir(spec, f"{field}.stages[{i}]")
        if base.stages[-1].command != "fit":
            raise bad_value(
                f"{field}.stages[{len(base.stages) - 1}].command",
                base.stages[-1].command,
                "'fit': a baseline's last stage is evaluated",
            )
        if base.repair_fragment is not None:
            baseline_texts[base.name].append(_read(base.repair_fragment, f"{field}.repair_fragment"))
            check_alpha(base.repair_alpha, f"{field}.repair_alpha")

    _validate_configs(stages, repair, evaluation, baselines)

    inputs = {
        "stages": [c for s in stages for c in s.configs],
        "repair.config": repair.config,
        "repair.methods": list(repair.methods.values()),
        "evaluation": evaluation,
        "baselines": [c for b in baselines for s in b.stages for c in s.configs],
    }
    for name, directory in stage_dirs.items():
        if overlap(output_dir, directory) in ("is", "lies inside"):
            raise bad_value(
                "output_dir", output_dir, f"a directory outside stage {name}'s output {directory!r}"
            )
    # Resuming into its own (marked) directory is the pipeline's normal use, so no flag is needed;
    # an unmarked non-empty directory is refused. Held until the report is written.
    lock = claim_output_dir(output_dir, "output_dir", overwrite=True, inputs=inputs, replace=False)
    mark_output_dir(output_dir, "pipeline")

    console = _console()
    out = Path(output_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # Steps served from an earlier run, with the seconds that run recorded (None if unknown).
    reused: dict[str, float | None] = {}

    def reuse(step: str, seconds: float | None) -> None:
        reused[step] = seconds

    # 1. Training stages.
    def run_stage(spec: StageSpec, text: str, upstream: str, label: str) -> str:
        key = _key(upstream, text, *spec.overrides)
        directory = stage_dirs[spec.name]
        if not force and _is_done(directory, key):
            console.print(f"[green]{label} {spec.name}: reusing {directory}")
            reuse(f"stage/{spec.name}", _done_seconds(directory))
            return key
        console.print(f"[bold]{label} {spec.name}: training -> {directory}")
        t0 = time.perf_counter()
        _run_command(spec)
        timings[f"stage/{spec.name}"] = time.perf_counter() - t0
        _mark_done(directory, key, timings[f"stage/{spec.name}"])
        return key

    upstream = ""
    for i, spec in enumerate(stages):
        upstream = run_stage(spec, texts[f"stages[{i}].config"], upstream, f"stage {i + 1}/{len(stages)}")
    finetuned = stage_dirs[stages[-1].name]

    # 2. One scoring pass per method, through its callback.
    score_keys = {}
    for method, fragment in repair.methods.items():
        directory = out / "scores" / method
        extra = [*repair.overrides, *repair.method_overrides.get(method, [])]
        # With no extra arguments the key is the same as before they existed (caches stay valid).
        key = _key(upstream, repair_text, fragments[method], str(alphas[0]), *extra)
        score_keys[method] = key
        if not force and _is_done(directory, key):
            console.print(f"[green]scores {method}: reusing {directory}")
            reuse(f"scores/{method}", _done_seconds(directory))
            continue
        console.print(f"[bold]scores {method}: scoring {finetuned} once")
        t0 = time.perf_counter()
        _fit(
            [repair.config, fragment],
            [
                *extra,
                "--pruner.init_args.save_scores=true",
                f"--pruner.init_args.alpha={alphas[0]}",
                f"--model.init_args.output_dir={directory}",
                OVERWRITE_STAGE,
                "--trainer.enable_progress_bar=false",
            ],
        )
        timings[f"scores/{method}"] = time.perf_counter() - t0
        if not (directory / "scores.safetensors").is_file():
            raise ConfigError(
                f"repair.methods.{method}={fragment!r} saved no scores; use a score-based callback."
            )
        _mark_done(directory, key, timings[f"scores/{method}"])

    # 3. Evaluation: references, the unrepaired model, every (method, alpha).
    rows: list[dict[str, Any]] = []
    results_dir = out / "results"

    def cached(name: str, key: str, compute) -> dict[str, Any]:
        path = results_dir / name / "result.json"
        if not force and path.is_file():
            saved = read_json_file(path, "a cached pipeline result")
            if saved.get("key") == key:
                reuse(f"eval/{name}", saved.get("seconds"))
                return saved["result"]
        t0 = time.perf_counter()
        result = compute(results_dir / name)
        timings[f"eval/{name}"] = time.perf_counter() - t0
        atomic_write_json(path, {"key": key, "result": result, "seconds": timings[f"eval/{name}"]})
        return result

    for name in references:
        row = _stage_row(
            name, stage_dirs[name], _done_key(stage_dirs[name]), cached, evaluation, eval_text, console
        )
        rows.append({**row, "reference": True})

    evaluator, datamodule, trainer = _evaluator(evaluation, finetuned, merge=False)
    peft_model = evaluator.model
    original = {n: p.detach().clone() for n, p in peft_model.named_parameters()}

    def restore() -> None:
        import torch

        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                p.copy_(original[n])

    # Keys of results computed on the fine-tuned weights also cover those files.
    upstream_files = stage_fingerprint(finetuned)
    key_none = _key(upstream, eval_text, "none", upstream_files)
    console.print("[bold]evaluate none (unrepaired)")
    rows.append(
        {
            "method": "none",
            "alpha": 0.0,
            "removed_fraction": 0.0,
            **cached("none", key_none, lambda d: _evaluate(evaluator, datamodule, trainer, d)),
        }
    )
    for method in repair.methods:
        directory = out / "scores" / method
        meta = read_report(directory)
        targets = find_targets(peft_model, meta["target"], meta["adapter_name"], meta["include"])
        # Checked against the fine-tuned adapter they are swept on (fingerprint, names, shapes).
        saved, _ = read_scores(directory, {n: t.param for n, t in targets.items()})
        # Scores are saved in each parameter's layout; the same transposition maps them back to rows.
        scores = to_param_layout(saved, targets)
        sweep = masks_for_alphas(scores, alphas, meta["scope"])
        # The key covers the artefacts read, so edited scores or masks are never served from cache.
        artefacts = artifacts_fingerprint(directory)
        for alpha, masks in sweep.items():
            key = _key(score_keys[method], eval_text, str(alpha), artefacts, upstream_files)

            def compute(d, masks=masks, targets=targets):
                apply_target_masks_(targets, to_param_layout(masks, targets))
                try:
                    return _evaluate(evaluator, datamodule, trainer, d)
                finally:
                    restore()

            console.print(f"[bold]evaluate {method} alpha={alpha}")
            result = cached(f"{method}_a{alpha:g}", key, compute)
            rows.append(
                {"method": method, "alpha": alpha, "removed_fraction": overall_fraction(masks), **result}
            )

    # 4. Baseline defenses (and combined defenses): their own stages, one row each.
    for base in baselines:
        key = upstream
        for spec, text in zip(base.stages, baseline_texts[base.name]):
            key = run_stage(spec, text, key, f"baseline {base.name}")
        final = stage_dirs[base.stages[-1].name]
        rows.append(_stage_row(base.name, final, key, cached, evaluation, eval_text, console))
        if base.repair_fragment is None:
            continue
        combined = f"{base.name}+{Path(base.repair_fragment).stem}"
        directory = out / "combined" / combined
        repair_key = _key(key, repair_text, baseline_texts[base.name][-1], str(base.repair_alpha))
        if not force and _is_done(directory, repair_key):
            reuse(f"stage/{combined}", _done_seconds(directory))
        else:
            meta = read_stage_metadata(final, f"baselines.{base.name}")
            console.print(f"[bold]baseline {combined}: repairing {final}")
            t0 = time.perf_counter()
            _fit(
                [repair.config, base.repair_fragment],
                [
                    f"--model.init_args.model_name_or_path={meta['base_model']}",
                    f"--model.init_args.adapter_path={final}",
                    f"--data.init_args.tokenizer={meta['base_model']}",
                    f"--pruner.init_args.alpha={base.repair_alpha}",
                    f"--model.init_args.output_dir={directory}",
                    OVERWRITE_STAGE,
                    "--trainer.enable_progress_bar=false",
                ],
            )
            timings[f"stage/{combined}"] = time.perf_counter() - t0
            _mark_done(directory, repair_key, timings[f"stage/{combined}"])
        row = _stage_row(combined, str(directory), repair_key, cached, evaluation, eval_text, console)
        removed = read_report(directory)["removed_fraction"]
        rows.append({**row, "alpha": base.repair_alpha, "removed_fraction": removed})

    report = {
        "rows": rows,
        "alphas": alphas,
        "methods": list(repair.methods),
        "stages": stage_dirs,
        # A resumed run reports the whole experiment: this run's wall time plus the recorded
        # seconds of the steps it reused (which an earlier run computed).
        "seconds_this_run": time.perf_counter() - started,
        "seconds_total": time.perf_counter() - started + sum(v for v in reused.values() if v is not None),
        "seconds_by_step": timings,
        "seconds_reused_by_step": reused,
    }
    write_report(report, out)
    lock.release()
    console.print(f"[green]report written to {out / 'report.md'} ({report['seconds_total']:.0f} s)")
    return report


def _stage_row(name, directory, stage_key, cached, evaluation, eval_text, console) -> dict[str, Any]:
    """Evaluates a stage output directory (merged), cached by the stage's key and the eval config."""

    def compute(d):
        return _evaluate(*_evaluator(evaluation, directory, merge=True), d)

    console.print(f"[bold]evaluate {name}")
    key = _key(stage_key, eval_text, name, stage_fingerprint(directory))
    return {"method": name, "alpha": None, **cached(f"ref_{name}", key, compute)}


def stage_fingerprint(directory: str | Path) -> str:
    """Identity of the files an evaluation reads from a stage output (weights, metadata, masks)."""
    return directory_fingerprint(directory, STAGE_FILES)


def _done_key(directory: str) -> str:
    marker = Path(directory) / DONE_FILE
    return json.loads(marker.read_text()).get("key", "") if marker.is_file() else ""


def _fmt(value: float | None, n: int | None = None) -> str:
    """A rate in percent, with its Wilson 95% interval when the count ``n`` behind it is known."""
    if value is None:
        return "n/a"
    ci = rate_interval(value, n)
    return f"{value:.1f}" if ci is None else f"{value:.1f} ({ci[0]:.1f}-{ci[1]:.1f})"


def report_markdown(report: dict[str, Any]) -> str:
    """The report table: one row per reference, the unrepaired model and every (method, alpha)."""
    # Extra judges (StageEvaluator.extra_judges) get one HS column each; none for a single judge.
    extra = extra_judge_names(report["rows"])
    lines = [
        "| variant | alpha | removed % | HS % | "
        + "".join(f"HS {name} % | " for name in extra)
        + "FA % | coherent % | harmful prompts | task questions |",
        "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|---|",
    ]
    for r in report["rows"]:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        removed = "-" if r.get("removed_fraction") is None else f"{100 * r['removed_fraction']:.1f}"
        n_hs, n_fa = r.get("n_harmful_score", 0), r.get("n_finetune_accuracy", 0)
        lines.append(
            f"| {r['method']} | {alpha} | {removed} | {_fmt(r.get('harmful_score'), n_hs)} | "
            + "".join(f"{_fmt(r.get(f'harmful_score/{name}'), n_hs)} | " for name in extra)
            + f"{_fmt(r.get('finetune_accuracy'), n_fa)} | {_fmt(r.get('coherent_rate'), n_hs)} | "
            f"{n_hs} | {n_fa} |"
        )
    return "\n".join(lines) + "\n"


def _error_bars(points: list[dict[str, Any]], key: str, n_key: str) -> list[list[float]]:
    """Matplotlib's ``[[below], [above]]`` distances to each point's Wilson 95% interval."""
    below, above = [], []
    for p in points:
        ci = rate_interval(p.get(key), p.get(n_key))
        value = p.get(key) or 0.0
        # Clamped: at 0 or 100 % the bound equals the value up to float rounding (e.g. -5e-15).
        below.append(0.0 if ci is None else max(0.0, value - ci[0]))
        above.append(0.0 if ci is None else max(0.0, ci[1] - value))
    return [below, above]


def extra_judge_names(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the extra judges whose harmful scores the rows carry, in first-seen order."""
    prefix = "harmful_score/"
    names = (k[len(prefix) :] for r in rows for k in r if k.startswith(prefix))
    return list(dict.fromkeys(names))


def write_report(report: dict[str, Any], out: Path) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    header = (
        "# antidote_pl report\n\n"
        "HS: harmful score, % of held-out harmful prompts answered harmfully (lower is better). "
        "FA: fine-tune accuracy, % of held-out task questions answered correctly. "
        "Alpha: fraction of the fine-tuning LoRA's weights removed per row; removed %: realised. "
        "One run (one seed); in brackets the Wilson 95% interval over the n prompts of the last "
        "two columns.\n\n"
    )
    atomic_write_text(out / "report.md", header + report_markdown(report))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    none = next((r for r in report["rows"] if r["method"] == "none"), None)
    for method in report["methods"]:
        pts = [r for r in report["rows"] if r["method"] == method]
        if none is not None:
            pts = [none, *pts]
        ax.errorbar(
            [p["finetune_accuracy"] for p in pts],
            [p["harmful_score"] for p in pts],
            xerr=_error_bars(pts, "finetune_accuracy", "n_finetune_accuracy"),
            yerr=_error_bars(pts, "harmful_score", "n_harmful_score"),
            marker="o",
            capsize=2,
            label=method,
        )
    for r in report["rows"]:
        # References, baselines and combined defenses are single points, not sweeps.
        if r["method"] not in (*report["methods"], "none"):
            ax.scatter([r["finetune_accuracy"] or 0], [r["harmful_score"] or 0], marker="*", s=160, zorder=3)
            ax.annotate(
                r["method"],
                (r["finetune_accuracy"] or 0, r["harmful_score"] or 0),
                xytext=(5, 5),
                textcoords="offset points",
            )
    ax.set_xlabel("fine-tune accuracy FA (%)")
    ax.set_ylabel("harmful score HS (%)")
    ax.set_title("Repair trade-off per method (from the unrepaired model); bars: Wilson 95%")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "report.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
