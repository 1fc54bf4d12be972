"""Training an LM judge: the question-grouped split, either head, every judge's held-out figures, saving.

:func:`train_judge` reads the labelled CSVs, runs (or reads from the cache) the backbone, fits the
head (:func:`~antidote_pl.judges.lm.heads.train_head` or :func:`train_tuned_head`; every choice on
validation rows), scores the LM, keyword and n-gram judges on the same held-out questions and writes
the judge directory that :class:`~antidote_pl.judges.lm.judge.LMJudge` loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from antidote_pl.errors import bad_value, check_int
from antidote_pl.judges.base import KeywordJudge
from antidote_pl.judges.lm.cache import (
    cached_features,
    cached_token_states,
    load_training_files,
    outputs_of_files,
)
from antidote_pl.judges.lm.featurizer import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    DEFAULT_MAX_LENGTH,
    FEATURE_VERSION,
    PairFeaturizer,
    backbone_identity,
)
from antidote_pl.judges.lm.heads import HEADS, HeadKind, LinearHead, train_head
from antidote_pl.judges.lm.judge import AGREEMENT_FILE, META_FILE, WEIGHTS_FILE
from antidote_pl.judges.lm.tuned import (
    TokenStates,
    TunedHead,
    TuneSettings,
    fit_tuned_head,
    tuned_probabilities,
)
from antidote_pl.judges.offline import VAL_SEED_OFFSET, OfflineJudge, binary_agreement, heldout_mask
from antidote_pl.judges.thresholds import choose_threshold
from antidote_pl.utils.io import OutputLock, atomic_dir, atomic_write_json, check_output_dir

#: The shipped labelled data, found beside the repository (``../shared/data``), never copied in.
DATA_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "judge_labelled"
DEFAULT_TRAIN_CSVS = (
    DATA_DIR / "gptfuzz" / "train.csv",
    DATA_DIR / "jailbreakeval" / "Safe-RLHFmini.csv",
    DATA_DIR / "jailbreakeval" / "example.csv",
)
#: The tuned head's defaults: trunk layers 1-12 frozen and cached, layers 13-18 fine-tuned.
DEFAULT_TRUNK_LAYER, DEFAULT_TUNED_LAYERS = 12, 6
DEFAULT_CACHE_DIR = Path("~/.cache/antidote_pl/lm_judge_features")
#: Added to the seed for the validation split, so it is drawn independently of the held-out split.


def grouped_split(questions: Sequence[str], heldout_fraction: float, val_fraction: float, seed: int):
    """``(train, val, test)`` boolean masks, grouped by question.

    The test part is :func:`heldout_mask` with ``seed`` (the same rows the OfflineJudge would hold
    out); validation is an independent hash draw among the remaining questions.

    Args:
        questions: Every row's question (rows of one question stay together).
        heldout_fraction: Fraction of questions held out for the reported figures.
        val_fraction: Fraction of questions (drawn independently, minus held-out ones) used to choose
            the layers, L2 strength and threshold.
        seed: Seed of both draws.
    """
    if not 0.0 < val_fraction < 1.0:
        raise bad_value("val_fraction", val_fraction, "a number in (0, 1)")
    test = heldout_mask(questions, heldout_fraction, seed)
    val = heldout_mask(questions, val_fraction, seed + VAL_SEED_OFFSET) & ~test
    return ~(test | val), val, test


def _check_parts(gold: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        part = gold[mask]
        if part.numel() == 0 or (name != "heldout" and part.unique().numel() < 2):
            raise bad_value(
                "train_csv",
                f"{int(mask.sum())} {name} rows ({int(part.sum())} harmful)",
                f"labelled data whose question-grouped {name} part holds both labels "
                "(add rows or raise --limit_per_file)",
            )


def train_tuned_head(
    featurizer: PairFeaturizer,
    tokens: TokenStates,
    labels: Sequence[int],
    train: torch.Tensor,
    val: torch.Tensor,
    settings: TuneSettings,
    say: Callable[[str], None] = lambda _msg: None,
) -> tuple[TunedHead, float, dict[str, Any]]:
    """Fine-tunes the featurizer's tail layers plus a linear head on the training rows' trunk states.

    Nothing is chosen on the held-out rows: the schedule is fixed in ``settings`` and the threshold
    is chosen on validation.

    Returns:
        ``(head, threshold, report)``.
    """
    if featurizer.tail is None:
        featurizer.load()
    torch.manual_seed(settings.seed)  # the new linear layer's initialisation
    head = TunedHead(featurizer.tail, featurizer.rotary, tokens.states.shape[1]).to(featurizer.device)
    gold = torch.tensor([bool(y) for y in labels])
    clock = time.time()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 20 == 0 or step == total:
            rate = step / max(time.time() - clock, 1e-9)
            say(f"tuning: step {step}/{total}, loss {loss:.3f}, ~{(total - step) / rate:.0f}s left")

    fit = fit_tuned_head(head, tokens, gold, train.nonzero().squeeze(-1), settings, progress)
    probs = tuned_probabilities(
        head, tokens, val.nonzero().squeeze(-1), featurizer.batch_size, settings.precision
    )
    threshold, accuracy = choose_threshold(probs, gold[val])
    logloss = float(nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), gold[val].float()))
    report = {
        "selected": {"threshold": threshold},
        "val_accuracy": accuracy,
        "val_logloss": logloss,
        "training": fit | {"settings": settings.as_dict()},
    }
    return head, threshold, report


def _rate(pred: torch.Tensor, other: torch.Tensor) -> float:
    return float((pred.bool() == other.bool()).float().mean()) if pred.numel() else float("nan")


def train_judge(
    out: str | Path,
    train_csvs: Sequence[str | Path] = DEFAULT_TRAIN_CSVS,
    *,
    heldout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_per_file: int | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    overwrite: bool = False,
    lock: OutputLock | None = None,
    log: Callable[[str], None] | None = None,
    **head: Any,
) -> dict[str, Any]:
    """Trains an LM judge, measures it and the other judges on held-out questions, saves it.

    Args:
        out: Output directory (new or empty, or an earlier output with ``overwrite``).
        train_csvs: Labelled CSVs (:func:`~antidote_pl.judges.offline.load_labelled_csv`), 1 = harmful.
        heldout_fraction, val_fraction: See :func:`grouped_split`.
        seed: Seed of the split, of the per-file subsample and of the tuned head's training.
        limit_per_file: Most rows used per file (a seeded subsample), ``None`` for all.
        cache_dir: Feature cache directory, ``None`` to disable.
        overwrite: Replace an earlier judge in ``out``.
        lock: A lock already taken on ``out``.
        log: Called with progress lines.
        **head: The head and the backbone it reads: keyword arguments of :func:`judge_featurizer`
            (``head``, ``backbone``, ``max_length``, ``layers``, ``tune``, ...).

    Returns:
        The agreement report (also written as ``agreement.json`` and inside ``judge.json``).

    Raises:
        ConfigError: on bad data files, settings or output directory, before the backbone runs.
    """
    started = time.time()
    if limit_per_file is not None:
        check_int("limit_per_file", limit_per_file, 1)
    inputs = {"train_csv": [str(p) for p in train_csvs]}
    check_output_dir(out, "out", overwrite=overwrite, flag="--overwrite", inputs=inputs)
    featurizer, tune = judge_featurizer(**head, seed=seed)
    identity = backbone_identity(featurizer.backbone)
    files = load_training_files(train_csvs, limit_per_file, seed)
    split = {"heldout_fraction": heldout_fraction, "val_fraction": val_fraction, "seed": seed}
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    say = log or (lambda _msg: None)
    model, threshold, selection, report = _train_and_measure(
        featurizer, identity, files, split, cache, say, tune
    )
    report |= {"limit_per_file": limit_per_file}
    report["seconds"]["total"] = round(time.time() - started, 1)
    meta = _judge_meta(featurizer, identity, model, threshold, selection) | {"agreement": report}
    _save_judge(out, model, meta, report, overwrite=overwrite, inputs=inputs, lock=lock)
    return report


def judge_featurizer(
    head: HeadKind = "tuned",
    backbone: str = DEFAULT_BACKBONE,
    max_length: int = DEFAULT_MAX_LENGTH,
    question_max_tokens: int = 48,
    batch_size: int = 16,
    layers: Sequence[int] = DEFAULT_LAYERS,
    trunk_layer: int = DEFAULT_TRUNK_LAYER,
    tuned_layers: int = DEFAULT_TUNED_LAYERS,
    tune: TuneSettings | None = None,
    seed: int = 0,
) -> tuple[PairFeaturizer, TuneSettings | None]:
    """The featurizer a head reads from, and the tuned head's settings (``None`` for a linear head).

    Args:
        head: ``"tuned"``: the backbone's decoder layers ``trunk_layer + 1 .. trunk_layer +
            tuned_layers`` are fine-tuned with a linear head on cached trunk states
            (:mod:`antidote_pl.judges.lm.tuned`). ``"linear"``: a logistic regression on frozen pooled
            features of ``layers`` (minutes once features are cached, about 2 points lower).
        backbone, max_length, question_max_tokens, batch_size: See :class:`PairFeaturizer`.
        layers: The linear head's candidate decoder layers (1-based).
        trunk_layer: The tuned head's frozen trunk depth (its states are cached).
        tuned_layers: How many decoder layers after the trunk are fine-tuned.
        tune: The tuned head's training settings (default :class:`TuneSettings`; its seed is
            replaced by ``seed``).
        seed: The tuned head's training seed.

    Raises:
        ConfigError: on an unknown head or a bad layer number, before anything loads.
    """
    if head not in HEADS:
        raise bad_value("head", head, f"one of {', '.join(HEADS)}")
    if head == "linear":
        return PairFeaturizer(backbone, max_length, question_max_tokens, layers, batch_size), None
    check_int("trunk_layer", trunk_layer, 1)
    check_int("tuned_layers", tuned_layers, 1)
    featurizer = PairFeaturizer(
        backbone, max_length, question_max_tokens, [trunk_layer], batch_size, tail_layers=tuned_layers
    )
    return featurizer, replace(tune or TuneSettings(), seed=seed)


def _train_and_measure(
    featurizer: PairFeaturizer,
    identity: dict[str, Any],
    files: list[dict[str, Any]],
    split: dict[str, Any],
    cache: Path | None,
    say: Callable[[str], None],
    tune: TuneSettings | None = None,
) -> tuple[LinearHead | TunedHead, float, dict[str, Any], dict[str, Any]]:
    """Backbone outputs, the head (linear, or tuned when ``tune`` is given; chosen on validation)
    and every judge's held-out agreement."""
    pool = _pool(files)
    names = ("train", "validation", "heldout")
    parts = dict(
        zip(
            names,
            grouped_split(pool["questions"], split["heldout_fraction"], split["val_fraction"], split["seed"]),
        )
    )
    _check_parts(pool["gold"], parts)
    clock = time.time()
    one_file = cached_features if tune is None else cached_token_states
    outputs, from_cache = outputs_of_files(one_file, featurizer, files, identity["sha256"], cache, say)
    seconds = {"features": round(time.time() - clock, 1), "features_from_cache": from_cache}
    clock = time.time()
    test = parts["heldout"]
    if tune is None:
        feats = torch.cat(outputs)
        head, threshold, selection = train_head(
            feats, pool["labels"], parts["train"], parts["validation"], len(featurizer.layers)
        )
        heldout_probs = head.probabilities(feats[test])
    else:
        tokens = TokenStates.cat(outputs)
        head, threshold, selection = train_tuned_head(
            featurizer, tokens, pool["labels"], parts["train"], parts["validation"], tune, say
        )
        heldout_probs = tuned_probabilities(
            head, tokens, test.nonzero().squeeze(-1), featurizer.batch_size, tune.precision
        )
    seconds["head_selection"] = round(time.time() - clock, 1)
    preds = {"lm_judge": heldout_probs > threshold}
    preds |= _other_judges(pool["questions"], pool["answers"], pool["labels"], test, split)
    majority = bool(pool["gold"][parts["train"] | parts["validation"]].float().mean() >= 0.5)
    report = {
        "heldout": _heldout_agreement(preds, pool["gold"][test], pool["source"][test], files, majority),
        "validation": {k: v for k, v in selection.items() if k != "grid"},
        **_data_report(files, pool["questions"], parts, split),
        "seconds": seconds,
    }
    return head, threshold, selection, report


