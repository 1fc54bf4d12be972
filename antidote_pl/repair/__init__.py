"""Post-fine-tuning repair math as pure functions over tensors keyed by target name.

Families (one module each; no Lightning, peft, file I/O or model loading in them; their artefacts
are read and written by :mod:`~antidote_pl.repair.artifacts`):

* :mod:`~antidote_pl.repair.delta_scaling`: pre/post-tuning merge (arXiv 2412.19512), the LoRA
  update scaled by ``λ`` (``B ← λ·B``).
* :mod:`~antidote_pl.repair.resta`: RESTA (arXiv 2402.11746), ``W + β·V`` with the safety vector
  ``V = aligned − pre``, and the harm-vector negation ``W − γ·H``.
* :mod:`~antidote_pl.repair.safelora`: SafeLoRA (arXiv 2405.16833), ``B ← C @ B`` on layers whose
  update has a low cosine with its projection onto the alignment subspace.
* :mod:`~antidote_pl.repair.safe_delta`: Safe Delta (arXiv 2505.12038), the update's entries kept
  under an OBS safety-cost budget (Hessian of the aligned model's inputs), the rest compensated.

Wanda in delta space (Antidote's score on the merged update ``scale·B @ A``) needs no module of its
own: it is the pruning code with ``target: lora_delta`` (:mod:`antidote_pl.pruning`).

Conventions: weights and updates are row layout ``[out, in]``; a LoRA target has ``A [r, in]``,
``B [out, r]`` and update ``scale · B @ A``. Math is done in fp32 and edited tensors are returned in
their input dtype. At a knob's neutral value (``λ = 1``, ``β = γ = 0``, threshold or K = 0)
the input tensors themselves are returned. Bad knobs and mismatched targets raise
:class:`antidote_pl.errors.ConfigError` before any heavy computation.
"""

from antidote_pl.repair.delta_scaling import scale_lora, scale_lora_b
from antidote_pl.repair.resta import add_safety_vector, alignment_delta, harm_delta, subtract_harm_vector
from antidote_pl.repair.safe_delta import HessianAccumulator, safe_delta, safe_delta_layers
from antidote_pl.repair.safelora import (
    PROJECTORS,
    SafeLoRAResult,
    energy_rank,
    exact_projector,
    official_projector,
    project_lora_b,
    projection_cosines,
    safelora_projectors,
    safelora_repair,
    select_layers,
)

__all__ = [
    "PROJECTORS",
    "HessianAccumulator",
    "SafeLoRAResult",
    "add_safety_vector",
    "alignment_delta",
    "energy_rank",
    "exact_projector",
    "harm_delta",
    "official_projector",
    "project_lora_b",
    "projection_cosines",
    "safe_delta",
    "safe_delta_layers",
    "safelora_projectors",
    "safelora_repair",
    "scale_lora",
    "scale_lora_b",
    "select_layers",
    "subtract_harm_vector",
]
