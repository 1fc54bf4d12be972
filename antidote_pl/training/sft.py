"""Supervised fine-tuning stage: alignment, harmful fine-tuning, pretraining and repair.

One LightningModule serves every SFT stage of the pipeline. It loads a causal LM (hub name, local
path or a random-init config), merges earlier stages' LoRA adapters in order, then either attaches a
fresh LoRA, loads an existing adapter as trainable (for repair-only runs), or trains all weights.
At the end of ``fit`` it writes the stage result in Hugging Face format to ``output_dir``.

Run a stage::

    python -m antidote_pl fit --config configs/tiny/align.yaml
"""

from __future__ import annotations

import copy
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from antidote_pl.data.records import data_input_paths
from antidote_pl.defenses.base import Defense
from antidote_pl.errors import bad_value, check_choice
from antidote_pl.models.gguf import gguf_source
from antidote_pl.models.loading import (
    TINY_WORLD,
    base_fingerprint,
    base_weights_record,
    check_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    quiet_peft,
)
from antidote_pl.models.loading import (
    merge_adapters as merge_lora_adapters,
)
from antidote_pl.pruning.targets import default_lora_target_modules
from antidote_pl.utils.console import say
from antidote_pl.utils.files import REALIGNMENT_WINDOW_KEY, STAGE_FILE, relocatable_stage_metadata
from antidote_pl.utils.io import (
    OutputLock,
    atomic_dir,
    atomic_write_json,
    check_apart_from_inputs,
    claim_output_dir,
    real_path,
)

log = logging.getLogger(__name__)

FINETUNING = ("lora", "full")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