def _pool(files: list[dict[str, Any]]) -> dict[str, Any]:
    """Every file's rows as one pool: questions, answers, labels, gold (bool) and source file index."""
    labels = [y for f in files for y in f["labels"]]
    return {
        "questions": [q for f in files for q in f["questions"]],
        "answers": [a for f in files for a in f["answers"]],
        "labels": labels,
        "gold": torch.tensor([bool(y) for y in labels]),
        "source": torch.tensor([k for k, f in enumerate(files) for _ in f["labels"]]),
    }


def _data_report(
    files: list[dict[str, Any]], questions: list[str], parts: dict[str, torch.Tensor], split: dict[str, Any]
) -> dict[str, Any]:
    """The split (by question, with its sizes) and the data files behind the figures."""
    return {
        "split": {"by": "question", **split, **_split_sizes(questions, parts)},
        "data": [
            {k: f[k] for k in ("path", "sha256", "rows_in_file")} | {"rows_used": len(f["rows"])}
            for f in files
        ],
    }


def _judge_meta(
    featurizer: PairFeaturizer,
    identity: dict[str, Any],
    head: LinearHead | TunedHead,
    threshold: float,
    selection: dict,
) -> dict[str, Any]:
    """What :class:`LMJudge` needs to load the head and check its backbone."""
    if isinstance(head, TunedHead):
        (trunk,) = featurizer.layers
        settings = featurizer.token_settings
        described = {
            "kind": "tuned",
            "trunk_layer": trunk,
            "tuned_layers": list(range(trunk + 1, trunk + featurizer.tail_layers + 1)),
            "training": selection["training"],
        }
    else:
        settings = featurizer.settings
        described = {
            "kind": "linear",
            "layer_index": head.layer_index,
            "layers": [featurizer.layers[k] for k in head.layer_index],
        }
    return {
        "kind": "LMJudge",
        "settings": settings,
        "backbone": {"spec": featurizer.backbone, "sha256": identity["sha256"]},
        "head": described,
        "threshold": threshold,
        "feature_version": FEATURE_VERSION,
        "validation_grid": selection.get("grid"),
    }


