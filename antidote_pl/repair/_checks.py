"""Input checks shared by the repair families: matching keys and shapes of tensor mappings.

Every check runs before any arithmetic, so a wrong target name or shape is reported (as a
:class:`ConfigError` naming the target) before memory or time is spent on the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from antidote_pl.errors import ConfigError, bad_value, check_number


def check_nonempty(tensors: Mapping[str, torch.Tensor], field: str) -> None:
    """Raises a :class:`ConfigError` if ``tensors`` holds no target."""
    if not tensors:
        raise bad_value(field, {}, "at least one target tensor")


def check_matching(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    reference_field: str,
    other_field: str,
) -> None:
    """Requires ``other`` to have exactly the targets of ``reference``, each with the same shape.

    Args:
        reference: The mapping whose targets and shapes are authoritative.
        other: The mapping checked against it.
        reference_field: Name of ``reference`` in messages.
        other_field: Name of ``other`` in messages.

    Raises:
        ConfigError: A target missing from either side, or a shape mismatch; the message names it.
    """
    check_nonempty(reference, reference_field)
    for name, ref in reference.items():
        if name not in other:
            raise ConfigError(f"{other_field}[{name}]: missing; {reference_field} has this target.")
        if other[name].shape != ref.shape:
            raise ConfigError(
                f"{other_field}[{name}]: shape {tuple(other[name].shape)} does not match "
                f"{reference_field} shape {tuple(ref.shape)}."
            )
    extra = [name for name in other if name not in reference]
    if extra:
        raise ConfigError(f"{other_field}[{extra[0]}]: not a target of {reference_field}.")


def check_lora_factors(lora_a: Mapping[str, torch.Tensor], lora_b: Mapping[str, torch.Tensor]) -> None:
    """Requires one ``A [r, in]`` and one ``B [out, r]`` per target, with the same rank ``r``.

    Raises:
        ConfigError: Targets that differ between the mappings, a factor that is not 2-D, or ranks
            that disagree; the message names the target.
    """
    check_nonempty(lora_b, "lora_b")
    for name in lora_b:
        if name not in lora_a:
            raise ConfigError(f"lora_a[{name}]: missing; lora_b has this target.")
    for name, a in lora_a.items():
        b = lora_b.get(name)
        if b is None:
            raise ConfigError(f"lora_b[{name}]: missing; lora_a has this target.")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"target {name}: lora_a shape {tuple(a.shape)} and lora_b shape {tuple(b.shape)} "
                "are not A [r, in] and B [out, r] with the same r."
            )


def check_delta_shapes(
    deltas: Mapping[str, torch.Tensor],
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    field: str,
) -> None:
    """Requires each ``[out, in]`` tensor of ``deltas`` to match its target's ``B @ A`` shape.

    Raises:
        ConfigError: Targets that differ between the mappings or a shape mismatch, naming the target.
    """
    check_lora_factors(lora_a, lora_b)
    delta_shapes = {name: torch.Size((b.shape[0], lora_a[name].shape[1])) for name, b in lora_b.items()}
    for name, shape in delta_shapes.items():
        if name not in deltas:
            raise ConfigError(f"{field}[{name}]: missing; the LoRA factors have this target.")
        if deltas[name].shape != shape:
            raise ConfigError(
                f"{field}[{name}]: shape {tuple(deltas[name].shape)} does not match the LoRA delta "
                f"shape {tuple(shape)} (lora_b rows x lora_a columns)."
            )
    extra = [name for name in deltas if name not in delta_shapes]
    if extra:
        raise ConfigError(f"{field}[{extra[0]}]: not a target of the LoRA factors.")


def check_coefficient(field: str, value: object) -> float:
    """Validates a finite scaling coefficient ``>= 0`` and returns it as a float."""
    check_number(field, value, low=0.0)
    return float(value)
