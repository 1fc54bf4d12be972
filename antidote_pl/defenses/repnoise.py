"""RepNoise (Rosati et al., NeurIPS 2024): push harmful representations towards Gaussian noise.

Loss per step::

    CE(harmless) + beta * MMD(harmful representations, N(0, I)) - alpha * log CE(harmful)

The user's batch is the harmless stream (the alignment data). The harmful stream is a separate
``harmful`` :class:`~antidote_pl.data.records.Source` (harmful prompts with harmful answers), cycled
inside the defense by an :class:`~antidote_pl.defenses.blocks.AuxiliaryStream` built once in
:meth:`RepNoise.attach`. Both CE terms are response-token cross-entropy (labels ``-100`` on prompt and
padding).

Representations are captured by hooks on the chosen modules only (the official code hooks every
module and stores every output). MMD is the biased estimate ``mean K(x,x) + mean K(y,y) - 2 mean
K(x,y)`` with a mixture of ``num_kernels`` Gaussian kernels whose bandwidths are ``kernel_mul ** k``
times the mean pairwise squared distance (detached), ``k`` centred on 0, as in the official code (5
kernels, multiplier 2), averaged over layers (the Antidote copy of the loss leaves out the
mis-averaged hidden-state term of domenicrosati/representation-noising#6).

Modes (``mode``):

* ``"parity"`` (the paper configs), the official loss (reference D):

  - the token mask is "positions where the two batches' input ids differ", the other batch cut or
    zero-padded to the shape first (:func:`differing_positions`); for unpaired batches that is
    nearly every position, padding included wherever the other batch has a token, but not the
    shared template prefix;
  - both CE terms are :func:`masked_token_ce`: the targets are the input ids themselves (prompt,
    response and any differing padding), restricted to the mask, instead of the response labels;
  - the MMD compares each harmful sample's masked MLP outputs flattened to one ``T*d`` vector (zeros
    at masked positions) with Gaussian noise masked the same way (:meth:`RepNoise.flat_noise_mmd`);
  - representations are the MLP outputs (``representation`` must be ``mlp`` or ``None``).

* ``"project"`` (default), a deliberate variant: response-token CE (labels ``-100`` on prompt and
  padding) for both streams, and per layer each harmful sample mean-pooled over its response tokens
  (a ``[batch, hidden]`` matrix compared with as many ``N(0, I)`` draws), so the distance does not
  depend on padding or sequence length and the ascent term does not push the model away from the
  template and the prompt. Samples without a response token are left out. Not comparable with the
  paper's numbers.

In both modes the user's batch is the harmless stream and the harmful records are cycled in epochs;
the official trainer iterates over the harmful set and draws a random harmless batch per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from antidote_pl.data.records import Source
from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import (
    REPRESENTATIONS,
    AuxiliaryStream,
    capture_outputs,
    check_mode,
    check_sources,
    parity_value,
    representation_modules,
)
from antidote_pl.errors import check_choice, check_number

IGNORE_INDEX = -100
PAIRWISE = ("direct", "gram")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, T, d]`` over the positions where ``mask`` ``[B, T]`` is true, in fp32.

    Rows without any true position come out as zeros; callers drop them.
    """
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def differing_positions(input_ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The official RepNoise token mask: where ``input_ids`` differs from the other batch's ids.

    ``other`` is first brought to the shape of ``input_ids`` as the official code does: extra rows
    and columns are cut, missing ones are filled with id 0.

    Args:
        input_ids: This batch's ids ``[B, T]``.
        other: The other stream's ids ``[B', T']``.

    Returns:
        A bool mask ``[B, T]``.
    """
    aligned = input_ids.new_zeros(input_ids.shape)
    rows, cols = min(input_ids.shape[0], other.shape[0]), min(input_ids.shape[1], other.shape[1])
    aligned[:rows, :cols] = other[:rows, :cols]
    return input_ids != aligned


def masked_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official RepNoise cross-entropy: next-token loss on the input ids restricted to ``mask``.

    Position ``t`` predicts ``input_ids[t + 1]``. The logits of masked-out positions are zeroed (a
    uniform prediction, which still counts where the target is in the mask), and targets that are
    masked out, or are id 0, are ignored, exactly as the official ``masked_token_ce_loss``. The mean
    runs over the remaining targets.

    Args:
        logits: ``[B, T, V]``.
        input_ids: ``[B, T]``; the targets.
        mask: ``[B, T]`` bool, e.g. from :func:`differing_positions`.

    Returns:
        A scalar (fp32); zero, still in the graph, when no target is left.
    """
    keep = mask.to(torch.float32)
    shifted = logits[:, :-1].float() * keep[:, :-1, None]
    targets = input_ids[:, 1:] * mask[:, 1:].long()
    targets = targets.masked_fill(targets == 0, IGNORE_INDEX)
    if not (targets != IGNORE_INDEX).any():
        return shifted.sum() * 0.0
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _pairwise_sq(z: torch.Tensor, pairwise: str) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``z`` ``[n, d]``, as ``[n, n]`` fp32."""
    if pairwise == "direct":
        return (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).sum(-1)
    # |a|^2 + |b|^2 - 2 a.b in fp64: no [n, n, d] intermediate, which for flattened [T*d] vectors
    # (about 1M entries per sample on a 7B model) would need gigabytes per layer.
    wide = z.double()
    norms = wide.pow(2).sum(-1)
    sq = (norms.unsqueeze(0) + norms.unsqueeze(1) - 2.0 * wide @ wide.T).clamp_min(0.0)
    return sq.float()


def gaussian_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
    pairwise: str = "direct",
) -> torch.Tensor:
    """Biased squared MMD between samples ``x`` ``[n, d]`` and ``y`` ``[m, d]``, mixture of Gaussian kernels.

    Bandwidths are ``base * kernel_mul ** (k - num_kernels // 2)`` for ``k < num_kernels``, with
    ``base`` the mean squared distance between distinct points of ``x`` and ``y`` pooled (detached, so
    the bandwidth is not itself optimised).

    Args:
        x: First sample.
        y: Second sample.
        num_kernels: Gaussian kernels in the mixture.
        kernel_mul: Ratio between consecutive bandwidths.
        pairwise: ``direct`` (differences, exact) or ``gram`` (through inner products in fp64; for
            long vectors, same value up to rounding).
    """
    check_choice("pairwise", pairwise, PAIRWISE)
    z = torch.cat([x, y]).float()
    sq = _pairwise_sq(z, pairwise)
    count = z.shape[0]
    base = sq.detach().sum() / max(count * count - count, 1)
    base = base.clamp_min(1e-12)
    powers = torch.arange(num_kernels, device=z.device, dtype=torch.float32) - num_kernels // 2
    bandwidths = base * kernel_mul**powers
    kernel = torch.exp(-sq.unsqueeze(0) / bandwidths.view(-1, 1, 1)).sum(0)
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


class RepNoise(Defense):
    """Representation noising during alignment.

    Args:
        harmful: Harmful prompts with harmful answers (e.g. BeaverTails unsafe; not the attack data).
        alpha: Weight of the gradient-ascent term ``-log CE(harmful)`` (official ``--rho`` 0.1).
        beta: Weight of the MMD term (official ``--lamb`` 0.001).
        batch_size: Harmful batch size per device; ``None``: the DataModule's.
        representation: ``block`` (decoder-block outputs) or ``mlp`` (their MLP outputs, official);
            ``None``: the mode's (project ``block``, parity ``mlp``).
        num_kernels: Gaussian kernels in the MMD mixture.
        kernel_mul: Ratio between consecutive kernel bandwidths.
        template: Template of the harmful records; ``None``: the DataModule's.
        max_length: Token limit of the harmful records; ``None``: the DataModule's.
        seed: Shuffle seed of the harmful stream.
        mode: ``project`` or ``parity``; see the module docstring.

    Raises:
        ConfigError: on bad values, or a representation other than ``mlp`` in parity mode
            (construction); in :meth:`attach`, on an empty harmful source or an architecture without
            the representation modules.
    """

    name = "repnoise"

    def __init__(
        self,
        harmful: Source,
        alpha: float = 0.1,
        beta: float = 0.001,
        batch_size: int | None = None,
        representation: str | None = None,
        num_kernels: int = 5,
        kernel_mul: float = 2.0,
        template: str | None = None,
        max_length: int | None = None,
        seed: int = 42,
        mode: str = "project",
    ) -> None:
        check_mode("RepNoise", mode)
        sources = check_sources("RepNoise.harmful", harmful)
        check_number("RepNoise.alpha", alpha, low=0.0)
        check_number("RepNoise.beta", beta, low=0.0)
        check_number("RepNoise.num_kernels", num_kernels, low=1, integer=True)
        check_number("RepNoise.kernel_mul", kernel_mul, low=1.0, low_open=True)
        if representation is not None:
            check_choice("RepNoise.representation", representation, REPRESENTATIONS)
        self.mode = mode
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.representation = parity_value("RepNoise", "representation", representation, "mlp", "block", mode)
        self.num_kernels = num_kernels
        self.kernel_mul = float(kernel_mul)
        self.stream = AuxiliaryStream(sources, "RepNoise.harmful", batch_size, template, max_length, seed)
        self._modules: list[torch.nn.Module] | None = None
        self._metrics: dict[str, Any] = {}

    def attach(self, module) -> None:
        """Finds the representation modules and builds the harmful stream."""
        self._modules = representation_modules(module.model, self.representation)
        self.stream.build(module)

    def noise_mmd(self, hidden: list[torch.Tensor | None], labels: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the MMD between pooled response representations and Gaussian noise."""
        mask = labels != IGNORE_INDEX
        rows = mask.any(1)
        layers = [h for h in hidden if h is not None]
        if not layers or int(rows.sum()) == 0:
            return labels.new_zeros((), dtype=torch.float32)
        terms = []
        for h in layers:
            pooled = masked_mean(h, mask)[rows]
            noise = torch.randn_like(pooled)
            terms.append(gaussian_mmd(pooled, noise, self.num_kernels, self.kernel_mul))
        return torch.stack(terms).mean()

    def flat_noise_mmd(self, hidden: list[torch.Tensor | None], mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the official MMD on masked, flattened representations.

        Each harmful sample's ``[T, d]`` outputs, zeroed outside ``mask``, become one ``T*d`` vector,
        compared with Gaussian noise masked the same way (drawn in fp32, one draw per layer in depth
        order).
        """
        layers = [h for h in hidden if h is not None]
        if not layers:
            return mask.new_zeros((), dtype=torch.float32)
        keep = mask.to(torch.float32).unsqueeze(-1)
        terms = []
        for h in layers:
            flat = (h.float() * keep).reshape(h.shape[0], -1)
            noise = (torch.randn(h.shape, device=h.device, dtype=torch.float32) * keep).reshape(
                h.shape[0], -1
            )
            terms.append(gaussian_mmd(flat, noise, self.num_kernels, self.kernel_mul, pairwise="gram"))
        return torch.stack(terms).mean()

    def _parity_terms(
        self, module, batch: dict[str, torch.Tensor], harmful: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(harmless_ce, harmful_ce, mmd)`` of the official loss (see the module docstring)."""
        harmful_mask = differing_positions(harmful["input_ids"], batch["input_ids"])
        with capture_outputs(self._modules) as hidden:
            logits = module(harmful["input_ids"], harmful["attention_mask"]).logits
        harmful_ce = masked_token_ce(logits, harmful["input_ids"], harmful_mask)
        mmd = self.flat_noise_mmd(hidden, harmful_mask)
        harmless_mask = differing_positions(batch["input_ids"], harmful["input_ids"])
        logits = module(batch["input_ids"], batch["attention_mask"]).logits
        harmless_ce = masked_token_ce(logits, batch["input_ids"], harmless_mask)
        return harmless_ce, harmful_ce, mmd

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """RepNoise loss on the user (harmless) batch and the next harmful batch."""
        if self.mode == "parity":
            harmful = self.stream.next(module.device)
            harmless_ce, harmful_ce, mmd = self._parity_terms(module, batch, harmful)
        else:
            # Harmless forward first, as before parity mode existed: a new pass of the harmful
            # stream draws from the global RNG that dropout here uses, so the order fixes results.
            harmless_ce = module.sft_loss(batch)
            harmful = self.stream.next(module.device)
            with capture_outputs(self._modules) as hidden:
                harmful_ce = module.sft_loss(harmful)
            mmd = self.noise_mmd(hidden, harmful["labels"])
        loss = harmless_ce + self.beta * mmd - self.alpha * torch.log(harmful_ce.float().clamp_min(1e-8))
        self._metrics = {
            "harmless_ce": harmless_ce.detach(),
            "harmful_ce": harmful_ce.detach(),
            "mmd": mmd.detach(),
        }
        return loss

    def metrics(self) -> dict[str, Any]:
        """``harmless_ce``, ``harmful_ce`` and ``mmd`` of the last step."""
        return dict(self._metrics)