class CausalLMSFTModule(L.LightningModule):
    """Causal-LM SFT with cross-entropy on response tokens only.

    Args:
        model_name_or_path: Hub name or local directory of the starting model.
        model_config: Random-init config instead (dict with ``model_type``, or ``"tiny-world"`` /
            ``"tiny-world-fast"``).
        tokenizer: Tokenizer spec; defaults to ``model_name_or_path`` (or ``"tiny-world"``).
        dtype: Weight dtype: ``fp32``, ``bf16`` or ``fp16``.
        merge_adapters: LoRA adapter dirs merged into the weights in order before training
            (e.g. the alignment adapter before harmful fine-tuning).
        adapter_path: An existing adapter loaded as trainable instead of a fresh LoRA (repairing an
            already fine-tuned model; combine with ``trainer.max_epochs: 0``).
        finetuning: ``lora`` (fresh adapter) or ``full`` (train every weight).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scaling = alpha / r).
        lora_dropout: LoRA dropout.
        lora_target_modules: Module leaf names to adapt; ``None`` finds the attention q/k/v
            projections generically.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        betas: AdamW betas.
        scheduler: ``constant``, ``constant_with_warmup``, ``cosine`` or ``linear``.
        warmup_ratio: Fraction of total optimizer steps used for warmup.
        output_dir: Where the stage result goes at the end of fit; ``None`` writes nothing.
        save_merged: Also write the merged full model to ``output_dir/merged`` (LoRA only).
        attn_implementation: Optional transformers attention implementation.
        gradient_checkpointing: Trade compute for memory on large models.
        trust_remote_code: Off by default.
        defense: Optional baseline defense that changes the training step (Vaccine, RepNoise, Lisa,
            LDIFS, ...); see :mod:`antidote_pl.defenses`.
        overwrite: Replace an existing ``output_dir`` that holds an earlier stage output (it must carry
            ``antidote_stage.json``; any other non-empty directory is never replaced).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict | str | None = None,
        tokenizer: str | None = None,
        dtype: str = "fp32",
        merge_adapters: list[str] | None = None,
        adapter_path: str | None = None,
        finetuning: str = "lora",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "constant",
        warmup_ratio: float = 0.0,
        output_dir: str | None = None,
        save_merged: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        defense: Defense | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["defense"])
        self.defense = defense
        _check_args(finetuning, scheduler, warmup_ratio, learning_rate, lora_r, adapter_path)
        if tokenizer is None:
            tokenizer = model_name_or_path if model_name_or_path is not None else TINY_WORLD
        self.tokenizer_spec = tokenizer
        # The output is checked and locked before anything loads: a bad output_dir fails in a
        # second, not after training.
        self.output_locks: dict[Path, OutputLock] = {}
        if output_dir is not None:
            self.claim_output(output_dir, "model.output_dir")
        try:
            self.model = self._build_model()
        except BaseException:
            self.release_output()
            raise
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Checkpoints hold trainable weights only; the frozen base is rebuilt from the config.
        self.strict_loading = False
        self.resolved_config: str | None = None  # set by the CLI so the stage output records it
        # What callbacks add to the stage(s) written at fit end, by output directory (None: ours).
        self.additions: dict[str | None, StageAdditions] = {}

    def _build_model(self) -> torch.nn.Module:
        """Loads the tokenizer and the base, merges earlier adapters, attaches the trained weights."""
        hp = self.hparams
        # Named as the user set it: the tokenizer defaults to model_name_or_path.
        field = "model.tokenizer" if hp.tokenizer is not None else "model.model_name_or_path"
        self.tokenizer = load_tokenizer(self.tokenizer_spec, field=field)
        model = load_causal_lm(
            hp.model_name_or_path,
            hp.model_config,
            dtype=hp.dtype,
            vocab_size=len(self.tokenizer),
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
        )
        self.base_fingerprint = base_fingerprint(model.config)
        model = merge_lora_adapters(model, list(hp.merge_adapters or []))
        # The weights the new adapter is trained on; loaders refuse to put it on other ones.
        self.base_weights = base_weights_record(model, hp.dtype)
        # from_pretrained returns eval mode; Lightning keeps module modes, so LoRA dropout would be off.
        return self._attach_training_params(model).train()

    # ----------------------------------------------------------------- output safety
    def input_paths(self) -> dict[str, Any]:
        """The stage's model inputs, ``field -> path``, which no output may overlap."""
        hp = self.hparams
        return {
            "model.model_name_or_path": hp.model_name_or_path,
            "model.tokenizer": self.tokenizer_spec,
            "model.adapter_path": hp.adapter_path,
            "model.merge_adapters": list(hp.merge_adapters or []),
        }

    def claim_output(self, output_dir: str, field: str, take_lock: bool | None = None) -> OutputLock:
        """Checks that ``output_dir`` may be written by this stage and locks it until the end of fit
        (see :func:`antidote_pl.utils.io.claim_output_dir`).

        Callbacks that save through :meth:`save_stage` to their own directory call it in their
        ``setup`` with ``take_lock=trainer.is_global_zero``.

        Raises:
            ConfigError: for an output that overlaps an input, lies under a file or in an unwritable
                place, holds a non-stage directory, an earlier stage without ``overwrite``, or is
                being written by another run.
        """
        if real_path(output_dir) in self.output_locks:  # e.g. a callback saving to model.output_dir
            return self.output_locks[real_path(output_dir)]
        lock = claim_output_dir(
            output_dir,
            field,
            overwrite=self.hparams.overwrite,
            flag="model.init_args.overwrite",
            marker=STAGE_FILE,
            inputs=self.input_paths(),
            take_lock=take_lock,
        )
        self.output_locks[lock.path] = lock
        return lock

    def release_output(self) -> None:
        """Releases the output locks taken by :meth:`claim_output` (a no-op for those not held)."""
        for lock in self.output_locks.values():
            lock.release()
        self.output_locks.clear()

    # ----------------------------------------------------------------- model set-up
    def _attach_training_params(self, model: torch.nn.Module) -> torch.nn.Module:
        hp = self.hparams
        if hp.finetuning == "full":
            model.requires_grad_(True)
            return model
        from peft import LoraConfig, PeftModel, get_peft_model

        if hp.adapter_path is not None:
            check_adapter_dir(hp.adapter_path, model, "model.adapter_path")
            with quiet_peft():
                return PeftModel.from_pretrained(model, hp.adapter_path, is_trainable=True)

        targets = list(hp.lora_target_modules or default_lora_target_modules(model))
        config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            with quiet_peft():
                return get_peft_model(model, config)
        except ValueError as err:
            raise bad_value(
                "model.lora_target_modules", targets, f"module names present in the model ({err})"
            ) from err

    @property
    def is_peft(self) -> bool:
        """Whether the trained weights are a peft adapter."""
        return hasattr(self.model, "peft_config")

    def trainable_parameter_count(self) -> int:
        """Number of parameters that receive gradients."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ----------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def sft_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy on response tokens (labels are -100 on prompt and padding)."""
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.output_dir is not None and self._trainer is not None:
            # Data files are known only now; checked before any training step.
            data = self.trainer.datamodule
            if data is not None:
                check_apart_from_inputs(self.hparams.output_dir, "model.output_dir", data_input_paths(data))
        if stage == "fit" and self.defense is not None:
            self.defense.attach(self)

    def training_step(self, batch, batch_idx):
        bs = batch["input_ids"].shape[0]
        if self.defense is None:
            loss = self.sft_loss(batch)
        else:
            loss = self.defense.training_step(self, batch, batch_idx)
            for name, value in self.defense.metrics().items():
                self.log(f"train/{self.defense.name}/{name}", value, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.sft_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # As in HF Trainer: no weight decay on biases and normalisation weights.
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        from transformers import get_scheduler

        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_ratio * total)
        scheduler = get_scheduler(hp.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A 7B LoRA checkpoint must not carry the frozen base: keep trainable weights only.
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    # ----------------------------------------------------------------- stage output
    def add_to_stage(
        self,
        metadata: dict[str, Any] | None = None,
        files: Callable[[Path], None] | None = None,
        output_dir: str | None = None,
        merge_adapter: bool = False,
    ) -> None:
        """Adds a callback's results to the stage output this module writes when fit ends.

        Callbacks change parameters and report; the module alone writes (once, on global rank zero),
        so a stage directory never holds a half-annotated copy.

        Args:
            metadata: Merged into ``antidote_stage.json`` (e.g. ``{"pruning": report}``).
            files: Called with the temporary stage directory to add files (e.g. masks).
            output_dir: Write this stage there instead of ``model.output_dir`` (each directory named
                by a callback gets one write; ``model.output_dir`` then gets none).
            merge_adapter: Save the merged full model instead of the adapter, because the callback
                changed weights outside the adapter (e.g. a masked update merged into the base).
        """
        add = self.additions.setdefault(None if output_dir is None else str(output_dir), StageAdditions())
        add.metadata.update(metadata or {})
        if files is not None:
            add.files.append(files)
        add.merge_adapter |= merge_adapter

    def on_fit_end(self) -> None:
        # Callbacks' on_fit_end (e.g. Wanda pruning) run before this hook, so the output holds
        # their result. A callback with its own output_dir replaces ours: one write per directory,
        # never a second, unannotated copy of the same model.
        writes = self.additions or {None: StageAdditions()}
        for out, add in writes.items():
            out = out or self.hparams.output_dir
            if out is None:
                continue
            if self.trainer.is_global_zero:
                self.save_stage(
                    out,
                    extra_metadata=add.metadata,
                    extra_files=add.write_files if add.files else None,
                    merge_adapter=add.merge_adapter,
                )
            self.trainer.strategy.barrier("antidote_pl.save_stage")
        if self.trainer.is_global_zero:
            self.release_output()

    def _data_counts(self) -> dict[str, Any] | None:
        """The realised composition of the training data (e.g. harmful and task counts), if known."""
        data = self.trainer.datamodule if self._trainer is not None else None
        counts = getattr(data, "counts", None)
        return counts() if callable(counts) else None

    def _realignment_window(self) -> dict[str, Any] | None:
        """The realignment window the data module drew or read (see :mod:`antidote_pl.data.window`),
        so the repair stage rebuilds it from this stage's metadata; None for other data modules."""
        data = self.trainer.datamodule if self._trainer is not None else None
        window = getattr(data, "realignment_window", None)
        return window() if callable(window) else None

    def save_stage(
        self,
        output_dir: str,
        extra_metadata: dict[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
        merge_adapter: bool = False,
    ) -> Path:
        """Writes the model in Hugging Face format to ``output_dir``, atomically.

        LoRA stages write the adapter (``save_pretrained``) and, with ``save_merged``, the merged full
        model under ``merged/``; full fine-tuning writes the whole model. The tokenizer, the
        resolved config and ``antidote_stage.json`` (provenance) go beside them.

        Args:
            output_dir: Destination; replaced as a whole only once everything is written, and only
                if it is new, empty, or an earlier stage output with ``overwrite`` set.
            extra_metadata: Merged into ``antidote_stage.json``.
            extra_files: Called with the temporary directory to add files (e.g. pruning masks).
            merge_adapter: For a LoRA stage, write the merged full model (``kind: full_model``,
                ``merged_adapter: true``) instead of the adapter: needed when weights outside the
                adapter were changed, which an adapter-only save would silently drop.

        Raises:
            ConfigError: when ``output_dir`` may not be written (see :meth:`claim_output`).
        """
        with atomic_dir(
            output_dir,
            field="model.output_dir" if str(output_dir) == str(self.hparams.output_dir) else "output_dir",
            overwrite=self.hparams.overwrite,
            flag="model.init_args.overwrite",
            marker=STAGE_FILE,
            inputs=self.input_paths(),
            lock=self.output_locks.get(real_path(output_dir)),
        ) as tmp:
            merged_save = self.is_peft and merge_adapter
            self._write_weights(tmp, merged_save)
            if self.resolved_config is not None:
                (tmp / "config.yaml").write_text(self.resolved_config)
            meta = {**self.stage_metadata(merged_save), **(extra_metadata or {})}
            atomic_write_json(tmp / STAGE_FILE, relocatable_stage_metadata(meta, output_dir))
            if extra_files is not None:
                extra_files(tmp)
        say(f"antidote_pl: stage output written to {output_dir}")
        return Path(output_dir)

    def _write_weights(self, directory: Path, merged_save: bool) -> None:
        """The model (adapter, or merged/full weights) and tokenizer in Hugging Face format."""
        model = copy.deepcopy(self.model).merge_and_unload() if merged_save else self.model
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.is_peft and self.hparams.save_merged and not merged_save:  # else it is the main save
            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(directory / "merged")
            self.tokenizer.save_pretrained(directory / "merged")

    def stage_metadata(self, merged_save: bool = False) -> dict[str, Any]:
        """The provenance written as ``antidote_stage.json``: base, adapters, data, versions.

        Args:
            merged_save: Whether the stage is saved as the merged full model (see :meth:`save_stage`).
        """
        hp = self.hparams
        meta = {
            "kind": "adapter" if self.is_peft and not merged_save else "full_model",
            "merged_adapter": merged_save,
            # Local paths are made absolute here; save_stage records those inside the project
            # relative to the output, so a moved or copied project loads its own stages.
            "base_model": _absolute_if_local(hp.model_name_or_path) or hp.model_config,
            "merged_adapters": [_absolute_if_local(a) for a in hp.merge_adapters or []],
            "base_fingerprint": self.base_fingerprint,
            "base_weights": self.base_weights,
            "data": self._data_counts(),
            # GGUF bases: the portable spec stays in base_model; the file and its sha256 here.
            "base_source": gguf_source(hp.model_name_or_path),
            "tokenizer": self.tokenizer_spec,
            "dtype": hp.dtype,
            # How it was computed: with the thread count and precision a result is bit-reproducible
            # on the same CPU type (antidote_pl.utils.threads).
            "threads": torch.get_num_threads(),
            "precision": str(self.trainer.precision) if self._trainer is not None else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "defense": None if self.defense is None else type(self.defense).__name__,
            "trainable_parameters": self.trainable_parameter_count(),
            "global_step": self.trainer.global_step if self._trainer is not None else None,
            "versions": _library_versions(),
        }
        window = self._realignment_window()
        if window is not None:
            meta[REALIGNMENT_WINDOW_KEY] = window
        return meta


@dataclass
class StageAdditions:
    """Callback results the module writes into its stage output (see ``add_to_stage``)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Callable[[Path], None]] = field(default_factory=list)
    merge_adapter: bool = False

    def write_files(self, directory: Path) -> None:
        """Runs every file writer into ``directory`` (the stage being saved)."""
        for write in self.files:
            write(directory)


def _check_args(
    finetuning: str,
    scheduler: str,
    warmup_ratio: float,
    learning_rate: float,
    lora_r: int,
    adapter_path: str | None,
) -> None:
    """Checks the module's cheap arguments, before any output is claimed or model loaded."""
    check_choice("model.finetuning", finetuning, FINETUNING)
    check_choice("model.scheduler", scheduler, SCHEDULERS)
    if not 0.0 <= warmup_ratio < 1.0:
        raise bad_value("model.warmup_ratio", warmup_ratio, "a number in [0, 1)")
    if learning_rate <= 0:
        raise bad_value("model.learning_rate", learning_rate, "a positive number")
    if finetuning == "lora" and adapter_path is None and lora_r <= 0:
        raise bad_value("model.lora_r", lora_r, "a positive integer")
    if finetuning == "full" and adapter_path is not None:
        raise bad_value("model.adapter_path", adapter_path, "null when model.finetuning is 'full'")


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a stage's result."""
    import transformers  # heavy; imported by the stage anyway, only when saving

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }


def _absolute_if_local(path: str | None) -> str | None:
    """An existing local path made absolute; hub names (and None) unchanged."""
    if path is not None and Path(path).expanduser().exists():
        # Not resolved: through a symlinked outputs/ the path must stay inside the project tree.
        return os.path.abspath(os.path.expanduser(path))
    return path
