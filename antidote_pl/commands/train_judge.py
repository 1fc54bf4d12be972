"""``train-judge lm`` and ``train-judge ngram``: train a hub-free harmfulness judge on labelled pairs.

::

    python -m antidote_pl train-judge lm --output_dir outputs/judges/smollm2
    python -m antidote_pl train-judge ngram --output_dir outputs/offline_judge \\
        --train_csv ../shared/data/judge_labelled/jailbreakeval/Safe-RLHFmini.csv

``lm`` is the SmolLM2 judge (:mod:`antidote_pl.judges.lm`, minutes to an hour on CPU), ``ngram`` the
hashed n-gram logistic regression (:mod:`antidote_pl.judges.offline`, seconds). Both print their
held-out agreement as JSON and store it beside the weights; a config uses the result as
``antidote_pl.judges.lm.LMJudge`` / ``antidote_pl.judges.offline.OfflineJudge`` with ``path``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from antidote_pl.commands.args import command_parser, subcommand_parser
from antidote_pl.errors import bad_value, check_int
from antidote_pl.judges.lm.featurizer import DEFAULT_BACKBONE, DEFAULT_LAYERS, DEFAULT_MAX_LENGTH
from antidote_pl.judges.lm.heads import HeadKind
from antidote_pl.judges.lm.training import (
    DEFAULT_CACHE_DIR,
    DEFAULT_TRAIN_CSVS,
    DEFAULT_TRUNK_LAYER,
    DEFAULT_TUNED_LAYERS,
    train_judge,
)
from antidote_pl.judges.lm.tuned import Precision, TuneSettings
from antidote_pl.judges.offline import OfflineJudge, load_labelled_csv
from antidote_pl.utils.console import print_result, say
from antidote_pl.utils.io import OutputLock, check_output_dir

HELP = "train a hub-free harmfulness judge on labelled pairs: lm (SmolLM2) or ngram (seconds)"


def build_parser() -> ArgumentParser:
    """``train-judge`` with its two kinds as subcommands."""
    parser = command_parser("train-judge", __doc__.split("\n\n")[0])
    kinds = parser.add_subcommands()
    kinds.add_subcommand("lm", _lm_parser(), help="the SmolLM2 judge (antidote_pl.judges.lm.LMJudge)")
    kinds.add_subcommand("ngram", _ngram_parser(), help="the n-gram judge (antidote_pl.judges.offline)")
    return parser


def _lm_parser() -> ArgumentParser:
    parser = subcommand_parser("Trains an LMJudge, saves it and prints its held-out agreement as JSON.")
    parser.add_argument(
        "--output_dir", type=str, required=True, help="where to save the judge (new or empty)"
    )
    parser.add_argument(
        "--train_csv",
        type=list[str] | None,
        default=None,
        help="labelled CSVs (question, answer/Response, label 1 = harmful), e.g. --train_csv+ a.csv "
        "(default: GPTFuzz, Safe-RLHFmini and the JailbreakEval example from ../shared/data)",
    )
    parser.add_argument("--backbone", type=str, default=DEFAULT_BACKBONE, help="GGUF spec or local model dir")
    parser.add_argument(
        "--head",
        type=HeadKind,
        default="tuned",
        help="tuned: fine-tune decoder layers after a cached frozen trunk; "
        "linear: logistic regression on frozen pooled features of --layers",
    )
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--question_max_tokens", type=int, default=48)
    parser.add_argument(
        "--layers",
        type=list[int] | None,
        default=None,
        help=f"linear head only: layers (default {DEFAULT_LAYERS})",
    )
    parser.add_argument(
        "--trunk_layer",
        type=int | None,
        default=None,
        help=f"tuned head only: trunk depth (default {DEFAULT_TRUNK_LAYER})",
    )
    parser.add_argument(
        "--tuned_layers",
        type=int | None,
        default=None,
        help=f"tuned head only: layers tuned (default {DEFAULT_TUNED_LAYERS})",
    )
    tune = TuneSettings()
    parser.add_argument("--epochs", type=float, default=tune.epochs, help="tuned head: training epochs")
    parser.add_argument("--lr", type=float, default=tune.lr, help="tuned head: decoder layers' learning rate")
    parser.add_argument("--head_lr", type=float, default=tune.head_lr, help="tuned head: linear part's rate")
    parser.add_argument("--precision", type=Precision, default=tune.precision, help="tuned head: autocast")
    parser.add_argument("--heldout_fraction", type=float, default=0.2)
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit_per_file", type=int | None, default=None, help="seeded subsample per file")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    parser.add_argument(
        "--cache_dir", type=str | None, default=str(DEFAULT_CACHE_DIR), help="feature cache; null disables"
    )
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an earlier judge there")
    return parser


def _ngram_parser() -> ArgumentParser:
    parser = subcommand_parser("Trains an OfflineJudge, saves it and prints its held-out agreement as JSON.")
    parser.add_argument("--train_csv", type=str, required=True, help="labelled CSV (question, answer, label)")
    parser.add_argument(
        "--output_dir", type=str, required=True, help="where to save the judge (new or empty)"
    )
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an earlier judge there")
    parser.add_argument(
        "--eval_csv", type=list[str], default=[], help="extra labelled CSVs to report (--eval_csv+ x.csv)"
    )
    parser.add_argument("--heldout_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str]) -> dict[str, Any]:
    """Trains the judge of the chosen kind; prints and returns its agreement report."""
    cfg = build_parser().parse_args(argv)
    report = _train_lm(cfg.lm) if cfg.subcommand == "lm" else _train_ngram(cfg.ngram)
    print_result(json.dumps(report, indent=2))
    return report


#: The layer flags each head reads; the other head's are refused, never silently ignored.
HEAD_FLAGS = {"linear": ("layers",), "tuned": ("trunk_layer", "tuned_layers")}


def _head_layers(args: Namespace) -> dict[str, Any]:
    """``layers``, ``trunk_layer`` and ``tuned_layers`` for :func:`train_judge` (defaults filled in).

    Raises:
        ConfigError: when a flag of the other head is given (e.g. ``--layers`` with the tuned head).
    """
    for head, flags in HEAD_FLAGS.items():
        given = [f for f in flags if args[f] is not None]
        if head != args.head and given:
            raise bad_value(
                f"--{given[0]}", args[given[0]], f"unset with --head {args.head} (it sets the {head} head)"
            )
    layers = list(DEFAULT_LAYERS) if args.layers is None else args.layers
    trunk = DEFAULT_TRUNK_LAYER if args.trunk_layer is None else args.trunk_layer
    tuned = DEFAULT_TUNED_LAYERS if args.tuned_layers is None else args.tuned_layers
    return {"layers": layers, "trunk_layer": trunk, "tuned_layers": tuned}


def _train_lm(args: Namespace) -> dict[str, Any]:
    check_int("--threads", args.threads, 1)
    head_layers = _head_layers(args)
    tune = TuneSettings(
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    torch.set_num_threads(args.threads)
    train_csvs = args.train_csv or [str(p) for p in DEFAULT_TRAIN_CSVS]
    # Checked and locked before the backbone loads, so a bad --output_dir costs nothing.
    check_output_dir(
        args.output_dir, "--output_dir", overwrite=args.overwrite, inputs={"train_csv": train_csvs}
    )
    cache_dir = None if args.cache_dir is None or args.cache_dir.lower() == "none" else args.cache_dir
    with OutputLock(args.output_dir, "--output_dir") as lock:
        return train_judge(
            args.output_dir,
            train_csvs,
            backbone=args.backbone,
            head=args.head,
            max_length=args.max_length,
            question_max_tokens=args.question_max_tokens,
            **head_layers,
            tune=tune,
            heldout_fraction=args.heldout_fraction,
            val_fraction=args.val_fraction,
            seed=args.seed,
            limit_per_file=args.limit_per_file,
            batch_size=args.batch_size,
            cache_dir=cache_dir,
            overwrite=args.overwrite,
            lock=lock,
            log=say,
        )


def _train_ngram(args: Namespace) -> dict[str, Any]:
    inputs = {"train_csv": args.train_csv, "eval_csv": args.eval_csv}
    # Checked and locked before training, so a bad --output_dir costs nothing.
    check_output_dir(args.output_dir, "--output_dir", overwrite=args.overwrite, inputs=inputs)
    with OutputLock(args.output_dir, "--output_dir") as lock:
        judge = OfflineJudge(train_csv=args.train_csv, heldout_fraction=args.heldout_fraction, seed=args.seed)
        judge.save(args.output_dir, overwrite=args.overwrite, inputs=inputs, lock=lock)
    report = {"heldout": judge.agreement}
    for path in args.eval_csv:
        report[path] = judge.evaluate(*load_labelled_csv(path))
    return report
