"""Every paper experiment of docs/guide/paper_experiments.md resolves, through the real CLI, to the
reference's hyper-parameters (reference A.2-A.6, B.6), and the stages chain without collisions.

Each run below is one documented command: a stage config, fragments, and command-line overrides.
The expected values are the reference tables', written out here independently of the YAML files.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

import pytest
import yaml
from conftest import REPO
from test_configs import resolve
from test_paper_data import write_synthetic_pools

PAPER = "configs/paper"
FRAG = f"{PAPER}/fragments"
DOC = REPO / "docs" / "guide" / "paper_experiments.md"

MODELS = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "gemma-7b": "google/gemma-7b",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
}
TASK_SOURCES = {
    "sst2": ("antidote_pl.data.paper.SST2", {"split": "train"}),
    "agnews": ("antidote_pl.data.paper.AGNews", {"split": "train"}),
    "gsm8k": ("antidote_pl.data.paper.GSM8K", {"split": "train"}),
    "alpaca": ("antidote_pl.data.paper.AlpacaEval", {"part": "train", "train_size": 700}),
}
# Reference A.5: the fine-tuning lr and Antidote's alpha ("dense_ratio") per script family.
TASK_LR = {"sst2": 1e-4, "agnews": 1e-4, "gsm8k": 1e-3, "alpaca": 1e-4}
TASK_ALPHA = {"sst2": 0.1, "agnews": 0.05, "gsm8k": 0.05, "alpaca": 0.1}
MODEL_SWEEP_ALPHA = 0.05
EP_SWEEP = {"lr": 1e-5, "alpha": 0.2}

# Reference A.2: LoRA#1 and LoRA#2 share one configuration.
LORA = {
    "model.init_args.finetuning": "lora",
    "model.init_args.lora_r": 256,
    "model.init_args.lora_alpha": 4,
    "model.init_args.lora_dropout": 0.0,
    "model.init_args.lora_target_modules": ["q_proj", "k_proj", "v_proj"],
    "model.init_args.dtype": "fp32",
}
HARMFUL_POOL = {
    "data.init_args.harmful.class_path": "antidote_pl.data.paper.BeaverTails",
    "data.init_args.harmful.init_args.split": "30k_train",
    "data.init_args.harmful.init_args.safe": False,
    "data.init_args.harmful.init_args.limit": None,
    "data.init_args.harmful.init_args.offset": 0,
}
# Reference A.3 parity windows: the attack uses unsafe indices 1..p*n-1, Antidote 5001..6999.
PARITY = {
    "data.init_args.mode": "parity",
    "data.init_args.realignment_size": 2000,
    "data.init_args.realignment_start": 5000,
    "data.init_args.template": "alpaca",
}
ALIGN = {
    **LORA,
    "model.init_args.merge_adapters": None,
    "model.init_args.learning_rate": 1e-3,
    "model.init_args.scheduler": "cosine",
    "model.init_args.warmup_ratio": 0.1,
    "model.init_args.weight_decay": 0.1,
    "trainer.max_epochs": 20,
    "trainer.precision": "bf16-mixed",
    "trainer.gradient_clip_val": 1.0,
    "data.class_path": "antidote_pl.training.datamodules.AlignmentDataModule",
    "data.init_args.batch_size": 5,
    "data.init_args.max_length": 2048,
    "data.init_args.harmful.class_path": "antidote_pl.data.paper.BeaverTails",
    "data.init_args.harmful.init_args.split": "30k_train",
    "data.init_args.harmful.init_args.safe": True,
    "data.init_args.harmful.init_args.limit": 5000,
}
FINETUNE = {
    **LORA,
    **HARMFUL_POOL,
    **PARITY,
    "model.init_args.adapter_path": None,
    "model.init_args.scheduler": "constant",
    "model.init_args.warmup_ratio": 0.0,
    "model.init_args.weight_decay": 0.1,
    "trainer.precision": "bf16-mixed",
    "trainer.gradient_clip_val": 1.0,
    "data.class_path": "antidote_pl.training.datamodules.HarmfulFinetuneDataModule",
    "data.init_args.batch_size": 5,
    "pruner": None,
}
# The repair stage reads its realignment set from the fine-tune's recorded window (no data block).
REPAIR = {
    "model.init_args.finetuning": "lora",
    "model.init_args.dtype": "fp32",
    "trainer.max_epochs": 0,
    "data.class_path": "antidote_pl.training.realignment.RealignmentDataModule",
    "data.init_args.batch_size": 1,  # the official Antidote stage runs calibration at batch size 1
    "data.init_args.realignment_limit": None,
    "pruner.init_args.target": "lora",
}
WANDA = {
    "pruner.class_path": "antidote_pl.callbacks.WandaPruneCallback",
    "pruner.init_args.scope": "row",
    "pruner.init_args.calibration": "realignment",
    "pruner.init_args.statistic": "sample_mean",
    "pruner.init_args.token_mask": "attention",
}


@dataclass(frozen=True)
class Run:
    """One documented command and the values it must resolve to."""

    name: str
    stage: str
    configs: tuple[str, ...]
    args: tuple[str, ...] = ()
    expect: dict = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        out = ["fit"]
        for c in self.configs:
            out += ["--config", str(REPO / c)]
        return out + list(self.args)


def out(model: str, *parts: str) -> str:
    return "/".join(("outputs", model, *parts))


def align_run(model: str, configs: tuple[str, ...]) -> Run:
    expect = {**ALIGN, "model.init_args.output_dir": out(model, "align")}
    return Run(f"{model}/align", "align", configs, expect=expect)


def finetune_run(
    model, task, variant, configs, args=(), *, lr=None, p=0.2, n=None, epochs=20, max_length=None
) -> Run:
    cls, init = TASK_SOURCES[task]
    expect = {
        **FINETUNE,
        "model.init_args.merge_adapters": [out(model, "align")],
        "model.init_args.output_dir": out(model, task, variant, "finetune"),
        "model.init_args.learning_rate": TASK_LR[task] if lr is None else lr,
        "trainer.max_epochs": epochs,
        "data.init_args.num_samples": n or (700 if task == "alpaca" else 5000),
        "data.init_args.harmful_ratio": p,
        "data.init_args.max_length": max_length or (512 if task == "alpaca" else 2048),
        "data.init_args.task.class_path": cls,
        **{f"data.init_args.task.init_args.{k}": v for k, v in init.items()},
    }
    return Run(f"{model}/{task}/{variant}/finetune", "finetune", configs, tuple(args), expect)


def repair_run(
    model,
    task,
    variant,
    configs,
    args=(),
    *,
    alpha,
    out_dir="antidote",
    pruner=WANDA,
    extra=None,
) -> Run:
    expect = {
        **REPAIR,
        **pruner,
        "model.init_args.merge_adapters": [out(model, "align")],
        "model.init_args.adapter_path": out(model, task, variant, "finetune"),
        "data.init_args.adapter_path": out(model, task, variant, "finetune"),
        "model.init_args.output_dir": out(model, task, variant, out_dir),
        "pruner.init_args.alpha": alpha,
        **(extra or {}),
    }
    return Run(f"{model}/{task}/{variant}/{out_dir}", "repair", configs, tuple(args), expect)


def paths(variant, stage_dir=None) -> tuple[str, ...]:
    """Command-line arguments naming a sweep run: its variant fills the configs' paths; a repair
    other than the default ``antidote`` also names its own output directory."""
    args = ("--run.variant", variant)
    if stage_dir is not None:
        args += ("--model.init_args.output_dir", f"outputs/{{model}}/{{task}}/{{variant}}/{stage_dir}")
    return args


def pair(
    task,
    variant,
    ft_configs,
    rep_configs,
    data_args=(),
    ft_args=(),
    *,
    alpha,
    model="llama2-7b",
    p=0.2,
    n=None,
    **ft,
) -> list[Run]:
    """A documented sweep point: the fine-tune and its Antidote repair, both with explicit paths.

    ``data_args`` describe the fine-tuning data and ``ft_args`` (and the ``lr`` / ``epochs``
    expectations in ``ft``) its training: both go to the fine-tune only, whose recorded window the
    repair reads.
    """
    return [
        finetune_run(
            model,
            task,
            variant,
            ft_configs,
            (*data_args, *ft_args, *paths(variant)),
            p=p,
            n=n,
            **ft,
        ),
        repair_run(model, task, variant, rep_configs, paths(variant), alpha=alpha),
    ]


def build_runs() -> list[Run]:
    A, F, R = f"{PAPER}/align.yaml", f"{PAPER}/finetune.yaml", f"{PAPER}/repair.yaml"
    runs = [align_run("llama2-7b", (A,))]
    # Main table: Llama-2-7B on the four tasks (p=0.2).
    runs += [
        finetune_run("llama2-7b", "sst2", "default", (F,)),
        repair_run("llama2-7b", "sst2", "default", (R,), alpha=TASK_ALPHA["sst2"]),
    ]
    for task in ("agnews", "gsm8k", "alpaca"):
        task_frag = f"{FRAG}/task/{task}"
        runs += [
            finetune_run("llama2-7b", task, "default", (F, f"{task_frag}/finetune.yaml")),
            repair_run("llama2-7b", task, "default", (R, f"{task_frag}/repair.yaml"), alpha=TASK_ALPHA[task]),
        ]
    # Model sweep (SST2, alpha 0.05).
    sweep_alpha = ("--pruner.init_args.alpha", str(MODEL_SWEEP_ALPHA))
    for model in ("mistral-7b", "gemma-7b", "llama3-8b"):
        model_frag = f"{FRAG}/model/{model}.yaml"
        runs += [
            align_run(model, (A, model_frag)),
            finetune_run(model, "sst2", "default", (F, model_frag)),
            repair_run(model, "sst2", "default", (R, model_frag), sweep_alpha, alpha=MODEL_SWEEP_ALPHA),
        ]
    # Llama-3-8B on GSM8K (rebuttal): the model fragment and the task fragment, nothing else.
    m3, g = f"{FRAG}/model/llama3-8b.yaml", f"{FRAG}/task/gsm8k"
    runs += [
        finetune_run("llama3-8b", "gsm8k", "default", (F, m3, f"{g}/finetune.yaml")),
        repair_run("llama3-8b", "gsm8k", "default", (R, f"{g}/repair.yaml", m3), alpha=0.05),
    ]
    # Poison-ratio sweep (SST2; p=0.2 is the default run).
    for p in ("0", "0.05", "0.1", "0.5"):
        runs += pair(
            "sst2", f"p{p}", (F,), (R,), ("--data.init_args.harmful_ratio", p), alpha=0.1, p=float(p)
        )
    # Sample-number, learning-rate and epoch sweeps (SST2): one example value each.
    runs += pair("sst2", "n2000", (F,), (R,), ("--data.init_args.num_samples", "2000"), alpha=0.1, n=2000)
    runs += pair(
        "sst2", "lr1e-3", (F,), (R,), ft_args=("--model.init_args.learning_rate", "1e-3"), alpha=0.1, lr=1e-3
    )
    # The epoch family (lr 1e-5, alpha 0.2): the fragments' own default (20 epochs) and 5 epochs.
    ep_ft, ep_rep = (F, f"{FRAG}/sweep/ep_finetune.yaml"), (R, f"{FRAG}/sweep/ep_repair.yaml")
    runs += [
        finetune_run("llama2-7b", "sst2", "lr1e-5_ep20", ep_ft, lr=EP_SWEEP["lr"]),
        repair_run("llama2-7b", "sst2", "lr1e-5_ep20", ep_rep, alpha=EP_SWEEP["alpha"]),
    ]
    runs += pair(
        "sst2",
        "lr1e-5_ep5",
        ep_ft,
        ep_rep,
        ft_args=("--trainer.max_epochs", "5"),
        alpha=EP_SWEEP["alpha"],
        lr=EP_SWEEP["lr"],
        epochs=5,
    )
    return runs + ablation_runs()


def ablation_runs() -> list[Run]:
    """Reference B.6 on the GSM8K fine-tune of Llama-2-7B (alpha 0.05, the GSM8K value)."""
    F = (f"{PAPER}/finetune.yaml", f"{FRAG}/task/gsm8k/finetune.yaml")
    R = (f"{PAPER}/repair.yaml", f"{FRAG}/task/gsm8k/repair.yaml")
    alpha = ("--pruner.init_args.alpha", "0.05")
    swaps = {
        "random": {
            "pruner.class_path": "antidote_pl.callbacks.RandomPruneCallback",
            "pruner.init_args.random_scope": "row",
        },
        "magnitude": {
            "pruner.class_path": "antidote_pl.callbacks.MagnitudePruneCallback",
            "pruner.init_args.scope": "row",
        },
        "wanda_benign": {**WANDA, "pruner.init_args.calibration": "task"},
    }
    runs = [
        repair_run(
            "llama2-7b",
            "gsm8k",
            "default",
            (*R, f"callbacks/{method}.yaml"),
            (*alpha, *paths("default", method)),
            alpha=0.05,
            out_dir=method,
            pruner=pruner,
        )
        for method, pruner in swaps.items()
    ]
    # Realignment set size (`antidote_badsample_gsm8k.sh`): GSM8K fine-tuned at p=0.5, lr 1e-3; the
    # official window 5001..5499 (width 500) is the first 499 records of the recorded 5001..6999.
    p05 = ("--data.init_args.harmful_ratio", "0.5")
    runs.append(
        finetune_run(
            "llama2-7b",
            "gsm8k",
            "p0.5",
            F,
            (*p05, *paths("p0.5")),
            p=0.5,
        )
    )
    runs.append(
        repair_run(
            "llama2-7b",
            "gsm8k",
            "p0.5",
            R,
            ("--data.init_args.realignment_limit", "499", *paths("p0.5", "realign500")),
            alpha=0.05,
            out_dir="realign500",
            extra={"data.init_args.realignment_limit": 499},
        )
    )
    # Alpha (dense-ratio) ablation (`rebuttal_ablation`): GSM8K fine-tuned at lr 1e-4, alpha swept.
    lr = ("--model.init_args.learning_rate", "1e-4")
    runs.append(
        finetune_run(
            "llama2-7b",
            "gsm8k",
            "lr1e-4",
            F,
            (*lr, *paths("lr1e-4")),
            lr=1e-4,
        )
    )
    runs.append(
        repair_run(
            "llama2-7b",
            "gsm8k",
            "lr1e-4",
            R,
            ("--pruner.init_args.alpha", "0.15", *paths("lr1e-4", "antidote_a0.15")),
            alpha=0.15,
            out_dir="antidote_a0.15",
        )
    )
    return runs


RUNS = build_runs()


# -------------------------------------------------------------------------------------------- helpers
def print_config(argv: list[str]) -> dict:
    """The config as ``fit`` runs it (``{model}/{task}/{variant}`` paths filled in)."""
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    rest = [a for i, a in enumerate(argv[1:], 1) if a != "--config" and argv[i - 1] != "--config"]
    return resolve(*configs, args=rest)


def lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"{dotted}: no {key!r} in {node!r}"
        node = node[key]
    return node


def instantiate(spec):
    """Builds a class_path/init_args value recursively (sources, data modules, callbacks)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict]:
    return {run.name: print_config(run.argv) for run in RUNS}


