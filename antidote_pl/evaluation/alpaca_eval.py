"""AlpacaEval outputs in the format its external judge reads (reference C.2), and the judge's command.

The official evaluation generates an answer to each AlpacaEval test prompt (items 701-804, 512 new
tokens, greedy), writes a JSON list of ``{instruction, output, generator}`` records, and scores it
with ``alpaca_eval --annotators_config chatgpt`` under ``IS_ALPACA_EVAL_2=False`` (the AlpacaEval 1
win rate against the reference answers, judged by ChatGPT). AlpacaEval has no gold answer, so it is
not a fine-tune accuracy of :class:`~antidote_pl.evaluation.evaluator.StageEvaluator`; instead the
:class:`AlpacaEvalOutputs` callback generates with the evaluated stage's model during ``test`` and
writes that file, and :func:`alpaca_eval_command` gives the judge's command line. The judge is
pluggable: ``annotators_config`` is any annotator alpaca_eval knows (``chatgpt`` is the paper's; a
GPT-4 annotator, or a local config directory for an open model) and ``version`` picks AlpacaEval 1
or 2. Scoring needs the ``alpaca_eval`` package and the annotator's API key, so it runs outside this
project unless ``run_judge`` is set.

::

    python -m antidote_pl test --config configs/paper/eval.yaml \\
        --config configs/paper/fragments/task/alpaca/eval.yaml
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from antidote_pl.data.records import Source
from antidote_pl.data.templates import get_template, render_prompt
from antidote_pl.errors import ConfigError, bad_value, check_int
from antidote_pl.evaluation.responses import normalise_response
from antidote_pl.models.generation import gather_objects, generate, rank_and_world_size, shard_for_rank
from antidote_pl.utils.io import atomic_write_text, check_apart_from_inputs

#: The fields of one AlpacaEval model-output record, in the order they are written.
ALPACA_EVAL_FIELDS = ("instruction", "output", "generator")
#: The paper's judge: ChatGPT annotator, AlpacaEval 1 (``IS_ALPACA_EVAL_2=False``).
OFFICIAL_ANNOTATORS = "chatgpt"
OFFICIAL_VERSION = 1


def alpaca_eval_records(
    instructions: Sequence[str],
    outputs: Sequence[str],
    generator: str,
    datasets: Sequence[str | None] | None = None,
) -> list[dict[str, str]]:
    """The model-output records alpaca_eval reads: one ``{instruction, output, generator}`` per prompt.

    Args:
        instructions: The AlpacaEval instructions, exactly as in the evaluation set (alpaca_eval
            matches them against its reference outputs).
        outputs: The model's answers, normalised as the official evaluation does.
        generator: The model's name in the leaderboard (the official script used the adapter path).
        datasets: Optional AlpacaEval subset per item (``helpful_base``, ``koala``, ...), kept as the
            ``dataset`` field as in the official file; ``None`` entries are left out.

    Raises:
        ConfigError: if the lists differ in length, or ``generator`` is empty.
    """
    if len(instructions) != len(outputs):
        raise bad_value("outputs", f"{len(outputs)} items", f"one per instruction ({len(instructions)})")
    if datasets is not None and len(datasets) != len(instructions):
        raise bad_value("datasets", f"{len(datasets)} items", f"one per instruction ({len(instructions)})")
    if not isinstance(generator, str) or not generator:
        raise bad_value("generator", generator, "a non-empty model name")
    records = []
    for i, (instruction, output) in enumerate(zip(instructions, outputs)):
        record = {"instruction": instruction, "output": output, "generator": generator}
        if datasets is not None and datasets[i] is not None:
            record["dataset"] = datasets[i]
        records.append(record)
    return records


def write_alpaca_eval_outputs(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Writes ``records`` as one JSON list (alpaca_eval's ``--model_outputs`` file), atomically.

    Args:
        path: The ``.json`` file to write; parent directories are created.
        records: Records from :func:`alpaca_eval_records`.

    Returns:
        The written path.

    Raises:
        ConfigError: if a record lacks one of :data:`ALPACA_EVAL_FIELDS` or has a non-string value.
    """
    for i, record in enumerate(records):
        bad = [k for k in ALPACA_EVAL_FIELDS if not isinstance(record.get(k), str)]
        if bad:
            raise bad_value(
                f"records[{i}]", {k: record.get(k) for k in bad}, "string instruction/output/generator"
            )
    path = Path(path)
    atomic_write_text(path, json.dumps(list(records), indent=2, ensure_ascii=False) + "\n")
    return path


