"""SafeLoRA (arXiv 2405.16833): project low-alignment LoRA updates onto the alignment subspace.

Per target (a linear layer with a LoRA adapter ``dW = scale·B @ A``, row layout ``[out, in]``):

1. ``V = W_aligned − W_pre``, the alignment delta (:func:`antidote_pl.repair.resta.alignment_delta`).
2. The official projector ``C = V @ Vᵀ / ‖V‖_F``: ``[out, out]``, built from the ``[out, in]`` matrix
   and divided by the Frobenius norm of the whole matrix (``torch.norm(vec)`` with no ``dim``), *not*
   its square; so ``C`` is symmetric positive semi-definite but neither idempotent nor scale-free (it
   grows with ``‖V‖``). :func:`exact_projector` offers the orthogonal projector ``U_k U_kᵀ`` onto
   ``V``'s top-``k`` left singular directions instead (an extension, not in the official code).
3. The cosine between ``(C @ B) @ A`` and ``B @ A``, both flattened. The official uses ``B @ A``
   without the LoRA scale; a positive scale cancels in a cosine, so neither does this module. As
   ``C`` is PSD, the cosine is in ``[0, 1]`` (up to rounding).
4. Layers are selected by ``threshold`` (cosine below it) or ``num_proj_layers`` (the K lowest
   cosines); on a selected layer ``B ← C @ B``, ``A`` is unchanged; other layers keep ``B``.

What the official code (``IBM/SafeLoRA``, ``model.py``) does, and where this module deviates:

* It zips the base and aligned models' ``named_parameters()`` by position, keeps names containing a
  ``target_modules`` entry, and pairs the i-th projector with the i-th ``lora_B`` of the peft model
  (a LoRA parameter with ``shape[0] == r`` is taken for ``A``). Here everything is keyed by target
  name, so no order or shape heuristics are involved.
* It computes in the loaded models' dtype (fp32 from ``from_pretrained`` without a dtype) and needs
  ``B`` in that dtype; here inputs are cast to fp32 and ``B`` is returned in its own dtype.
* It rounds the cosine to 5 decimals and projects when ``cos <= threshold``. Here the cosine is not
  rounded and the test is strict, ``cos < threshold``, so ``threshold = 0`` selects nothing (the
  neutral value). The two differ only for cosines within 5e-6 of the threshold.
* Its ``number`` mode takes the K-th smallest rounded cosine as a threshold with ``<=``, so ties
  project more than K layers, K = 0 fails (IndexError) and K > #layers projects all. Here exactly the
  K lowest are selected (ties broken by target order), K = 0 selects nothing, K > #targets is refused.
* An all-zero ``V`` gives the official a 0/0 projector (NaN; never projected in threshold mode); here
  it is refused with a :class:`ConfigError` naming the target, as is a ``V`` with NaN or inf.
* Its diagnostic "Pdst" (mean ``1/(1+‖B_new − C@B‖)``) is not computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from antidote_pl.errors import ConfigError, bad_value, check_choice, check_int, check_number
from antidote_pl.pruning.targets import lora_delta_weight
from antidote_pl.repair._checks import check_delta_shapes, check_lora_factors, check_nonempty

__all__ = [
    "PROJECTORS",
    "SafeLoRAResult",
    "energy_rank",
    "exact_projector",
    "official_projector",
    "project_lora_b",
    "projection_cosines",
    "safelora_projectors",
    "safelora_repair",
    "select_layers",
]

PROJECTORS = ("official", "exact")


@dataclass(frozen=True)
class SafeLoRAResult:
    """What :func:`safelora_repair` decided and produced.

    Attributes:
        selected: Targets whose ``B`` was projected, in target order.
        cosines: Cosine between the projected and the original update, per target.
        lora_b: ``B`` per target: the projected ``C @ B`` (input dtype) on selected targets, the input
            tensors themselves elsewhere.
    """

    selected: list[str]
    cosines: dict[str, float]
    lora_b: dict[str, torch.Tensor]


def official_projector(vector: torch.Tensor, field: str = "vector") -> torch.Tensor:
    """The official SafeLoRA matrix ``C = V @ Vᵀ / ‖V‖_F`` in fp32, ``[out, out]``.

    Args:
        vector: Alignment delta ``V`` of one target, ``[out, in]``.
        field: Name for messages.

    Raises:
        ConfigError: ``V`` not 2-D, not finite, or all zeros (``C`` would be 0/0).
    """
    v = _as_matrix(vector, field)
    norm = torch.linalg.matrix_norm(v)  # Frobenius norm of the whole matrix, as torch.norm(vec)
    if norm == 0:
        raise ConfigError(f"{field}: all zeros; the SafeLoRA projector V V^T / ||V||_F is undefined.")
    return (v @ v.t()) / norm


def exact_projector(
    vector: torch.Tensor, rank: int | None = None, energy: float | None = None, field: str = "vector"
) -> torch.Tensor:
    """The orthogonal projector ``U_k U_kᵀ`` onto ``V``'s top-``k`` left singular directions (fp32).

    Unlike :func:`official_projector` it is idempotent and independent of ``‖V‖``. Give exactly one
    of ``rank`` and ``energy``. When singular values tie at the cut, the projector is not unique.

    Args:
        vector: Alignment delta ``V`` of one target, ``[out, in]``.
        rank: ``k``, an int in ``[1, min(out, in)]``.
        energy: Fraction in ``(0, 1]``; ``k`` is the smallest rank whose squared singular values hold
            at least this fraction of ``‖V‖_F²`` (see :func:`energy_rank`).
        field: Name for messages.

    Raises:
        ConfigError: Not exactly one of ``rank``/``energy``, either out of range, ``V`` not 2-D, not
            finite, or all zeros.
    """
    _check_rank_knobs(rank, energy, [vector])
    v = _as_matrix(vector, field)
    if not torch.any(v != 0):
        raise ConfigError(f"{field}: all zeros; it spans no direction to project onto.")
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    k = rank if rank is not None else energy_rank(s, energy)
    u_k = u[:, :k]
    return u_k @ u_k.t()


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` squared singular values hold ``energy`` of the total.

    Args:
        singular_values: Singular values in descending order, not all zero.
        energy: Fraction in ``(0, 1]``.

    Returns:
        ``k`` in ``[1, len(singular_values)]``.
    """
    check_number("energy", energy, low=0.0, low_open=True, high=1.0)
    squared = singular_values.double() ** 2
    fraction = torch.cumsum(squared, 0) / squared.sum()
    # First index reaching the fraction; the clamp absorbs rounding that leaves the last entry < 1.
    k = int(torch.searchsorted(fraction, torch.tensor([float(energy)], dtype=torch.float64))) + 1
    return min(k, singular_values.numel())