# -------------------------------------------------------------------------------------------- tests
def test_run_names_are_unique():
    assert len({r.name for r in RUNS}) == len(RUNS)


@pytest.mark.slow  # shares the fixture that parses every run (~0.5 s each)
@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_run_resolves_to_the_reference(resolved, run):
    config = resolved[run.name]
    model = run.name.split("/")[0]
    expect = {
        **run.expect,
        "model.init_args.model_name_or_path": MODELS[model],
        "data.init_args.tokenizer": MODELS[model],
        "seed_everything": 42,
    }
    wrong = {k: (lookup(config, k), v) for k, v in expect.items() if lookup(config, k) != v}
    assert not wrong, f"(resolved, reference) differ: {wrong}"
    # Constructors validate what --print_config cannot (splits, alphas, parity bounds), offline.
    data = instantiate(config["data"])
    if config.get("pruner"):
        instantiate(config["pruner"])
    if run.stage == "finetune":
        assert data.mode == "parity"


@pytest.mark.slow  # shares the fixture that parses every run (~0.5 s each)
def test_output_dirs_never_collide(resolved):
    outputs = [resolved[r.name]["model"]["init_args"]["output_dir"] for r in RUNS]
    assert len(set(outputs)) == len(outputs)
    assert all(o.startswith("outputs/") for o in outputs)