def alpaca_eval_command(
    model_outputs: str | os.PathLike,
    annotators_config: str = OFFICIAL_ANNOTATORS,
    reference_outputs: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
) -> list[str]:
    """The ``alpaca_eval`` command line that scores ``model_outputs`` with the given annotator.

    Args:
        model_outputs: The file written by :func:`write_alpaca_eval_outputs`.
        annotators_config: An alpaca_eval annotator name or config directory (paper: ``chatgpt``).
        reference_outputs: The outputs to compare against; ``None``: alpaca_eval's default for the
            version (AlpacaEval 1: text-davinci-003).
        output_path: Where alpaca_eval writes its leaderboard and annotations; ``None``: next to
            ``model_outputs``.
    """
    command = [
        "alpaca_eval",
        "--model_outputs",
        os.fspath(model_outputs),
        "--annotators_config",
        annotators_config,
    ]
    if reference_outputs is not None:
        command += ["--reference_outputs", os.fspath(reference_outputs)]
    if output_path is not None:
        command += ["--output_path", os.fspath(output_path)]
    return command


def alpaca_eval_env(version: int = OFFICIAL_VERSION) -> dict[str, str]:
    """The environment variables that select AlpacaEval 1 or 2 (``IS_ALPACA_EVAL_2``)."""
    if version not in (1, 2):
        raise bad_value("version", version, "1 (the paper's AlpacaEval 1) or 2")
    return {"IS_ALPACA_EVAL_2": "True" if version == 2 else "False"}


