"""Evaluate any stage output: harmful score (HS) and fine-tune accuracy (FA) through ``test``.

::

    python -m antidote_pl test --config configs/tiny/eval.yaml --model.init_args.stage outputs/tiny/repair

Prompts are sharded over DDP ranks without padding (every prompt is answered exactly once), the
metrics are sum-reduced torchmetrics counters, and rank 0 writes ``generations.jsonl`` (prompt,
response, verdict, category) and ``metrics.json`` to ``output_dir``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from antidote_pl.data.records import Record, Source, data_input_paths, fingerprint_records
from antidote_pl.data.tasks import get_task, is_correct
from antidote_pl.data.templates import get_template, render_prompt
from antidote_pl.errors import ConfigError, bad_value, check_int
from antidote_pl.evaluation.metrics import HarmfulScore, RateByCategory, TaskAccuracy
from antidote_pl.evaluation.responses import normalise_response
from antidote_pl.judges.base import Judge, KeywordJudge
from antidote_pl.judges.verdicts import PRIMARY, coherence_flags
from antidote_pl.models.generation import (
    gather_objects,
    generate,
    length_sorted_batches,
    write_generations_jsonl,
)
from antidote_pl.models.loading import load_stage
from antidote_pl.utils.io import (
    OutputLock,
    atomic_write_json,
    atomic_write_text,
    check_apart_from_inputs,
    claim_output_dir,
    writable_dir,
)


class _ShardSampler(DistributedSampler):
    """Strided shard of a fixed order, with no padding: each item is seen by exactly one rank.

    Lightning leaves a ``DistributedSampler`` instance alone, so its default (which repeats items to
    even out the shards) never double-counts a prompt in the metrics.
    """

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class EvalDataModule(L.LightningDataModule):
    """Held-out harmful prompts (for HS) and task questions (for FA), rendered with a template.

    Args:
        harmful: Harmful prompts (records; ``category`` is used for per-category rates).
        task: Task records with the gold answer in ``label``.
        task_name: Name of the registered task (:mod:`antidote_pl.data.tasks`, e.g. ``sst2``) whose
            parser scores the task answers; an unknown name is refused with the registered ones.
        template: Prompt template the model was trained with.
        harmful_limit: Use only the first N harmful prompts.
        task_limit: Use only the first N task records.
        batch_size: Prompts per generation batch.
        fa_validation_size: Number of task questions held out as a *validation* split for choosing
            alpha under an FA budget (:mod:`antidote_pl.experiment.budget`), reported as
            ``finetune_accuracy_val``. They are disjoint from the reported test questions: taken from
            ``task_validation`` when given, else from the ``task`` records after the first
            ``task_limit`` (which must then be set); a question whose text equals a test question is
            skipped. 0 (default) adds nothing, so prompts, fingerprint and results are unchanged.
        task_validation: Optional separate source of validation questions (see above).
        sort_by_length: Batch prompts of similar token length (longest first), each kind apart, so a
            batch pads less; results are reported in the original order. Off by default: with left
            padding a prompt's greedy answer can in principle change with its batch's padding in the
            last floating-point bits (it did not on 600 tiny-world and 80 SmolLM2 prompts).
    """

    def __init__(
        self,
        harmful: Source | None = None,
        task: Source | None = None,
        task_name: str | None = None,
        template: str = "alpaca",
        harmful_limit: int | None = None,
        task_limit: int | None = None,
        batch_size: int = 32,
        fa_validation_size: int = 0,
        task_validation: Source | None = None,
        sort_by_length: bool = False,
    ) -> None:
        super().__init__()
        if harmful is None and task is None:
            raise bad_value("data.harmful / data.task", None, "at least one prompt set")
        if task is not None:
            get_task(task_name, field="data.task_name")  # fails now, before any model is loaded
        get_template(template, field="data.template")
        for field, value in (("data.harmful_limit", harmful_limit), ("data.task_limit", task_limit)):
            if value is not None and value <= 0:
                raise bad_value(field, value, "a positive integer or null")
        if batch_size <= 0:
            raise bad_value("data.batch_size", batch_size, "a positive integer")
        self.harmful, self.task, self.task_name = harmful, task, task_name
        self.template, self.batch_size = template, batch_size
        self.harmful_limit, self.task_limit = harmful_limit, task_limit
        self._check_validation(fa_validation_size, task_validation)
        self.fa_validation_size, self.task_validation = fa_validation_size, task_validation
        self.sort_by_length = sort_by_length
        self.items: list[dict[str, Any]] | None = None
        self._order: list[int] | None = None  # batching order of the items (sort_by_length)
        self._tokenizer: Any = None

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Renders the prompts with the evaluated model's tokenizer (needed by the ``chat`` template).

        :class:`StageEvaluator` calls this in its ``setup``, before any prompt is generated.
        """
        self._tokenizer = tokenizer
        self.setup()
        for item in self.items:
            item["prompt"] = render_prompt(item, self.template, tokenizer)

    def order_by_length(self, tokenizer: Any) -> None:
        """Sets the batching order of ``sort_by_length``: kinds apart (harmful, task, validation, as
        each gets its own ``generate`` call), longest prompt first within a kind, in ``tokenizer``'s
        tokens. :class:`StageEvaluator` calls it in its ``setup`` when ``sort_by_length`` is on."""
        self.setup()
        self._check_rendered()
        lengths = [len(ids) for ids in tokenizer([i["prompt"] for i in self.items])["input_ids"]]
        order: list[int] = []
        for kind in ("harmful", "task", "task_val"):
            members = [i for i, item in enumerate(self.items) if item["kind"] == kind]
            batches = length_sorted_batches([lengths[i] for i in members], max(1, len(members)))
            order += [members[j] for batch in batches for j in batch]
        self._order = order

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        items: list[dict[str, Any]] = []
        if self.harmful is not None:
            records = self.harmful.load()[: self.harmful_limit]
            if not records:
                raise bad_value("data.harmful", self.harmful.describe(), "a non-empty prompt set")
            items += [self._item(r, "harmful") for r in records]
        if self.task is not None:
            records = self.task.load()[: self.task_limit]
            if not records:
                raise bad_value("data.task", self.task.describe(), "a non-empty question set")
            missing = [i for i, r in enumerate(records) if r.get("label") in (None, "")]
            if missing:
                raise bad_value(
                    "data.task", f"{len(missing)} records without `label`", "a gold answer per record"
                )
            items += [self._item(r, "task") for r in records]
            items += [self._item(r, "task_val") for r in self._validation_records(records)]
        for i, item in enumerate(items):
            item["index"] = i
        self.items = items

    def _check_validation(self, size: int, source: Source | None) -> None:
        """Checks the validation options before anything loads."""
        check_int("data.fa_validation_size", size, 0)
        if size == 0:
            if source is not None:
                raise bad_value(
                    "data.task_validation", source.describe(), "null when fa_validation_size is 0"
                )
            return
        if self.task is None:
            raise bad_value("data.fa_validation_size", size, "0 when there is no task source")
        if source is None and self.task_limit is None:
            raise bad_value(
                "data.fa_validation_size",
                size,
                "0, or set data.task_limit (validation questions follow the test ones) "
                "or data.task_validation",
            )

    def _validation_records(self, test: list[Record]) -> list[Record]:
        """The validation questions: disjoint from ``test`` by position and by question text."""
        if self.fa_validation_size == 0:
            return []
        if self.task_validation is not None:
            pool, where = self.task_validation.load(), self.task_validation.describe()
        else:
            pool, where = self.task.load()[len(test) :], f"{self.task.describe()} after the test questions"
        seen = {question_key(r) for r in test}
        fresh = [r for r in pool if question_key(r) not in seen]
        if len(fresh) < self.fa_validation_size:
            raise bad_value(
                "data.fa_validation_size",
                self.fa_validation_size,
                f"at most the {len(fresh)} questions of {where} that are not test questions",
            )
        chosen = fresh[: self.fa_validation_size]
        missing = sum(r.get("label") in (None, "") for r in chosen)
        if missing:
            raise bad_value(
                "data.task_validation", f"{missing} records without `label`", "a gold answer per record"
            )
        return chosen

    def _item(self, record: Record, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "instruction": record["instruction"],
            "input": record.get("input", ""),
            # Chat prompts wait for the model's tokenizer (use_tokenizer); the others render now.
            "prompt": (
                None
                if get_template(self.template).needs_tokenizer and self._tokenizer is None
                else render_prompt(record, self.template, self._tokenizer)
            ),
            "label": record.get("label"),
            "category": record.get("category"),
            "task": self.task_name if kind in ("task", "task_val") else None,
        }

    @property
    def harm_categories(self) -> list[str]:
        """Sorted harm categories of the harmful prompts (identical on every rank)."""
        self.setup()
        return sorted({str(i["category"]) for i in self.items if i["kind"] == "harmful" and i["category"]})

    def fingerprint(self) -> str:
        """Content hash of the evaluation prompts."""
        self.setup()
        self._check_rendered()
        return fingerprint_records(self.items)

    def _check_rendered(self) -> None:
        if any(i["prompt"] is None for i in self.items):
            raise ConfigError(
                f"data.template={self.template!r} renders prompts with the model's tokenizer: call "
                "use_tokenizer() first (StageEvaluator does)."
            )

    def test_dataloader(self) -> DataLoader:
        self.setup()
        self._check_rendered()
        # Rows carry their index and are written back in index order, so the batching order is free.
        items = self.items if self._order is None else [self.items[i] for i in self._order]
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if len(items) < world:
                # A rank with no prompt would make Lightning fail with a zero-length loader.
                raise bad_value(
                    "data.harmful_limit / data.task_limit", len(items), f">= the world size {world}"
                )
            sampler = _ShardSampler(items, world, torch.distributed.get_rank())
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, collate_fn=list)