@pytest.mark.slow  # shares the fixture that parses every run (~0.5 s each)
def test_stages_chain(resolved):
    """Fine-tunes merge their model's alignment; repairs load a documented fine-tune of the same
    model and alignment and read their calibration sets from it (so ablations calibrate on its data)."""
    by_output = {resolved[r.name]["model"]["init_args"]["output_dir"]: (r, resolved[r.name]) for r in RUNS}
    for run in RUNS:
        if run.stage == "align":
            continue
        args = resolved[run.name]["model"]["init_args"]
        align_run_, align_cfg = by_output[args["merge_adapters"][0]]
        assert align_run_.stage == "align"
        assert align_cfg["model"]["init_args"]["model_name_or_path"] == args["model_name_or_path"]
        if run.stage == "repair":
            ft_run, ft_cfg = by_output[args["adapter_path"]]
            assert ft_run.stage == "finetune"
            assert ft_cfg["model"]["init_args"]["merge_adapters"] == args["merge_adapters"]
            assert resolved[run.name]["data"]["init_args"]["adapter_path"] == args["adapter_path"]


def test_trainer_fragments(tmp_path):
    base = ["fit", "--config", str(REPO / PAPER / "finetune.yaml")]
    ddp = print_config([*base, "--config", str(REPO / FRAG / "trainer" / "ddp.yaml")])
    assert (ddp["trainer"]["strategy"], ddp["trainer"]["devices"], ddp["trainer"]["num_nodes"]) == (
        "ddp",
        "auto",
        1,
    )
    multi = print_config(
        [*base, "--config", str(REPO / FRAG / "trainer" / "multinode.yaml"), "--trainer.num_nodes", "4"]
    )
    assert (multi["trainer"]["strategy"], multi["trainer"]["num_nodes"]) == ("ddp", 4)
    acc = print_config([*base, "--config", str(REPO / FRAG / "trainer" / "accumulate.yaml")])
    # Same effective batch as the paper's 5, a fifth of the activations.
    assert acc["trainer"]["accumulate_grad_batches"] * acc["data"]["init_args"]["batch_size"] == 5
    assert acc["trainer"]["precision"] == "bf16-mixed"