class AlpacaEvalOutputs(L.Callback):
    """Generates answers to AlpacaEval prompts during ``test`` and writes alpaca_eval's input file.

    Runs at the end of the test epoch of a :class:`~antidote_pl.evaluation.evaluator.StageEvaluator` (any
    module with ``model`` and ``tokenizer`` attributes), with the module's model: prompts are
    rendered with ``template``, sharded over the ranks like the evaluator's, generated greedily,
    gathered, normalised as the official evaluation does, and rank 0 writes ``output_path`` plus
    ``<output_path stem>.judge.json`` with the judge's command and environment (and, with
    ``run_judge``, runs it).

    Args:
        prompts: The AlpacaEval prompts (paper: ``fragments/data/alpaca_test.yaml``, items 701-804).
        output_path: The ``.json`` file to write.
        generator: The ``generator`` field; ``None``: the evaluated stage's path.
        template: Prompt template the model was trained with.
        max_new_tokens: Generation budget (paper: 512).
        batch_size: Prompts per generation batch.
        limit: Use only the first N prompts.
        annotators_config: The judge (alpaca_eval annotator; paper: ``chatgpt``).
        version: AlpacaEval version for the judge (paper: 1).
        reference_outputs: Reference outputs for the judge; ``None``: alpaca_eval's default.
        run_judge: Run the judge after writing (needs ``alpaca_eval`` and its API key).
        overwrite: Replace an existing ``output_path``; otherwise an existing file is an error,
            raised before any generation.

    Raises:
        ConfigError: on bad values (construction), or in ``setup`` on a module without a model and
            tokenizer, or an existing output without ``overwrite``.
    """

    def __init__(
        self,
        prompts: Source,
        output_path: str,
        generator: str | None = None,
        template: str = "alpaca",
        max_new_tokens: int = 512,
        batch_size: int = 32,
        limit: int | None = None,
        annotators_config: str = OFFICIAL_ANNOTATORS,
        version: int = OFFICIAL_VERSION,
        reference_outputs: str | None = None,
        run_judge: bool = False,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(prompts, Source):
            raise bad_value("AlpacaEvalOutputs.prompts", prompts, "a Source (class_path/init_args)")
        if not isinstance(output_path, str) or not output_path.endswith(".json"):
            raise bad_value("AlpacaEvalOutputs.output_path", output_path, "a path ending in .json")
        if generator is not None and (not isinstance(generator, str) or not generator):
            raise bad_value("AlpacaEvalOutputs.generator", generator, "a non-empty name or null")
        get_template(template, field="AlpacaEvalOutputs.template")
        check_int("AlpacaEvalOutputs.max_new_tokens", max_new_tokens, 1)
        check_int("AlpacaEvalOutputs.batch_size", batch_size, 1)
        if limit is not None:
            check_int("AlpacaEvalOutputs.limit", limit, 1)
        if not isinstance(annotators_config, str) or not annotators_config:
            raise bad_value("AlpacaEvalOutputs.annotators_config", annotators_config, "an annotator name")
        if version not in (1, 2):
            raise bad_value("AlpacaEvalOutputs.version", version, "1 (the paper's AlpacaEval 1) or 2")
        self.prompts, self.output_path, self.generator = prompts, output_path, generator
        self.template, self.max_new_tokens, self.batch_size = template, max_new_tokens, batch_size
        self.limit, self.annotators_config, self.version = limit, annotators_config, version
        self.reference_outputs, self.run_judge, self.overwrite = reference_outputs, run_judge, overwrite
        self.records: list[dict[str, str]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Checks the module and the output before anything is generated."""
        if getattr(pl_module, "model", None) is None or getattr(pl_module, "tokenizer", None) is None:
            raise ConfigError(
                f"AlpacaEvalOutputs needs a module with `model` and `tokenizer` (a StageEvaluator), "
                f"got {type(pl_module).__name__}."
            )
        if Path(self.output_path).exists() and not self.overwrite:
            raise bad_value(
                "AlpacaEvalOutputs.output_path",
                self.output_path,
                "a path that does not exist yet (or set AlpacaEvalOutputs.overwrite: true)",
            )
        stage_dir = getattr(pl_module, "stage", None)
        if stage_dir is not None and Path(stage_dir).exists():
            check_apart_from_inputs(
                self.output_path, "AlpacaEvalOutputs.output_path", {"model.stage": stage_dir}
            )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Generates, gathers and (rank 0) writes the outputs and the judge's command."""
        records = self.prompts.load()[: self.limit]
        if not records:
            raise bad_value("AlpacaEvalOutputs.prompts", self.prompts.describe(), "a non-empty prompt set")
        tokenizer = pl_module.tokenizer
        rank, world = rank_and_world_size()
        local = shard_for_rank(records, rank, world)
        texts = [render_prompt(r, self.template, tokenizer) for r in local]
        generated = (
            generate(pl_module.model, tokenizer, texts, self.max_new_tokens, self.batch_size) if texts else []
        )
        outputs = gather_objects([normalise_response(g, self.template) for g in generated])
        generator = self.generator or str(getattr(pl_module, "stage", "model"))
        self.records = alpaca_eval_records(
            [r["instruction"] for r in records], outputs, generator, [r.get("category") for r in records]
        )
        if trainer.is_global_zero:
            path = write_alpaca_eval_outputs(self.output_path, self.records)
            command = alpaca_eval_command(path, self.annotators_config, self.reference_outputs)
            env = alpaca_eval_env(self.version)
            judge = {"command": command, "env": env}
            atomic_write_text(path.with_suffix(".judge.json"), json.dumps(judge, indent=2) + "\n")
            if self.run_judge:
                run_alpaca_eval(command, env)


def run_alpaca_eval(command: Sequence[str], env: dict[str, str]) -> None:
    """Runs the judge command (see :func:`alpaca_eval_command`) with ``env`` added.

    Raises:
        ConfigError: if ``alpaca_eval`` is not installed or the judge exits with an error.
    """
    if shutil.which(command[0]) is None:
        raise ConfigError(
            f"{command[0]} is not installed: pip install alpaca-eval, or run the command in "
            "<outputs>.judge.json elsewhere (AlpacaEvalOutputs.run_judge: false)."
        )
    result = subprocess.run(list(command), env={**os.environ, **env}, check=False)
    if result.returncode != 0:
        raise ConfigError(
            f"the AlpacaEval judge failed with exit code {result.returncode}: {' '.join(command)}"
        )
