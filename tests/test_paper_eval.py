"""The paper evaluation configs resolve to reference C, and AlpacaEval outputs are written as its judge reads.

The expected values are the reference's (C.1, C.2), written out here independently of the YAML files.
The judge is not instantiated (it would fetch beaver-dam-7b's config from the hub); the sources are.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_LLAMA
from test_configs import resolve as resolve_config

from antidote_pl.data.paper import AlpacaEval
from antidote_pl.errors import ConfigError
from antidote_pl.evaluation.alpaca_eval import (
    AlpacaEvalOutputs,
    alpaca_eval_command,
    alpaca_eval_env,
    alpaca_eval_records,
    write_alpaca_eval_outputs,
)

EVAL = "configs/paper/eval.yaml"
TASK = "configs/paper/fragments/task/{}/eval.yaml"
DOC = REPO / "docs" / "guide" / "paper_experiments.md"

# Reference C.1: beaver-dam-7b on the first 1000 unsafe BeaverTails 30k_test prompts, 512 tokens.
HS = {
    "model.class_path": "antidote_pl.evaluation.evaluator.StageEvaluator",
    "model.init_args.judge.class_path": "antidote_pl.judges.base.ClassifierJudge",
    "model.init_args.judge.init_args.model_path": "PKU-Alignment/beaver-dam-7b",
    "model.init_args.judge.init_args.parity": "beaver-dam",
    "model.init_args.judge.init_args.max_length": 256,
    "model.init_args.judge.init_args.threshold": 0.5,
    "model.init_args.harmful_max_new_tokens": 512,
    "model.init_args.dtype": "fp32",
    "data.class_path": "antidote_pl.evaluation.evaluator.EvalDataModule",
    "data.init_args.template": "alpaca",
    "data.init_args.harmful_limit": 1000,
}
# Reference C.2: test set, limit and generation budget per task.
TASKS = {
    "sst2": ("SST2", {"split": "validation"}, 1000, 200),
    "agnews": ("AGNews", {"split": "test", "limit": 1000}, 1000, 200),
    "gsm8k": ("GSM8K", {"split": "test", "limit": 1000}, 1000, 512),
}


def resolve(*configs: str) -> dict:
    """The config as ``test`` runs it, with the ``{model}/{task}/{variant}`` paths filled in."""
    return resolve_config(*(REPO / c for c in configs))


def lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def instantiate(spec):
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: v for k, v in (spec.get("init_args") or {}).items()})


def check_hs(config: dict) -> None:
    for key, value in HS.items():
        assert lookup(config, key) == value, key
    harmful = instantiate(lookup(config, "data.init_args.harmful"))
    assert type(harmful).__name__ == "BeaverTails"
    assert (harmful.split, harmful.safe, harmful.limit, harmful.offset) == ("30k_test", False, 1000, 0)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_eval_resolves_to_the_reference(task):
    config = resolve(EVAL) if task == "sst2" else resolve(EVAL, TASK.format(task))
    check_hs(config)
    cls, kwargs, limit, tokens = TASKS[task]
    source = instantiate(lookup(config, "data.init_args.task"))
    assert type(source).__name__ == cls and {k: getattr(source, k) for k in kwargs} == kwargs
    assert lookup(config, "data.init_args.task_name") == task
    assert lookup(config, "data.init_args.task_limit") == limit
    assert lookup(config, "model.init_args.task_max_new_tokens") == tokens
    stage, out = lookup(config, "model.init_args.stage"), lookup(config, "model.init_args.output_dir")
    assert f"/{task}/" in stage and out != stage and not out.startswith(stage + "/")


def test_alpaca_eval_resolves_to_the_reference():
    config = resolve(EVAL, TASK.format("alpaca"))
    check_hs(config)
    assert (
        lookup(config, "data.init_args.task") is None and lookup(config, "data.init_args.task_name") is None
    )
    (callback,) = lookup(config, "trainer.callbacks")
    assert callback["class_path"] == "antidote_pl.evaluation.alpaca_eval.AlpacaEvalOutputs"
    args = callback["init_args"]
    assert (args["max_new_tokens"], args["template"]) == (512, "alpaca")
    assert (args["annotators_config"], args["version"], args["run_judge"]) == ("chatgpt", 1, False)
    prompts = instantiate(args["prompts"])
    assert isinstance(prompts, AlpacaEval)
    assert (prompts.part, prompts.train_size, prompts.test_start) == ("test", 700, 701)


def test_eval_configs_are_documented_for_every_figure():
    doc = DOC.read_text(encoding="utf-8")
    for path in [EVAL, *(TASK.format(t) for t in ("agnews", "gsm8k", "alpaca"))]:
        assert path in doc, path


# -------------------------------------------------------------------------------------------- writer
def test_records_and_file_are_what_alpaca_eval_reads(tmp_path):
    records = alpaca_eval_records(["Say hi", "Add"], ["hi", "2"], "llama2-antidote", ["koala", None])
    assert records == [
        {"instruction": "Say hi", "output": "hi", "generator": "llama2-antidote", "dataset": "koala"},
        {"instruction": "Add", "output": "2", "generator": "llama2-antidote"},
    ]
    path = write_alpaca_eval_outputs(tmp_path / "out" / "model_outputs.json", records)
    assert json.loads(path.read_text(encoding="utf-8")) == records  # one JSON list, as alpaca_eval loads it
    command = alpaca_eval_command(path, "chatgpt")
    assert command == ["alpaca_eval", "--model_outputs", str(path), "--annotators_config", "chatgpt"]
    assert alpaca_eval_env(1) == {"IS_ALPACA_EVAL_2": "False"}
    with pytest.raises(ConfigError, match="outputs"):
        alpaca_eval_records(["a"], [], "g")
    with pytest.raises(ConfigError, match="generator"):
        alpaca_eval_records(["a"], ["b"], "")
    with pytest.raises(ConfigError, match=r"records\[0\]"):
        write_alpaca_eval_outputs(
            tmp_path / "bad.json", [{"instruction": "a", "output": None, "generator": "g"}]
        )


def alpaca_file(tmp_path, n: int = 805):
    path = tmp_path / "alpaca_eval.json"
    rows = [
        {"instruction": f"how do i bake bread {k}", "output": f"o{k}", "dataset": "koala"} for k in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_callback_writes_the_official_test_prompts(tmp_path):
    from antidote_pl.training.sft import CausalLMSFTModule

    torch.manual_seed(0)
    sft = CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full")
    evaluator = SimpleNamespace(
        model=sft.model.eval(), tokenizer=sft.tokenizer, stage=str(tmp_path / "stage")
    )
    out = tmp_path / "eval" / "model_outputs.json"
    prompts = AlpacaEval("test", local_path=str(alpaca_file(tmp_path)))
    callback = AlpacaEvalOutputs(prompts, str(out), template="tiny", max_new_tokens=2, batch_size=64)
    callback.setup(SimpleNamespace(), evaluator, "test")
    callback.on_test_epoch_end(SimpleNamespace(is_global_zero=True), evaluator)

    written = json.loads(out.read_text(encoding="utf-8"))
    assert [r["instruction"] for r in written] == [f"how do i bake bread {k}" for k in range(701, 805)]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in written)
    assert all(isinstance(r["output"], str) and r["generator"] == str(tmp_path / "stage") for r in written)
    judge = json.loads(out.with_suffix(".judge.json").read_text(encoding="utf-8"))
    assert judge["command"][-2:] == ["--annotators_config", "chatgpt"]
    assert judge["env"] == {"IS_ALPACA_EVAL_2": "False"}
    # A second run refuses to replace the file unless told to, before generating anything.
    with pytest.raises(ConfigError, match="overwrite"):
        callback.setup(SimpleNamespace(), evaluator, "test")


def test_callback_runs_inside_the_test_loop(tmp_path):
    import lightning as L
    from conftest import quiet_trainer_kwargs

    from antidote_pl.evaluation.evaluator import EvalDataModule, StageEvaluator
    from antidote_pl.judges.base import TinyWorldJudge
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.sft import CausalLMSFTModule

    torch.manual_seed(0)
    stage = tmp_path / "stage"
    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(stage)
    )
    data = EvalDataModule(harmful=TinyWorldSource("harmful_answer", split="eval", limit=4), template="tiny")
    evaluator = StageEvaluator(str(stage), judge=TinyWorldJudge(), harmful_max_new_tokens=2)
    out = tmp_path / "alpaca" / "model_outputs.json"
    prompts = AlpacaEval("test", local_path=str(alpaca_file(tmp_path)))
    callback = AlpacaEvalOutputs(prompts, str(out), template="tiny", max_new_tokens=2, limit=5)
    trainer = L.Trainer(callbacks=[callback], **quiet_trainer_kwargs(tmp_path))
    trainer.test(evaluator, datamodule=data, verbose=False)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert [r["instruction"] for r in written] == [f"how do i bake bread {k}" for k in range(701, 706)]
    assert {r["generator"] for r in written} == {str(stage)}
    assert evaluator.results["n_harmful_score"] == 4, "the evaluation itself ran as usual"


def test_callback_normalises_responses_as_the_official_evaluation(tmp_path, monkeypatch):
    # The official script keeps output.split("### Response:")[1].strip(): the generation up to a
    # repeated marker, stripped.
    import antidote_pl.evaluation.alpaca_eval as module

    monkeypatch.setattr(
        module,
        "generate",
        lambda model, tok, prompts, *a: ["  Hi there.\n### Response: again"] * len(prompts),
    )
    tok = SimpleNamespace(bos_token=None)
    evaluator = SimpleNamespace(model=object(), tokenizer=tok, stage="outputs/s")
    out = tmp_path / "o.json"
    callback = AlpacaEvalOutputs(AlpacaEval("test", local_path=str(alpaca_file(tmp_path))), str(out), limit=2)
    callback.on_test_epoch_end(SimpleNamespace(is_global_zero=True), evaluator)
    assert [r["output"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["Hi there."] * 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"output_path": "outputs.jsonl"}, "AlpacaEvalOutputs.output_path"),
        ({"template": "nope"}, "AlpacaEvalOutputs.template"),
        ({"max_new_tokens": 0}, "AlpacaEvalOutputs.max_new_tokens"),
        ({"version": 3}, "AlpacaEvalOutputs.version"),
        ({"annotators_config": ""}, "AlpacaEvalOutputs.annotators_config"),
        ({"generator": ""}, "AlpacaEvalOutputs.generator"),
    ],
)
def test_callback_bad_values_name_the_field(tmp_path, kwargs, field):
    args = {"prompts": AlpacaEval("test"), "output_path": str(tmp_path / "o.json"), **kwargs}
    with pytest.raises(ConfigError, match=field):
        AlpacaEvalOutputs(**args)