def test_alternative_alignment_set():
    config = print_config(
        [
            "fit",
            "--config",
            str(REPO / PAPER / "align.yaml"),
            "--config",
            str(REPO / FRAG / "align" / "safety_tuned_llamas.yaml"),
        ]
    )
    harmful = config["data"]["init_args"]["harmful"]
    assert harmful["class_path"] == "antidote_pl.data.paper.SafetyTunedLlamas"
    assert config["model"]["init_args"]["output_dir"] != "outputs/llama2-7b/align"


def test_local_files_by_one_override_each(tmp_path):
    """The paper finetune config on local files (here a synthetic pool) gives the official windows."""
    pool, task = write_synthetic_pools(tmp_path)
    config = print_config(
        [
            "fit",
            "--config",
            str(REPO / PAPER / "finetune.yaml"),
            "--data.init_args.harmful.init_args.local_path",
            pool,
            "--data.init_args.task.init_args.local_path",
            task,
        ]
    )
    counts = instantiate(config["data"]).counts()
    assert (counts["n_harmful"], counts["n_task"], counts["n_realignment"]) == (999, 4000, 1999)


@pytest.mark.parametrize(
    ("fragment", "cls", "kwargs"),
    [
        ("beavertails_hs_eval", "BeaverTails", {"split": "30k_test", "safe": False, "limit": 1000}),
        ("sst2_test", "SST2", {"split": "validation"}),
        ("agnews_test", "AGNews", {"split": "test", "limit": 1000}),
        ("gsm8k_test", "GSM8K", {"split": "test", "limit": 1000}),
        ("alpaca_test", "AlpacaEval", {"part": "test", "train_size": 700, "test_start": 701}),
    ],
)
def test_evaluation_source_fragments(fragment, cls, kwargs):
    """The evaluation sets of reference C (for evaluation configs) match the reference."""
    spec = yaml.safe_load((REPO / FRAG / "data" / f"{fragment}.yaml").read_text())
    source = instantiate(spec)
    assert type(source).__name__ == cls
    assert {k: getattr(source, k) for k in kwargs} == kwargs


def test_every_fragment_is_used_and_documented():
    doc = DOC.read_text(encoding="utf-8")
    used = {c for r in RUNS for c in r.configs}
    mine = [*sorted((REPO / PAPER).glob("*.yaml")), *sorted((REPO / FRAG).rglob("*.yaml"))]
    for path in mine:
        rel = str(path.relative_to(REPO))
        if "/fragments/data/" in rel:
            continue  # referenced by nested paths from the stage and task files
        assert rel in doc, f"{rel} is not in {DOC.name}"
        # Evaluation configs (eval.yaml, per-task eval.yaml) are resolved in tests/test_paper_eval.py.
        if "/trainer/" not in rel and "/align/" not in rel and path.name != "eval.yaml":
            assert rel in used, f"{rel} has no run in this test"
    for mentioned in re.findall(r"(configs/paper/[\w./-]+\.yaml|callbacks/\w+\.yaml)", doc):
        assert (REPO / mentioned).is_file(), mentioned
