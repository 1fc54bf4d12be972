"""Post-fine-tuning pruning callbacks (Antidote and its ablations).

When ``fit`` ends, the callback scores the target weights, zeroes the top fraction ``alpha`` and hands
its report and artefacts (``mask.safetensors``, ``mask.json``, optional scores; see
:mod:`antidote_pl.pruning.artifacts`) to the module, which alone writes the pruned stage (Hugging Face
format) to ``model.output_dir`` or the callback's ``output_dir``. With ``trainer.max_epochs: 0`` it
repairs an already fine-tuned adapter without training::

    python -m antidote_pl fit --config configs/tiny/repair.yaml
    python -m antidote_pl fit --config configs/tiny/repair.yaml --config callbacks/random.yaml

The math lives in :mod:`antidote_pl.pruning`; this module is glue: device placement, DDP sharding and
all-reduce, timing and artefacts.

Why ``on_fit_end``: the design card asks for it, and it runs after every ``ModelCheckpoint`` write,
so the pruned weights reach only the stage output, written after it by the module. By then
Lightning has torn down the DDP wrapper and, on GPU, moved the module to CPU, so the module is moved
back to ``trainer.strategy.root_device`` first. The process group is still up, so statistics are
all-reduced there and every rank derives the same mask.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from antidote_pl.data.records import fingerprint_records
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_int, check_number
from antidote_pl.pruning import (
    SCOPES,
    STATISTICS,
    TARGET_KINDS,
    apply_target_masks_,
    collect,
    contrast_statistic,
    contrastive_scores,
    find_targets,
    magnitude_scores,
    masks_for_alphas,
    overall_fraction,
    random_masks,
    random_scores,
    realised_fractions,
    run_calibration,
    target_weights,
    to_param_layout,
    wanda_scores,
)
from antidote_pl.pruning.artifacts import alpha_key, targets_fingerprint, write_artifacts
from antidote_pl.pruning.select import RANDOM_SCOPES, check_alpha
from antidote_pl.pruning.stats import DEFAULT_DECISIVE_TOKENS, TOKEN_MASKS
from antidote_pl.pruning.targets import merged_param_name
from antidote_pl.utils.console import say

log = logging.getLogger(__name__)

CALIBRATION_SETS = ("realignment", "task")


class BasePruneCallback(Callback):
    """Scores target weights at the end of fit, removes the top ``alpha`` and saves the result.

    Subclasses implement :meth:`compute_masks` (or :meth:`compute_scores` for score-based methods).

    Args:
        alpha: Fraction of target weights removed, in (0, 1).
        target: ``lora`` (the fine-tuning LoRA's A and B, official), ``lora_delta`` (the effective
            update scale*B*A) or ``linear`` (weights of a fully fine-tuned model).
        scope: ``row`` (per output row, official), ``matrix``, ``layer`` (per transformer layer, each
            LoRA factor apart) or ``global``.
        include: Optional module-name substrings restricting the targets.
        adapter_name: peft adapter to prune.
        output_dir: Where masks and the pruned model go; defaults to the model's ``output_dir``.
        save_scores: Also save the scores (``scores.safetensors``) so other alphas can be swept
            without another forward pass.
        sweep_alphas: Also save the masks of these alphas (``sweep_masks.safetensors``, with the
            callback's own alpha), all computed from this one scoring by the function that computes
            the applied mask; read them with :class:`~antidote_pl.pruning.artifacts.RepairArtifacts`.
    """

    method = "base"

    def __init__(
        self,
        alpha: float = 0.1,
        target: str = "lora",
        scope: str = "row",
        include: list[str] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
        save_scores: bool = False,
        sweep_alphas: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha, "alpha")
        self.sweep_alphas = _check_sweep(sweep_alphas)
        check_choice("target", target, TARGET_KINDS)
        check_choice("scope", scope, SCOPES)
        self.target = target
        self.scope = scope
        self.include = include
        self.adapter_name = adapter_name
        self.output_dir = output_dir
        self.save_scores = save_scores
        self.report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ extension points
    def compute_scores(
        self, trainer: L.Trainer, pl_module: L.LightningModule, targets
    ) -> dict[str, torch.Tensor]:
        """Row-layout scores per target (larger = removed first)."""
        raise NotImplementedError

    def compute_masks(
        self, trainer: L.Trainer, pl_module: L.LightningModule, targets
    ) -> tuple[dict[float, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
        """Row-layout boolean masks (True = remove) for every alpha of :attr:`mask_alphas`, from one
        scoring, and the scores behind them (or ``None``)."""
        scores = self.compute_scores(trainer, pl_module, targets)
        return masks_for_alphas(scores, self.mask_alphas, self.scope), scores

    @property
    def mask_alphas(self) -> list[float]:
        """The alphas whose masks are computed: the callback's own and its ``sweep_alphas``."""
        return sorted({self.alpha, *(self.sweep_alphas or [])})

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``mask.json``."""
        # Target selection is recorded too, so saved scores can be mapped back onto the same tensors.
        return {
            "method": self.method,
            "alpha": self.alpha,
            "target": self.target,
            "scope": self.scope,
            "include": self.include,
            "adapter_name": self.adapter_name,
            "sweep_alphas": self.sweep_alphas,
        }

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not (hasattr(pl_module, "model") and hasattr(pl_module, "add_to_stage")):
            raise ConfigError(
                f"{type(self).__name__} needs a module with `.model` and `add_to_stage` (e.g. "
                f"CausalLMSFTModule), got {type(pl_module).__name__}."
            )
        if (
            stage == "fit"
            and self.output_dir is None
            and getattr(pl_module.hparams, "output_dir", None) is None
        ):
            raise bad_value(
                f"{type(self).__name__}.output_dir", None, "a directory (or set model.output_dir)"
            )
        if stage == "fit":
            # Fail now, not after training: targets must exist in the model.
            find_targets(pl_module.model, self.target, self.adapter_name, self.include)
        if stage == "fit" and self.output_dir is not None and hasattr(pl_module, "claim_output"):
            # Our own output is checked and locked now too, like the model's output_dir.
            field = f"{type(self).__name__}.output_dir"
            pl_module.claim_output(self.output_dir, field, take_lock=trainer.is_global_zero)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.to(trainer.strategy.root_device)
        targets = find_targets(pl_module.model, self.target, self.adapter_name, self.include)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        by_alpha, scores = self.compute_masks(trainer, pl_module, targets)
        seconds = time.perf_counter() - start
        masks = by_alpha[self.alpha]
        param_masks = to_param_layout(masks, targets)
        # Fingerprints of the targets before and after: saved scores are only ever swept on the
        # adapter they were computed on, and a saved stage is checked against its own masks.
        scored = targets_fingerprint({n: t.param for n, t in targets.items()})
        apply_target_masks_(targets, param_masks)
        self.report = {
            **self.describe(),
            "device": str(device),
            "world_size": trainer.world_size,
            "num_targets": len(targets),
            "removed_fraction": overall_fraction(masks),
            "per_tensor_fraction": realised_fractions(masks),
            "scoring_seconds": seconds,
            "peak_memory_bytes": _peak_memory(device),
            "scored_fingerprint": scored,
            "pruned_fingerprint": targets_fingerprint({n: t.param for n, t in targets.items()}),
            **self.extra_report(trainer),
        }
        sweep = None
        if self.sweep_alphas:
            sweep = {a: to_param_layout(m, targets) for a, m in by_alpha.items()}
            fractions = {alpha_key(a): overall_fraction(m) for a, m in by_alpha.items()}
            self.report["sweep_removed_fraction"] = fractions
        param_scores = to_param_layout(scores, targets) if scores is not None and self.save_scores else None
        self._hand_over(pl_module, param_masks, param_scores, sweep)
        say(
            f"{type(self).__name__}: removed {self.report['removed_fraction']:.4f} of {len(targets)} "
            f"target tensors in {seconds:.2f}s"
        )

    def _hand_over(self, pl_module, param_masks, param_scores, sweep) -> None:
        """Gives the report and the artefact writer to the module, which alone saves the stage."""
        # Weights outside the adapter changed (a masked update merged into the base, or base
        # linears pruned): an adapter-only save would drop them, so the merged model is saved.
        merge = self.target != "lora" and getattr(pl_module, "is_peft", False)
        self.report["merged_adapter"] = merge
        # Masks are saved under the names of the model as saved (merged names for a merged save);
        # scores and sweep masks keep the pruned model's names, which is where sweeps apply them.
        saved_masks = {merged_param_name(n): m for n, m in param_masks.items()} if merge else param_masks
        report = self.report
        pl_module.add_to_stage(
            metadata={"pruning": report},
            files=lambda tmp: write_artifacts(tmp, saved_masks, param_scores, report, sweep),
            output_dir=self.output_dir,
            merge_adapter=merge,
        )

    def extra_report(self, trainer: L.Trainer) -> dict[str, Any]:
        """Method-specific entries for ``mask.json``."""
        return {}


class WandaPruneCallback(BasePruneCallback):
    """Antidote: Wanda scores ``|W| * ||X||_2`` over a calibration set, top ``alpha`` removed.

    Args:
        calibration: ``realignment`` (harmful samples, Antidote) or ``task`` (benign task data, the
            paper's "no harmful dataset" ablation).
        statistic: ``sample_mean`` (official), ``token_mean`` or ``sample_token_mean``.
        token_mask: ``attention`` (every real token, official), ``response`` (response tokens only)
            or ``decisive`` (the prompt and the first ``decisive_tokens`` response tokens).
        batch_size: Calibration batch size (default: the DataModule's).
        protect_fraction: Never remove weights in the top fraction of a second Wanda score computed on
            the task calibration set ("harm minus utility" variant); 0 disables.
        contrast_lambda: Subtractive contrast: rank by ``S_calibration − λ·S_task``, the second a
            Wanda score of the same targets on the task calibration set; 0 disables. Both scores
            use a *per-token* statistic (``sample_mean`` becomes ``token_mean``, i.e. each set's
            per-sample statistic divided by its mean tokens per sample; see
            :func:`~antidote_pl.pruning.scores.contrast_statistic`), so ``λ`` weighs a benign token
            against a harmful one whatever the two sets' lengths: with per-sample statistics a set
            of 108 tokens per sample against one of 60 turned ``λ = 1`` into about 0.75 per token.
        decisive_tokens: With ``token_mask: decisive``, the response tokens per sample counted
            besides the prompt (where a refusal or a compliance is decided).
        **kwargs: See :class:`BasePruneCallback`.
    """

    method = "wanda"

    def __init__(
        self,
        alpha: float = 0.1,
        target: str = "lora",
        scope: str = "row",
        include: list[str] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
        save_scores: bool = False,
        calibration: str = "realignment",
        statistic: str = "sample_mean",
        token_mask: str = "attention",
        batch_size: int | None = None,
        protect_fraction: float = 0.0,
        sweep_alphas: list[float] | None = None,
        contrast_lambda: float = 0.0,
        decisive_tokens: int = DEFAULT_DECISIVE_TOKENS,
    ) -> None:
        super().__init__(alpha, target, scope, include, adapter_name, output_dir, save_scores, sweep_alphas)
        check_choice("calibration", calibration, CALIBRATION_SETS)
        check_choice("statistic", statistic, STATISTICS)
        check_choice("token_mask", token_mask, TOKEN_MASKS)
        if batch_size is not None and batch_size <= 0:
            raise bad_value("batch_size", batch_size, "a positive integer or null")
        if not 0.0 <= protect_fraction < 1.0:
            raise bad_value("protect_fraction", protect_fraction, "a number in [0, 1)")
        check_number("contrast_lambda", contrast_lambda, low=0.0)
        check_int("decisive_tokens", decisive_tokens, 0)
        self.calibration = calibration
        self.statistic = statistic
        self.token_mask = token_mask
        self.batch_size = batch_size
        self.protect_fraction = protect_fraction
        self.contrast_lambda = float(contrast_lambda)
        self.decisive_tokens = decisive_tokens
        self._calibration_counts: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "calibration": self.calibration,
            "statistic": self.statistic,
            "token_mask": self.token_mask,
            "protect_fraction": self.protect_fraction,
            "contrast_lambda": self.contrast_lambda,
            # The statistic both sides of the contrast were compared on (None without a contrast).
            "contrast_statistic": contrast_statistic(self.statistic) if self.contrast_lambda > 0 else None,
            "decisive_tokens": self.decisive_tokens if self.token_mask == "decisive" else None,
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        sets = [self.calibration] + (["task"] if self._needs_task_scores else [])
        for name in sets:
            records = _calibration_records(trainer, name)
            if not records:
                raise bad_value(f"data ({name} set)", 0, "at least one calibration sample for Wanda scoring")

    def _statistics(self, trainer: L.Trainer, model: torch.nn.Module, targets, which: str):
        loader = _calibration_loader(trainer, which, self.batch_size)
        rank, world = trainer.global_rank, trainer.world_size
        # Each rank scores its shard of batches; sums and counts are then all-reduced, so every
        # rank holds the statistics of the whole set and derives the same mask.
        shard = (b for i, b in enumerate(loader) if i % world == rank)
        with collect(model, targets, device=trainer.strategy.root_device) as stats:
            run_calibration(
                model,
                shard,
                stats,
                token_mask=self.token_mask,
                device=trainer.strategy.root_device,
                decisive_tokens=self.decisive_tokens,
            )
        if world > 1 and dist.is_available() and dist.is_initialized():
            stats.all_reduce_()
        self._calibration_counts[which] = int(max(stats.n_samples.values(), default=0))
        return stats

    @property
    def _needs_task_scores(self) -> bool:
        """Whether a second Wanda score on the task calibration set is needed."""
        return self.protect_fraction > 0 or self.contrast_lambda > 0

    def compute_masks(self, trainer, pl_module, targets):
        model = pl_module.model
        weights = target_weights(targets)
        # The contrast compares per-token statistics (length-independent lambda); the protection
        # ranks the task scores alone, which a factor shared by all targets does not change.
        kind = contrast_statistic(self.statistic) if self.contrast_lambda > 0 else self.statistic
        scores = wanda_scores(weights, self._statistics(trainer, model, targets, self.calibration), kind)
        benign = None
        if self._needs_task_scores:
            benign = wanda_scores(weights, self._statistics(trainer, model, targets, "task"), kind)
        if self.contrast_lambda > 0:
            scores = contrastive_scores(scores, benign, self.contrast_lambda)
        protect = {"protect_scores": benign, "protect_fraction": self.protect_fraction}
        return masks_for_alphas(scores, self.mask_alphas, self.scope, **protect), scores

    def extra_report(self, trainer: L.Trainer) -> dict[str, Any]:
        records = _calibration_records(trainer, self.calibration)

        return {
            "calibration_samples": self._calibration_counts.get(self.calibration, 0),
            "dataset_fingerprint": fingerprint_records(records),
        }


class MagnitudePruneCallback(BasePruneCallback):
    """Ablation: data-free scores ``|W|`` (the official ``--sample_num 0`` fallback)."""

    method = "magnitude"

    def compute_scores(self, trainer, pl_module, targets):
        return magnitude_scores(target_weights(targets))


class RandomPruneCallback(BasePruneCallback):
    """Ablation: remove ``alpha`` of the weights at seeded random positions.

    Args:
        seed: Random seed (recorded in ``mask.json``).
        random_scope: ``row`` (Wanda's per-row budget) or ``tensor`` (official ``random_prune``:
            ``floor(numel * alpha)`` positions over each whole tensor).
        **kwargs: See :class:`BasePruneCallback`.
    """

    method = "random"

    def __init__(
        self,
        alpha: float = 0.1,
        target: str = "lora",
        include: list[str] | None = None,
        adapter_name: str = "default",
        output_dir: str | None = None,
        save_scores: bool = False,
        seed: int = 0,
        random_scope: str = "row",
        sweep_alphas: list[float] | None = None,
    ) -> None:
        super().__init__(alpha, target, "row", include, adapter_name, output_dir, save_scores, sweep_alphas)
        check_choice("random_scope", random_scope, RANDOM_SCOPES)
        self.seed = seed
        self.random_scope = random_scope

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scope": self.random_scope, "seed": self.seed}

    def compute_masks(self, trainer, pl_module, targets):
        weights = target_weights(targets)
        if self.random_scope == "tensor":
            return {a: random_masks(weights, a, "tensor", self.seed) for a in self.mask_alphas}, None
        # Per-row random removal is top-k of seeded random scores, so the scores can be saved and
        # swept over alphas like any other score (same masks as random_masks(..., "row")).
        scores = random_scores(weights, self.seed)
        return masks_for_alphas(scores, self.mask_alphas, "row"), scores


class NoPruneCallback(Callback):
    """Ablation: no pruning. Present so that swapping the callback slot to "none" is explicit."""

    method = "none"


def _check_sweep(sweep_alphas: list[float] | None) -> list[float] | None:
    """Validates ``sweep_alphas`` (null, or a non-empty list of fractions); returns them sorted."""
    if sweep_alphas is None:
        return None
    if not isinstance(sweep_alphas, list | tuple) or not sweep_alphas:
        raise bad_value("sweep_alphas", sweep_alphas, "null or a non-empty list of fractions in (0, 1)")
    return sorted({check_alpha(a, f"sweep_alphas[{i}]") for i, a in enumerate(sweep_alphas)})


def _calibration_records(trainer: L.Trainer, which: str) -> list:
    dm = trainer.datamodule
    attr = "realignment_records" if which == "realignment" else "task_calibration_records"
    if dm is None or not hasattr(dm, attr):
        raise ConfigError(
            f"calibration={which!r} needs a DataModule with `{attr}` (e.g. HarmfulFinetuneDataModule); "
            f"got {type(dm).__name__}."
        )
    return list(getattr(dm, attr))


def _calibration_loader(trainer: L.Trainer, which: str, batch_size: int | None):
    dm = trainer.datamodule
    if which == "realignment":
        return dm.realignment_dataloader(batch_size=batch_size)
    return dm.task_calibration_dataloader(batch_size=batch_size)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: the process's peak resident set (kB on Linux), an upper bound for scoring's own peak.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