def _save_judge(
    out, head: LinearHead | TunedHead, meta: dict, report: dict, *, overwrite, inputs, lock
) -> None:
    """Head weights, metadata and agreement figures, written together or not at all."""
    with atomic_dir(
        out, field="out", overwrite=overwrite, flag="--overwrite", kind="judge", inputs=inputs, lock=lock
    ) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / META_FILE, meta)
        atomic_write_json(tmp / AGREEMENT_FILE, report)


def _other_judges(
    questions: list[str],
    answers: list[str],
    labels: list[int],
    test: torch.Tensor,
    split: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The keyword and n-gram judges' verdicts on exactly the held-out rows.

    The OfflineJudge's own split is the same ``heldout_mask`` calls, so it trains on the LM judge's
    training rows, chooses its threshold on the same validation questions (as the LM judge does)
    and holds out the same rows: the figures compare like with like.
    """
    offline = OfflineJudge.from_pairs(
        questions,
        answers,
        labels,
        heldout_fraction=split["heldout_fraction"],
        val_fraction=split["val_fraction"],
        seed=split["seed"],
    )
    test_idx = test.nonzero().squeeze(-1).tolist()
    test_q, test_a = [questions[i] for i in test_idx], [answers[i] for i in test_idx]
    return {
        "keyword_judge": torch.tensor([v.harmful for v in KeywordJudge()(test_q, test_a)]),
        "offline_judge": offline.probabilities(test_q, test_a) > offline.threshold,
    }


def _heldout_agreement(
    preds: dict[str, torch.Tensor],
    gold: torch.Tensor,
    source: torch.Tensor,
    files: list[dict[str, Any]],
    majority: bool,
) -> dict[str, Any]:
    """Each judge's agreement with the labels (overall and per file) and the judges' pairwise agreement."""
    heldout: dict[str, Any] = {name: binary_agreement(p, gold, majority) for name, p in preds.items()}
    lm, keyword, offline = preds["lm_judge"], preds["keyword_judge"], preds["offline_judge"]
    heldout["pairwise_agreement"] = {
        "lm_vs_keyword": _rate(lm, keyword),
        "lm_vs_offline": _rate(lm, offline),
        "keyword_vs_offline": _rate(keyword, offline),
    }
    heldout["by_file"] = {
        f["path"]: {name: binary_agreement(p[source == k], gold[source == k]) for name, p in preds.items()}
        for k, f in enumerate(files)
        if bool((source == k).any())
    }
    return heldout


def _split_sizes(questions: list[str], parts: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rows and distinct questions per part of the grouped split."""
    sizes = {f"n_{name}": int(m.sum()) for name, m in parts.items()}
    for name, m in parts.items():
        sizes[f"questions_{name}"] = len({questions[i] for i in m.nonzero().squeeze(-1).tolist()})
    return sizes