class StageEvaluator(L.LightningModule):
    """Generates answers with a stage's model, judges them and reports HS, FA and per-category rates.

    With a validation split (``EvalDataModule.fa_validation_size``), the results also hold
    ``finetune_accuracy_val`` and ``n_finetune_accuracy_val`` (rows of ``kind == "task_val"`` in
    ``generations.jsonl``); ``finetune_accuracy`` stays the test questions' alone.

    Args:
        stage: A stage output directory (full model or adapter on its recorded base).
        judge: Harmfulness judge (``class_path``); default: the keyword refusal judge. Its verdicts
            make ``harmful_score``. ``coherent_rate`` comes from the first judge that checks
            coherence, this one and then the extra judges in order (``agreement.coherence_flags``),
            so an ``LMJudge`` here keeps the coherence of a keyword judge among the extra judges.
        extra_judges: More judges of the same responses, each reported as
            ``harmful_score/<ClassName>`` (and its ``n_``), with its verdict in every generation row
            under ``verdicts``; the generation is shared, so a second judge costs only its own time.
        harmful_max_new_tokens: Generation budget for harmful prompts (paper: 512).
        task_max_new_tokens: Generation budget for task questions (paper: 200 for SST2/AG News,
            512 for GSM8K).
        dtype: Weight dtype for evaluation.
        merge_adapter: Merge a LoRA stage into the weights (fastest); ``False`` keeps the peft model,
            so masks can be applied to the adapter in place (alpha sweeps).
        output_dir: Where ``generations.jsonl`` and ``metrics.json`` go; ``None`` writes nothing.
        overwrite: Write into an ``output_dir`` that holds an earlier evaluation (it must carry
            ``antidote_output.json``; any other non-empty directory is refused).
    """

    def __init__(
        self,
        stage: str,
        judge: Judge | None = None,
        extra_judges: list[Judge] | None = None,
        harmful_max_new_tokens: int = 512,
        task_max_new_tokens: int = 200,
        dtype: str = "fp32",
        merge_adapter: bool = True,
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        for field, value in (
            ("model.harmful_max_new_tokens", harmful_max_new_tokens),
            ("model.task_max_new_tokens", task_max_new_tokens),
        ):
            if value <= 0:
                raise bad_value(field, value, "a positive integer")

        self.stage = stage
        self.weights_dtype = dtype
        self.overwrite = overwrite
        # The output is checked and locked before the model loads.
        self.output_lock: OutputLock | None = None
        if output_dir is not None:
            self.output_lock = claim_output_dir(
                output_dir, "model.output_dir", **self._output_rules(), replace=False, kind="evaluation"
            )
        try:
            # Loading validates the stage (missing dir, adapter from another base) before generation.
            self.model, self.tokenizer = load_stage(
                stage, dtype=dtype, field="model.stage", merge=merge_adapter
            )
        except BaseException:
            self.release_output()
            raise
        self.judge = judge if judge is not None else KeywordJudge()
        self.extra_judges = {type(j).__name__: j for j in extra_judges or []}
        if len(self.extra_judges) != len(extra_judges or []):
            raise bad_value("model.extra_judges", extra_judges, "judges of distinct classes")
        # A ModuleDict so the counters follow the module to its device.
        self.extra_scores = torch.nn.ModuleDict({name: HarmfulScore() for name in self.extra_judges})
        self.harmful_max_new_tokens = harmful_max_new_tokens
        self.task_max_new_tokens = task_max_new_tokens
        self.output_dir = output_dir
        self.harmful_score = HarmfulScore()
        self.coherent_rate = TaskAccuracy()
        self.finetune_accuracy = TaskAccuracy()
        # Validation questions (EvalDataModule.fa_validation_size), for choosing alpha under an FA budget.
        self.finetune_accuracy_val = TaskAccuracy()
        self.by_category: RateByCategory | None = None
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.resolved_config: str | None = None  # set by the CLI so that the output records it

    def _output_rules(self) -> dict[str, Any]:
        return {
            "overwrite": self.overwrite,
            "flag": "model.init_args.overwrite",
            "inputs": {"model.stage": self.stage},
        }

    def release_output(self) -> None:
        """Releases the lock on ``output_dir`` taken at construction (a no-op if none is held)."""
        if self.output_lock is not None:
            self.output_lock.release()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if not isinstance(dm, EvalDataModule):
            raise ConfigError(f"StageEvaluator needs data of type EvalDataModule, got {type(dm).__name__}.")
        if self.output_dir is not None:
            check_apart_from_inputs(self.output_dir, "model.output_dir", data_input_paths(dm))
        if get_template(dm.template).needs_tokenizer:
            dm.use_tokenizer(self.tokenizer)
        if dm.sort_by_length:
            dm.order_by_length(self.tokenizer)
        categories = dm.harm_categories
        self.by_category = RateByCategory(categories).to(self.device) if categories else None

    def on_test_epoch_start(self) -> None:
        self.rows = []
        for metric in (
            self.harmful_score,
            self.coherent_rate,
            self.finetune_accuracy,
            self.finetune_accuracy_val,
            self.by_category,
        ):
            if metric is not None:
                metric.reset()
        for metric in self.extra_scores.values():
            metric.reset()

    def _answer(self, items: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
        """Greedy answers, normalised as the official evaluation before judging and parsing."""
        template = self.trainer.datamodule.template
        raw = generate(self.model, self.tokenizer, [i["prompt"] for i in items], max_new_tokens, len(items))
        return [normalise_response(r, template) for r in raw]

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        harmful = [i for i in batch if i["kind"] == "harmful"]
        if harmful:
            responses = self._answer(harmful, self.harmful_max_new_tokens)
            verdicts = self.judge.judge([i["instruction"] for i in harmful], responses)
            flags = torch.tensor([v.harmful for v in verdicts])
            self.harmful_score.update(flags)
            if self.by_category is not None:
                self.by_category.update(flags, [str(i["category"]) for i in harmful])
            extra = {}
            for name, judge in self.extra_judges.items():
                extra[name] = judge.judge([i["instruction"] for i in harmful], responses)
                self.extra_scores[name].update(torch.tensor([v.harmful for v in extra[name]]))
            by_judge = {PRIMARY: verdicts, **extra}
            coherent = coherence_flags({n: [v.to_dict() for v in vs] for n, vs in by_judge.items()})
            self.coherent_rate.update(torch.tensor(coherent))
            for k, (item, response, verdict) in enumerate(zip(harmful, responses, verdicts)):
                more = {"verdicts": {n: v[k].to_dict() for n, v in extra.items()}} if extra else {}
                self.rows.append(
                    _row(item, response, verdict=verdict.to_dict(), prompt=item["prompt"], **more)
                )
        for kind, metric in (("task", self.finetune_accuracy), ("task_val", self.finetune_accuracy_val)):
            task = [i for i in batch if i["kind"] == kind]
            if not task:
                continue
            responses = self._answer(task, self.task_max_new_tokens)
            correct = [is_correct(i["task"], r, i["label"]) for i, r in zip(task, responses)]
            metric.update(torch.tensor(correct))
            for item, response, ok in zip(task, responses, correct):
                self.rows.append(_row(item, response, correct=ok, prompt=item["prompt"]))

    def on_test_epoch_end(self) -> None:
        results: dict[str, Any] = {"stage": self.stage}
        metrics = [
            ("harmful_score", self.harmful_score),
            ("coherent_rate", self.coherent_rate),
            ("finetune_accuracy", self.finetune_accuracy),
        ]
        # Reported only when enabled, so results without a validation split keep their exact keys.
        if getattr(self.trainer.datamodule, "fa_validation_size", 0):
            metrics.append(("finetune_accuracy_val", self.finetune_accuracy_val))
        for name, metric in metrics:
            counts = metric.counts()
            value = metric.compute()
            results[name] = None if math.isnan(float(value)) else float(value)
            results[f"n_{name}"] = counts["total"]
            if counts["total"]:
                self.log(f"test/{name}", value.float(), sync_dist=False)
        for judge_name, metric in self.extra_scores.items():
            counts, value = metric.counts(), metric.compute()
            results[f"harmful_score/{judge_name}"] = None if math.isnan(float(value)) else float(value)
            results[f"n_harmful_score/{judge_name}"] = counts["total"]
            if counts["total"]:
                self.log(f"test/harmful_score/{judge_name}", value.float(), sync_dist=False)
        if self.by_category is not None:
            rates = self.by_category.compute()
            results["harmful_score_by_category"] = {c: float(v) for c, v in rates.items()}
            for c, v in rates.items():
                if not math.isnan(float(v)):
                    self.log(f"test/harmful_score/{c}", v.float(), sync_dist=False)
        rows = sorted(gather_objects(self.rows), key=lambda r: r["index"])
        results["eval_fingerprint"] = self.trainer.datamodule.fingerprint()
        results.update(self._compute_settings())
        self.results = results
        if self.output_dir is not None and self.trainer.is_global_zero:
            try:
                with writable_dir(
                    self.output_dir,
                    field="model.output_dir",
                    kind="evaluation",
                    lock=self.output_lock,
                    **self._output_rules(),
                ) as out:
                    write_generations_jsonl(out / "generations.jsonl", rows)
                    atomic_write_json(out / "metrics.json", results)
                    if self.resolved_config is not None:
                        atomic_write_text(out / "config.yaml", self.resolved_config)
            finally:
                self.release_output()  # a failed write (a full disk) keeps no lock either

    def _compute_settings(self) -> dict[str, Any]:
        """How the answers were computed (weights dtype, trainer precision, torch threads) and judged
        (batches: a judge's float sums depend on which answers share its call): greedy text and
        verdicts are bit-reproducible for the same settings on the same CPU type."""
        dm = self.trainer.datamodule
        return {
            "dtype": self.weights_dtype,
            "precision": str(self.trainer.precision),
            "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "batch_size": dm.batch_size,
            "sort_by_length": dm.sort_by_length,
            "world_size": self.trainer.world_size,
        }


def question_key(record: Record) -> tuple[str, str]:
    """What makes two task questions the same question (instruction and input text)."""
    return (str(record.get("instruction", "")), str(record.get("input", "")))


def _row(item: dict[str, Any], response: str, **extra: Any) -> dict[str, Any]:
    keep = ("index", "kind", "instruction", "input", "category", "label")
    return {**{k: item[k] for k in keep}, "response": response, **extra}