def safelora_projectors(
    vectors: Mapping[str, torch.Tensor],
    projector: str = "official",
    rank: int | None = None,
    energy: float | None = None,
) -> dict[str, torch.Tensor]:
    """Projector per target: :func:`official_projector` or :func:`exact_projector`.

    Args:
        vectors: Alignment deltas ``V [out, in]`` per target.
        projector: ``"official"`` or ``"exact"``.
        rank: ``k`` for ``"exact"`` (at most every target's ``min(out, in)``).
        energy: Energy fraction for ``"exact"`` (instead of ``rank``).

    Raises:
        ConfigError: Bad knobs (checked before any projector is built), or a bad vector (named).
    """
    _check_projector_knobs(projector, rank, energy, vectors)
    if projector == "official":
        return {name: official_projector(v, f"vectors[{name}]") for name, v in vectors.items()}
    return {name: exact_projector(v, rank, energy, f"vectors[{name}]") for name, v in vectors.items()}


def projection_cosines(
    projectors: Mapping[str, torch.Tensor],
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Cosine between ``(C @ B) @ A`` and ``B @ A`` (flattened) per target.

    Args:
        projectors: ``C [out, out]`` per target (see :func:`safelora_projectors`).
        lora_a: ``lora_A`` weights ``[r, in]`` per target.
        lora_b: ``lora_B`` weights ``[out, r]`` per target.

    Raises:
        ConfigError: Targets, ranks or projector sizes that do not match (named).
    """
    _check_projectors(projectors, lora_a, lora_b)
    return {name: _cosine(lora_a[name], _projected(projectors[name], b), b) for name, b in lora_b.items()}


def select_layers(
    cosines: Mapping[str, float], threshold: float | None = None, num_proj_layers: int | None = None
) -> list[str]:
    """Targets to project: cosine ``< threshold``, or the ``num_proj_layers`` lowest cosines.

    Args:
        cosines: Cosine per target (see :func:`projection_cosines`).
        threshold: In ``[0, 1]``; 0 selects nothing.
        num_proj_layers: K in ``[0, len(cosines)]``; ties are broken by target order; 0 selects nothing.

    Returns:
        The selected targets, in target order.

    Raises:
        ConfigError: Not exactly one of the two knobs given, or a value out of range.
    """
    _check_selection_knobs(threshold, num_proj_layers, len(cosines))
    if threshold is not None:
        # Explicit so that a rounding-negative cosine cannot make the neutral value select anything.
        return [] if threshold == 0 else [name for name, c in cosines.items() if c < threshold]
    lowest = set(sorted(cosines, key=lambda name: cosines[name])[:num_proj_layers])  # a stable sort
    return [name for name in cosines if name in lowest]


def project_lora_b(
    projectors: Mapping[str, torch.Tensor], lora_b: Mapping[str, torch.Tensor], selected: list[str]
) -> dict[str, torch.Tensor]:
    """``B ← C @ B`` on the selected targets (fp32 math, input dtype); other ``B`` unchanged.

    Raises:
        ConfigError: A selected target without a projector or ``B``, or mismatched sizes (named).
    """
    for name in selected:
        if name not in lora_b or name not in projectors:
            raise ConfigError(f"selected[{name}]: needs both a projector and a lora_b tensor.")
        _check_projector_size(name, projectors[name], lora_b[name])
    chosen = set(selected)
    return {
        name: _projected(projectors[name], b).to(b.dtype) if name in chosen else b
        for name, b in lora_b.items()
    }


def safelora_repair(
    vectors: Mapping[str, torch.Tensor],
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    *,
    threshold: float | None = None,
    num_proj_layers: int | None = None,
    projector: str = "official",
    rank: int | None = None,
    energy: float | None = None,
) -> SafeLoRAResult:
    """SafeLoRA end to end: projectors, cosines, layer selection and projected ``B``.

    Args:
        vectors: Alignment deltas ``V [out, in]`` per target (aligned minus pre-alignment weights).
        lora_a: ``lora_A`` weights ``[r, in]`` per target.
        lora_b: ``lora_B`` weights ``[out, r]`` per target.
        threshold: Project targets whose cosine is below it, in ``[0, 1]``.
        num_proj_layers: Or project the K targets with the lowest cosines.
        projector: ``"official"`` (``V Vᵀ / ‖V‖_F``) or ``"exact"`` (``U_k U_kᵀ``).
        rank: ``k`` of the exact projector.
        energy: Energy fraction choosing ``k`` of the exact projector instead.

    Returns:
        A :class:`SafeLoRAResult`; with nothing selected its ``lora_b`` holds the input tensors.

    Raises:
        ConfigError: Bad knobs or mismatched targets/shapes, all checked before any projector is built.
    """
    _check_selection_knobs(threshold, num_proj_layers, len(lora_b))
    _check_projector_knobs(projector, rank, energy, vectors)
    check_delta_shapes(vectors, lora_a, lora_b, "vectors")
    projectors = safelora_projectors(vectors, projector, rank, energy)
    candidates = {name: _projected(projectors[name], b) for name, b in lora_b.items()}
    cosines = {name: _cosine(lora_a[name], candidates[name], b) for name, b in lora_b.items()}
    selected = select_layers(cosines, threshold, num_proj_layers)
    chosen = set(selected)
    edited = {name: candidates[name].to(b.dtype) if name in chosen else b for name, b in lora_b.items()}
    return SafeLoRAResult(selected=selected, cosines=cosines, lora_b=edited)


def _as_matrix(vector: torch.Tensor, field: str) -> torch.Tensor:
    if vector.dim() != 2:
        raise ConfigError(f"{field}: expected an [out, in] matrix, got shape {tuple(vector.shape)}.")
    matrix = vector.float()
    if not torch.isfinite(matrix).all():
        raise ConfigError(f"{field}: contains NaN or inf; the alignment delta must be finite.")
    return matrix


def _projected(projector: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    return projector.float() @ lora_b.to(projector.device, torch.float32)


def _cosine(lora_a: torch.Tensor, projected_b: torch.Tensor, lora_b: torch.Tensor) -> float:
    # Scale 1: the LoRA scale multiplies both updates and cancels in the cosine.
    projected = lora_delta_weight(lora_a.to(projected_b.device), projected_b, 1.0)
    original = lora_delta_weight(lora_a.to(projected_b.device), lora_b.to(projected_b.device), 1.0)
    return F.cosine_similarity(projected.reshape(1, -1), original.reshape(1, -1)).item()


def _check_selection_knobs(threshold: float | None, num_proj_layers: int | None, n_targets: int) -> None:
    if (threshold is None) == (num_proj_layers is None):
        raise bad_value(
            "threshold/num_proj_layers",
            (threshold, num_proj_layers),
            "exactly one of threshold (a cosine in [0, 1]) and num_proj_layers (a layer count)",
        )
    if threshold is not None:
        check_number("threshold", threshold, low=0.0, high=1.0)
    else:
        check_int("num_proj_layers", num_proj_layers, 0, n_targets)


def _check_projector_knobs(
    projector: str, rank: int | None, energy: float | None, vectors: Mapping[str, torch.Tensor]
) -> None:
    check_choice("projector", projector, PROJECTORS)
    check_nonempty(vectors, "vectors")
    if projector == "exact":
        _check_rank_knobs(rank, energy, list(vectors.values()))
    elif rank is not None or energy is not None:
        raise bad_value("rank/energy", (rank, energy), "None with projector='official' (exact only)")


def _check_rank_knobs(rank: int | None, energy: float | None, vectors: list[torch.Tensor]) -> None:
    if (rank is None) == (energy is None):
        raise bad_value(
            "rank/energy", (rank, energy), "exactly one of rank and energy for the exact projector"
        )
    if energy is not None:
        check_number("energy", energy, low=0.0, low_open=True, high=1.0)
        return
    # A rank beyond min(out, in) would silently project onto fewer directions than asked. (A vector
    # that is not 2-D is reported by the shape checks.)
    check_int("rank", rank, 1, min((min(v.shape) for v in vectors if v.dim() == 2), default=None))


def _check_projector_size(name: str, projector: torch.Tensor, lora_b: torch.Tensor) -> None:
    rows = lora_b.shape[0] if lora_b.dim() == 2 else None
    if projector.dim() != 2 or projector.shape != (rows, rows):
        raise ConfigError(
            f"projectors[{name}]: shape {tuple(projector.shape)} does not fit lora_b shape "
            f"{tuple(lora_b.shape)} (expected [out, out])."
        )


def _check_projectors(
    projectors: Mapping[str, torch.Tensor],
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
) -> None:
    check_lora_factors(lora_a, lora_b)
    for name, b in lora_b.items():
        if name not in projectors:
            raise ConfigError(f"projectors[{name}]: missing; the LoRA factors have this target.")
        _check_projector_size(name, projectors[name], b)
    extra = [name for name in projectors if name not in lora_b]
    if extra:
        raise ConfigError(f"projectors[{extra[0]}]: not a target of the LoRA factors.")
