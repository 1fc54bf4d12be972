"""Applying removal masks (True = remove), reporting realised fractions, and safetensors I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from antidote_pl.errors import ConfigError
from antidote_pl.pruning.targets import TargetInfo, lora_delta_weight
from antidote_pl.utils.io import atomic_file


def check_mask_shapes(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """Checks that every mask names an existing tensor of the same shape.

    Args:
        masks: Masks keyed by parameter name (parameter layout).
        params: Tensors keyed by name, e.g. ``dict(model.named_parameters())``; extra names are fine.

    Raises:
        ConfigError: Naming the first offending tensor and both shapes (or the missing name).
    """
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(
                f"mask {name}: no such parameter ({len(params)} parameters, e.g. {list(params)[:2]}); "
                "masks must be keyed by model.named_parameters() names of the same model."
            )
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"mask {name}: shape {tuple(mask.shape)} does not match parameter shape "
                f"{tuple(params[name].shape)}."
            )


@torch.no_grad()
def apply_masks_(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zeroes the masked entries of each named tensor in place (hard zeroing, no rescaling).

    All shapes are checked before anything is modified.
    """
    check_mask_shapes(masks, params)
    for name, mask in masks.items():
        param = params[name]
        param.masked_fill_(mask.to(device=param.device, dtype=torch.bool), 0)


@torch.no_grad()
def masked_delta_merge_(
    base_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    mask: torch.Tensor,
    fan_in_fan_out: bool = False,
) -> None:
    """Merges the masked LoRA update into the base weight: ``W ← W + (scale·B@A) ⊙ ¬mask``.

    The update is formed in fp32 and cast once to the weight's dtype. The adapter itself must then stop
    contributing (see :func:`apply_target_masks_`), otherwise the update is counted twice.

    Args:
        base_weight: Base layer weight, ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``).
        lora_a: ``[r, in]``.
        lora_b: ``[out, r]``.
        scale: peft's ``scaling[adapter]``.
        mask: True = do not merge this entry (it keeps the pre-fine-tuning value); ``base_weight``'s
            layout.
        fan_in_fan_out: True for transposed base layers (transformers ``Conv1D``).
    """
    delta = lora_delta_weight(lora_a, lora_b, scale)
    if fan_in_fan_out:
        delta = delta.t()
    if tuple(mask.shape) != tuple(base_weight.shape) or delta.shape != base_weight.shape:
        raise ConfigError(
            f"masked_delta_merge_: base weight {tuple(base_weight.shape)}, update {tuple(delta.shape)} and "
            f"mask {tuple(mask.shape)} must share one shape."
        )
    delta = delta.to(base_weight.device).masked_fill_(mask.to(base_weight.device, torch.bool), 0)
    base_weight.add_(delta.to(base_weight.dtype))


@torch.no_grad()
def apply_target_masks_(targets: Mapping[str, TargetInfo], masks: Mapping[str, torch.Tensor]) -> None:
    """Applies parameter-layout masks to discovered targets, whatever their kind.

    LoRA factor and linear targets are zeroed in place. ``lora_delta`` targets merge the masked update
    into the base weight and then zero the adapter's ``lora_B``, so the model computes
    ``W + (scale·B@A) ⊙ ¬mask`` while keeping its peft structure.

    Raises:
        ConfigError: Unknown mask names or shape mismatches, before anything is modified.
    """
    unknown = [n for n in masks if n not in targets]
    if unknown:
        raise ConfigError(f"masks {unknown[:3]}: not among the {len(targets)} discovered targets.")
    check_mask_shapes(masks, {n: targets[n].param for n in masks})
    for name, mask in masks.items():
        info = targets[name]
        if info.kind != "lora_delta":
            apply_masks_({name: info.param}, {name: mask})
            continue
        layer, adapter = info.lora_layer, info.adapter_name
        lora_b = layer.lora_B[adapter].weight
        masked_delta_merge_(
            info.param, layer.lora_A[adapter].weight, lora_b, layer.scaling[adapter], mask, info.transposed
        )
        lora_b.zero_()


def realised_fractions(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of entries removed per tensor (log it: per-row rounding makes it differ from α)."""
    return {name: float(m.sum()) / max(m.numel(), 1) for name, m in masks.items()}


def overall_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of entries removed over all tensors together."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / max(total, 1)


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Saves tensors (CPU copies) with safetensors through a temporary file and an atomic rename.

    Bool masks are stored as safetensors ``BOOL`` and reload bit-identical.

    Args:
        path: Destination ``.safetensors`` file; parent directories are created.
        tensors: Name → tensor. Copies are taken, so views of one buffer are fine.
        metadata: Optional string → string header metadata.
    """
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(cpu, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Loads a safetensors file written by :func:`save_tensors` (no pickle involved)."""
    return load_file(str(path), device=str(device))
