"""The one-command experiment: train, repair with every method over an alpha sweep, evaluate, report.

::

    python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml [--force true]

:class:`Pipeline` is a recipe in six steps, each a method:

1. :meth:`~Pipeline.validate`: every config file the run will use is read and parsed, and every
   output checked, before any work.
2. :meth:`~Pipeline.train_stages`: each training stage (``fit`` with its config files, or
   ``tokenizer`` for a stage that trains a tokenizer), in order. A stage whose output directory
   already holds a finished result for the same configs (and the same upstream stages) is reused;
   ``--force true`` reruns everything.
3. :meth:`~Pipeline.score`: the fine-tuned model is repaired once per method, through the
   method's own callback fragment (``callbacks/*.yaml``) with every knob value of its sweep (the
   ``alphas`` of a pruning method as ``sweep_alphas``; a weight-editing method's ``values`` as
   ``sweep_values``): one run saves the result of every value.
4. :meth:`~Pipeline.sweep_and_evaluate`: the reference stages (e.g. aligned, fine-tuned), the
   unrepaired model and every (method, value), by applying the saved masks or edits
   (:func:`~antidote_pl.experiment.sweep.read_sweep`) to the adapter in memory and restoring it
   afterwards; then :meth:`~Pipeline.run_baselines` trains and evaluates the baseline defenses.
5. :meth:`~Pipeline.reattack` (with a ``durability:`` block): the same harmful fine-tuning
   continued from the unrepaired model and from chosen repairs, at one alpha or at each method's
   FA-budget choice (:mod:`antidote_pl.experiment.reattack`).
6. :meth:`~Pipeline.write_report`: ``report.json``, ``report.md`` (the table, then HS at an FA
   budget, judge agreement, mask overlaps and the re-attack: :mod:`antidote_pl.experiment.sections`),
   ``report.png`` (:mod:`antidote_pl.experiment.report`) and ``manifest.json``
   (:mod:`antidote_pl.experiment.manifest`).

Stages run through the Python API (:func:`antidote_pl.stages.cli.run_fit`,
:func:`antidote_pl.stages.tokenizer.run_tokenizer`) with dotted-key values. Every result is written
atomically and cached under ``output_dir`` (:mod:`antidote_pl.experiment.cache`), so an interrupted
run resumes from the last finished step and never reports a half-written result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from antidote_pl.errors import bad_value, check_number
from antidote_pl.experiment.budget import select_under_budget
from antidote_pl.experiment.cache import (
    ResultCache,
    RunInputs,
    StageOutput,
    StepTimes,
    cache_key,
    stage_fingerprint,
)
from antidote_pl.experiment.leaderboard import leaderboard, leaderboard_markdown
from antidote_pl.experiment.manifest import (
    write_manifest,
)
from antidote_pl.experiment.reattack import check_checkpoints, reattack_from_configs
from antidote_pl.experiment.report import write_report
from antidote_pl.experiment.run_record import run_manifest
from antidote_pl.experiment.sections import (
    agreement_section,
    budget_section,
    durability_section,
    focus_alpha,
    mask_section,
    variant_name,
)
from antidote_pl.experiment.specs import (
    BaselineSpec,
    DurabilitySpec,
    RepairSpec,
    StageSpec,
    check_last_is_fit,
    check_method_kind,
    config_list,
    config_text,
    read_config,
    run_inputs,
    stage_output_dir,
    stage_text,
)
from antidote_pl.experiment.sweep import AdapterSweep, evaluate_stage, read_sweep
from antidote_pl.pruning.artifacts import RepairArtifacts
from antidote_pl.pruning.select import check_alpha
from antidote_pl.stages.cli import run_fit, validate_config
from antidote_pl.stages.tokenizer import parse_tokenizer_config, run_tokenizer
from antidote_pl.utils.console import say
from antidote_pl.utils.io import claim_output_dir, mark_output_dir, overlap

#: What the pipeline sets on its own stage runs: they write only directories this pipeline owns
#: (its stage and score outputs), so replacing an earlier result there is allowed; an unmarked
#: directory is still never replaced.
OVERWRITE = {"model.init_args.overwrite": True}
#: Scoring and repair runs print no progress bar (there is no training to follow).
QUIET = {"trainer.enable_progress_bar": False}
_key = cache_key


def _run_command(spec: StageSpec) -> None:
    """Runs one training stage through the Python API."""
    if spec.command == "tokenizer":
        run_tokenizer(spec.configs, spec.overrides, {"overwrite": True})
    else:
        run_fit(spec.configs, OVERWRITE, args=spec.overrides)


def _validate_stage(spec: StageSpec) -> Any:
    """Parses a stage's configs as its command will (a model stage's cheap parts built too)."""
    if spec.command == "tokenizer":
        return parse_tokenizer_config(spec.configs, spec.overrides)
    return validate_config(spec.configs, spec.overrides)


# --------------------------------------------------------------------------- the recipe
class Pipeline:
    """The experiment as a recipe: validate, train stages, score, sweep and evaluate, baselines, report.

    Args:
        stages: Training stages in order; the last one is the fine-tuned model that gets repaired.
        repair: The repair config, alphas and methods.
        evaluation: Config for ``python -m antidote_pl test`` (StageEvaluator + EvalDataModule), or a
            list of files composed in order (e.g. the eval config, a judge and a precision fragment).
        output_dir: Where scores, per-variant results and the report go.
        references: Stage names evaluated as reference rows (default: every stage but the first).
        force: Rerun everything, ignoring finished results.
        baselines: Baseline defenses trained after the main stages, one report row each (plus a
            combined row when a baseline is also repaired).
    """

    def __init__(
        self,
        stages: list[StageSpec],
        repair: RepairSpec,
        evaluation: str | list[str],
        output_dir: str,
        references: list[str] | None = None,
        force: bool = False,
        baselines: list[BaselineSpec] | None = None,
        durability: DurabilitySpec | None = None,
    ) -> None:
        self.stages, self.repair, self.evaluation = stages, repair, evaluation
        self.durability = durability
        self.output_dir, self.out, self.force = output_dir, Path(output_dir), force
        self.references = references
        self.baselines = list(baselines or [])
        self.times = StepTimes()
        self.rows: list[dict[str, Any]] = []
        self.upstream = ""  # the key of the last main stage, once trained
        self.score_keys: dict[str, str] = {}
        self.finetuned_files = ""  # fingerprint of the fine-tuned stage's files, once evaluated
        self.masks: dict[tuple[str, float], dict[str, torch.Tensor]] = {}  # (method, alpha) -> masks
        self.primary_judge = "primary"  # the evaluator's judge class, once built
        self.curves: dict[str, Any] = {}  # re-attack curves, when configured
        self.stage_seeds: dict[str, Any] = {}  # model stage -> its seeds, once validated
        self.sweep_model: torch.nn.Module | None = None  # the evaluated fine-tuned model, once loaded

    def run(self) -> dict[str, Any]:
        """Runs every step and writes the report; see the module docstring.

        Returns:
            The report as a dict (also written to ``report.json``).

        Raises:
            ConfigError: before any work, for a missing config file, a bad alpha or knob value, an
                unknown reference, or an ``output_dir`` that may not be written.
        """
        self.validate()
        # Resuming into its own (marked) directory is the pipeline's normal use, so no flag is
        # needed; an unmarked non-empty directory is refused. Held until the report is written.
        lock = claim_output_dir(
            self.output_dir, "output_dir", overwrite=True, inputs=self.inputs(), replace=False
        )
        mark_output_dir(self.output_dir, "pipeline")
        self.times = StepTimes()
        self.fingerprints = RunInputs()  # what each step reads, hashed once per run, part of its key
        self.results = ResultCache(
            self.out / "results", self.times, self.force, self.fingerprints.evaluation(self.evaluation)
        )
        try:
            self.train_stages()
            self.score()
            self.sweep_and_evaluate()
            self.run_baselines()
            self.reattack()
            return self.write_report()
        finally:
            lock.release()

    # ------------------------------------------------------------------ 1. validate
    def validate(self) -> None:
        """Reads every config, checks names, alphas and outputs, and parses every config as its
        step will, before the first step runs: a typo in a late step (a method fragment, the
        judge's ``class_path``, a baseline) fails now rather than after an hour of training."""
        self._read_main()
        self._check_references()
        self.baseline_texts = {
            base.name: self._read_baseline(b, base) for b, base in enumerate(self.baselines)
        }
        self._parse_configs()
        self._check_durability()
        for name, directory in self.stage_dirs.items():
            if overlap(self.output_dir, directory) in ("is", "lies inside"):
                raise bad_value(
                    "output_dir", self.output_dir, f"a directory outside stage {name}'s output {directory!r}"
                )

    def _read_main(self) -> None:
        if not self.stages:
            raise bad_value("stages", self.stages, "at least one training stage")
        self.stage_texts = [stage_text(s, f"stages[{i}]") for i, s in enumerate(self.stages)]
        self.repair_text = config_text(self.repair.config, "repair.config")
        self.eval_text = config_text(self.evaluation, "evaluation")
        self.fragment_texts = {
            m: read_config(f, f"repair.methods.{m}") for m, f in self.repair.methods.items()
        }
        if not self.repair.methods:
            raise bad_value("repair.methods", self.repair.methods, "at least one method -> callback fragment")
        self.alphas = sorted({check_alpha(a, "repair.alphas") for a in self.repair.alphas})
        if not self.alphas:
            raise bad_value("repair.alphas", self.repair.alphas, "at least one alpha in (0, 1)")
        for method, values in self.repair.values.items():
            if method not in self.repair.methods:
                raise bad_value(
                    "repair.values", method, f"a method of repair.methods {list(self.repair.methods)}"
                )
            if not isinstance(values, list) or not values:
                raise bad_value(f"repair.values.{method}", values, "a non-empty list of knob values")

    def _check_references(self) -> None:
        names = [s.name for s in self.stages]
        self.references = names[1:] if self.references is None else self.references
        unknown = [r for r in self.references if r not in names]
        if unknown:
            raise bad_value("references", unknown, f"stage names from {names}")
        check_last_is_fit(self.stages, "stages", "the last stage is repaired")
        models = [s.name for s in self.stages if s.command == "fit"]
        not_models = [r for r in self.references if r not in models]
        if not_models:
            raise bad_value("references", not_models, f"names of fit stages (models) from {models}")

    def _read_baseline(self, b: int, base: BaselineSpec) -> list[str]:
        """The baseline's stage texts (and its repair fragment's)."""
        field = f"baselines[{b}]"
        if not base.stages:
            raise bad_value(f"{field}.stages", base.stages, "at least one stage")
        texts = [stage_text(s, f"{field}.stages[{i}]") for i, s in enumerate(base.stages)]
        check_last_is_fit(base.stages, f"{field}.stages", "a baseline's last stage is evaluated")
        if base.repair_fragment is not None:
            texts.append(read_config(base.repair_fragment, f"{field}.repair_fragment"))
            check_alpha(base.repair_alpha, f"{field}.repair_alpha")
        return texts

    def _parse_configs(self) -> None:
        """Parses every config the run will use, as its step will; nothing is loaded."""
        # Each stage's output directory and each model stage's seeds (for the manifest), as parsed.
        self.stage_dirs, self.stage_seeds = {}, {}
        for field, spec in self._stage_fields():
            cfg = _validate_stage(spec)
            self.stage_dirs[spec.name] = stage_output_dir(spec, field, cfg)
            if spec.command == "fit":
                self.stage_seeds[spec.name] = {
                    "seed_everything": cfg.get("seed_everything"),
                    "data": cfg.get("data.init_args.seed"),
                }
        for method, fragment in self.repair.methods.items():
            configs, args = [*self.repair.configs, fragment], self.repair.args(method)
            check_method_kind(method, configs, method in self.repair.values, args)
            values = self._score_values(self.out / "scores" / method, method)
            validate_config(configs, args, values)
        for base in self.baselines:
            if base.repair_fragment is not None:
                validate_config([*self.repair.configs, base.repair_fragment])
        validate_config(config_list(self.evaluation))

    def _check_durability(self) -> None:
        d = self.durability
        if d is None:
            return
        check_checkpoints(d.checkpoints)
        if d.from_budget is not None:
            check_number("durability.from_budget", d.from_budget, low=0.0)
        unknown = [m for m in d.budget_methods or () if m not in self.repair.methods]
        if unknown:
            raise bad_value("durability.budget_methods", unknown, f"methods from {list(self.repair.methods)}")
        if d.methods and d.alpha not in self.alphas:
            raise bad_value("durability.alpha", d.alpha, f"one of repair.alphas {self.alphas}")
        unknown = [m for m in d.methods if m not in self.repair.methods]
        if unknown:
            raise bad_value("durability.methods", unknown, f"repair methods from {list(self.repair.methods)}")

    def inputs(self) -> dict[str, Any]:
        """The run's config files, which ``output_dir`` must stay apart from."""
        return run_inputs(self.stages, self.repair, self.evaluation, self.baselines)

    # ------------------------------------------------------------------ 2. train stages
    def train_stages(self) -> None:
        """Trains (or reuses) every main stage, in order; each key chains its upstream's."""
        for i, (spec, text) in enumerate(zip(self.stages, self.stage_texts)):
            self.upstream = self._run_stage(spec, text, self.upstream, f"stage {i + 1}/{len(self.stages)}")

    def _run_stage(self, spec: StageSpec, text: str, upstream: str, label: str) -> str:
        key = _key(upstream, text, *spec.overrides, self.fingerprints.stage(spec))
        directory = self.stage_dirs[spec.name]
        if self._reused(StageOutput(Path(directory)), key, f"stage/{spec.name}"):
            say(f"{label} {spec.name}: reusing {directory}")
            return key
        say(f"{label} {spec.name}: training -> {directory}")
        self._timed_step(StageOutput(Path(directory)), key, f"stage/{spec.name}", _run_command, spec)
        return key

    def _reused(self, output: StageOutput, key: str, step: str) -> bool:
        """Whether ``step`` finished earlier with ``key`` (and records its seconds if so)."""
        if self.force or not output.is_done(key):
            return False
        self.times.reuse(step, output.done_seconds())
        return True

    def _timed_step(self, output: StageOutput, key: str, step: str, fn, *args) -> None:
        with self.times.timed(step):
            fn(*args)
        output.mark_done(key, self.times.ran[step])

    def _stage_fields(self) -> list[tuple[str, StageSpec]]:
        """Every stage (main, then baselines') with its place in the pipeline config."""
        main = [(f"stages[{i}]", s) for i, s in enumerate(self.stages)]
        return main + [
            (f"baselines[{b}].stages[{i}]", s)
            for b, base in enumerate(self.baselines)
            for i, s in enumerate(base.stages)
        ]

    @property
    def all_stages(self) -> list[StageSpec]:
        """The main stages, then every baseline's stages."""
        return [*self.stages, *(s for b in self.baselines for s in b.stages)]

    @property
    def finetuned(self) -> str:
        """The output directory of the last main stage (the model that gets repaired)."""
        return self.stage_dirs[self.stages[-1].name]

    # ------------------------------------------------------------------ 3. score
    def score(self) -> None:
        """One scoring pass per method, through its callback, on the fine-tuned model."""
        for method, fragment in self.repair.methods.items():
            self.score_keys[method] = self._score_method(method, fragment)

    def _score_values(self, directory: Path, method: str) -> dict[str, Any]:
        """What a method's one repair run sets: its first knob value applied, every value's result
        saved (a pruning method's masks and scores; a weight-editing method's edits)."""
        common = {"model.init_args.output_dir": str(directory), **OVERWRITE, **QUIET}
        if method in self.repair.values:
            values = self.repair.swept(method, self.alphas)
            return {"pruner.init_args.value": values[0], "pruner.init_args.sweep_values": values, **common}
        return {
            "pruner.init_args.alpha": self.alphas[0],
            "pruner.init_args.sweep_alphas": self.alphas,
            "pruner.init_args.save_scores": True,
            **common,
        }

    def _score_method(self, method: str, fragment: str) -> str:
        directory = self.out / "scores" / method
        extra = self.repair.args(method)
        sweep = ["sweep_alphas", *map(str, self.repair.swept(method, self.alphas))]
        reads = self.fingerprints.step([*self.repair.configs, fragment], extra, adapter=self.finetuned)
        key = _key(self.upstream, self.repair_text, self.fragment_texts[method], *sweep, *extra, reads)
        if self._reused(StageOutput(directory), key, f"scores/{method}"):
            say(f"scores {method}: reusing {directory}")
            return key
        say(f"scores {method}: scoring {self.finetuned} once")
        with self.times.timed(f"scores/{method}"):
            run_fit([*self.repair.configs, fragment], self._score_values(directory, method), args=extra)
        StageOutput(directory).mark_done(key, self.times.ran[f"scores/{method}"])
        return key

    # ------------------------------------------------------------------ 4. sweep and evaluate
    def sweep_and_evaluate(self) -> None:
        """Evaluates the references, the unrepaired model and every (method, alpha)."""
        for name in self.references:
            directory = self.stage_dirs[name]
            row = self._stage_row(name, directory, StageOutput(Path(directory)).done_key)
            self.rows.append({**row, "reference": True})
        sweep = AdapterSweep(self.evaluation, self.finetuned)
        self.sweep_model = sweep.model  # the re-attack checks its variants against these weights
        self.primary_judge = type(sweep.evaluator.judge).__name__
        # Keys of results computed on the fine-tuned weights also cover those files.
        self.finetuned_files = stage_fingerprint(self.finetuned)
        key = _key(self.upstream, self.eval_text, "none", self.finetuned_files)
        say("evaluate none (unrepaired)")
        result = self.results.get("none", key, sweep.evaluate)
        self.rows.append({"method": "none", "alpha": 0.0, "removed_fraction": 0.0, **result})
        for method in self.repair.methods:
            self._evaluate_method(sweep, method)

    def _evaluate_method(self, sweep: AdapterSweep, method: str) -> None:
        values = self.repair.swept(method, self.alphas)
        saved = read_sweep(self.out / "scores" / method, sweep.model, values, f"repair.methods.{method}")
        for value in values:
            tensors = saved.tensors(value)
            # The key covers the artefacts read, so edited masks or edits are never served from cache.
            key = _key(
                self.score_keys[method], self.eval_text, str(value), saved.fingerprint, self.finetuned_files
            )
            say(f"evaluate {method} {saved.report.get('knob', 'alpha')}={value:g}")
            result = self.results.get(
                f"{method}_a{value:g}", key, lambda d, t=tensors: saved.evaluate(sweep, t, d)
            )
            if saved.kind == "prune" and self._keeps_masks(method, value):
                self.masks[(method, value)] = tensors
            row = {"method": method, "alpha": value, **saved.row(value, tensors)}
            self.rows.append({**row, **result})

    def _keeps_masks(self, method: str, alpha: float) -> bool:
        """Whether the mask analysis needs this mask after its evaluation (only those are held: a 7B
        model's ``linear`` masks are each the model's size; the re-attack reads its masks from disk)."""
        return alpha == focus_alpha(self.alphas) or method == next(iter(self.repair.methods))

    def _stage_row(self, name: str, directory: str | Path, stage_key: str) -> dict[str, Any]:
        """Evaluates a stage output directory (merged), cached by the stage's key and the eval config."""
        say(f"evaluate {name}")
        key = _key(stage_key, self.eval_text, name, stage_fingerprint(directory))
        result = self.results.get(
            f"ref_{name}", key, lambda d: evaluate_stage(self.evaluation, str(directory), d)
        )
        return {"method": name, "alpha": None, **result}

    # ------------------------------------------------------------------ 5. baselines
    def run_baselines(self) -> None:
        """Baseline defenses (and combined defenses): their own stages, one row each."""
        for base in self.baselines:
            key = self.upstream
            for spec, text in zip(base.stages, self.baseline_texts[base.name]):
                key = self._run_stage(spec, text, key, f"baseline {base.name}")
            final = self.stage_dirs[base.stages[-1].name]
            self.rows.append(self._stage_row(base.name, final, key))
            if base.repair_fragment is not None:
                self.rows.append(self._combined_row(base, final, key))

    def _combined_row(self, base: BaselineSpec, final: str, key: str) -> dict[str, Any]:
        """Repairs a baseline's last stage with its fragment (once) and evaluates it."""
        combined = base.combined_name
        directory = self.out / "combined" / combined
        reads = self.fingerprints.step([*self.repair.configs, base.repair_fragment], adapter=final)
        repair_key = _key(
            key, self.repair_text, self.baseline_texts[base.name][-1], str(base.repair_alpha), reads
        )
        if not self._reused(StageOutput(directory), repair_key, f"stage/{combined}"):
            say(f"baseline {combined}: repairing {final}")
            values = self._combined_values(base, final, directory)
            self._timed_step(
                StageOutput(directory),
                repair_key,
                f"stage/{combined}",
                run_fit,
                [*self.repair.configs, base.repair_fragment],
                values,
            )
        row = self._stage_row(combined, directory, repair_key)
        removed = RepairArtifacts.read(directory).report["removed_fraction"]
        return {**row, "alpha": base.repair_alpha, "removed_fraction": removed}

    def _combined_values(self, base: BaselineSpec, final: str, directory: Path) -> dict[str, Any]:
        base_model = StageOutput(Path(final)).metadata(f"baselines.{base.name}")["base_model"]
        return {
            "model.init_args.model_name_or_path": base_model,
            "model.init_args.adapter_path": final,
            # Set with the model: a value linked from the config's own model would disagree.
            "data.init_args.tokenizer": base_model,
            "pruner.init_args.alpha": base.repair_alpha,
            "model.init_args.output_dir": str(directory),
            **OVERWRITE,
            **QUIET,
        }

    # ------------------------------------------------------------------ 6. durability
    def reattack(self) -> None:
        """Re-attacks the unrepaired model and each chosen repair (cached like any result)."""
        d = self.durability
        if d is None:
            return
        steps = [str(c) for c in check_checkpoints(d.checkpoints)]
        chosen = self._reattack_choices(d)
        scored = [f"{m}={v!r}:{self.score_keys[m]}" for m, v in chosen]
        key = _key(self.upstream, self.eval_text, self.finetuned_files, *steps, *scored)
        who = ", ".join(["none", *(variant_name(m, v) for m, v in chosen)])
        say(f"re-attack {who} to step {steps[-1]}")
        self.curves = self.results.get("reattack", key, lambda _dir: self._reattack_curves(d, chosen))

    def _reattack_choices(self, d: DurabilitySpec) -> list[tuple[str, float]]:
        """The (method, knob value) pairs re-attacked: ``methods`` at ``alpha``, then, with
        ``from_budget``, each of ``budget_methods`` at its FA-budget choice (pairs once each)."""
        pairs = [(m, d.alpha) for m in d.methods]
        if d.from_budget is not None:
            methods = d.budget_methods or list(self.repair.methods)
            picks = select_under_budget(self.rows, d.from_budget, methods=methods)
            pairs += [(p["method"], p["alpha"]) for p in picks if p["alpha"] is not None]
        return list(dict.fromkeys(pairs))

    def _reattack_curves(self, d: DurabilitySpec, chosen: list[tuple[str, float]]) -> dict[str, Any]:
        variants: dict[str, Any] = {"none": (None, None)}
        # Step 0 is the repaired model itself: its sweep row (same evaluation config) is reused.
        evaluated = {"none": self._sweep_result("none", 0.0)}
        for method, value in chosen:
            directory = self.out / "scores" / method
            saved = read_sweep(directory, self.sweep_model, [value], f"durability.{method}")
            name = variant_name(method, value)
            variants[name] = (saved.tensors(value), saved.report)
            evaluated[name] = self._sweep_result(method, value)
        stage = self.stages[-1]
        return reattack_from_configs(
            stage.configs,
            self.evaluation,
            self.finetuned,
            variants,
            d.checkpoints,
            overrides=stage.overrides,
            evaluated={name: row for name, row in evaluated.items() if row is not None},
        )

    def _sweep_result(self, method: str, alpha: float) -> dict[str, Any] | None:
        """The sweep's evaluator results for ``method`` at ``alpha`` (without the report's own keys)."""
        own = ("method", "alpha", "removed_fraction", "knob", "neutral", "relative_change")
        rows = (
            r for r in self.rows if r["method"] == method and r["alpha"] == alpha and not r.get("reference")
        )
        return next(({k: v for k, v in r.items() if k not in own} for r in rows), None)

    # ------------------------------------------------------------------ 7. report
    def analyse(self) -> tuple[dict[str, Any], list[str]]:
        """The report's analysis (JSON) and sections (markdown): FA budget, judges, masks, durability."""
        methods = list(self.repair.methods)
        budget, budget_md = budget_section(self.rows, methods, self.out / "results")
        swept = [f"{m}_a{a:g}" for m in methods for a in self.repair.swept(m, self.alphas)]
        names = [*(f"ref_{r}" for r in self.references), "none", *swept]
        pairs, agreement_md = agreement_section(self.out / "results", names, self.primary_judge)
        pruning = [m for m in methods if m not in self.repair.values]
        masks, masks_md = mask_section(self.masks, pruning, self.alphas, self.out)
        analysis = {"fa_budget": budget, "judge_agreement": pairs, "masks": masks, "reattack": self.curves}
        seed = self.stage_seeds.get(self.stages[-1].name, {}).get("seed_everything")
        durability_md = durability_section(self.curves, self.out, seed)
        run = {"rows": self.rows, "methods": methods, "analysis": analysis}
        analysis["leaderboard"] = leaderboard({seed: run})
        board_md = leaderboard_markdown(analysis["leaderboard"], self.primary_judge)
        sections = [budget_md, board_md, agreement_md, masks_md, durability_md]
        return analysis, [s for s in sections if s]

    def manifest(self) -> dict[str, Any]:
        """The run's reproducibility manifest (:func:`~antidote_pl.experiment.run_record.run_manifest`)."""
        return run_manifest(self)

    def write_report(self) -> dict[str, Any]:
        """Writes ``report.{json,md,png}`` and ``manifest.json`` under ``output_dir``; returns the report."""
        analysis, sections = self.analyse()
        report = {
            "rows": self.rows,
            "alphas": self.alphas,
            "values": self.repair.values,
            "methods": list(self.repair.methods),
            "stages": self.stage_dirs,
            "analysis": analysis,
            "primary_judge": self.primary_judge,
            **self.times.summary(),
        }
        write_manifest(self.manifest(), self.out)
        write_report(report, self.out, sections)
        say(f"report written to {self.out / 'report.md'} ({report['seconds_total']:.0f} s)")
        return report


def run_pipeline(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Runs the whole experiment and writes the report: ``Pipeline(*args, **kwargs).run()``, with
    :class:`Pipeline`'s arguments."""
    return Pipeline(*args, **kwargs).run()
