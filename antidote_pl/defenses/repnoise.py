"""RepNoise (Rosati et al., NeurIPS 2024): push harmful representations towards Gaussian noise.

Loss per step::

    CE(harmless) + beta * MMD(harmful representations, N(0, I)) - alpha * log CE(harmful)

The user's batch is the harmless stream (the alignment data). The harmful stream is a separate
``harmful`` :class:`~antidote_pl.data.records.Source` (harmful prompts with harmful answers), cycled
inside the defense by an :class:`~antidote_pl.defenses.blocks.AuxiliaryStream` built once in
:meth:`RepNoise.attach`. Both CE terms are response-token cross-entropy (labels ``-100`` on prompt and
padding).

Representations and MMD, and how they differ from the official code (reference D, G.10):

* Representations are decoder-block outputs (``representation="block"``) or each block's MLP output
  (``"mlp"``, the official choice), captured by hooks on those modules only (the official code hooks
  every module and stores every output).
* Per layer, each harmful sample is mean-pooled over its *response* tokens (``labels != -100``), giving
  a ``[batch, hidden]`` matrix compared with as many ``N(0, I)`` draws. The official code instead
  flattens the masked ``[seq, hidden]`` activations per sample (zeros at masked positions), which
  makes the distance depend on padding and sequence length; the mask there is "positions where the
  harmful and harmless input ids differ". Samples without a response token are left out.
* MMD is the biased estimate ``mean K(x,x) + mean K(y,y) - 2 mean K(x,y)`` with a mixture of
  ``num_kernels`` Gaussian kernels whose bandwidths are ``kernel_mul ** k`` times the mean pairwise
  squared distance (detached), ``k`` centred on 0, as in the official code (5 kernels, multiplier 2).
* The MMD is averaged over layers (the official loss mis-averaged over layers,
  domenicrosati/representation-noising#6).
"""

from __future__ import annotations

from typing import Any

import torch

from antidote_pl.data.records import Source
from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.blocks import (
    REPRESENTATIONS,
    AuxiliaryStream,
    capture_outputs,
    check_number,
    check_sources,
    representation_modules,
)
from antidote_pl.errors import bad_value

IGNORE_INDEX = -100


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, T, d]`` over the positions where ``mask`` ``[B, T]`` is true, in fp32.

    Rows without any true position come out as zeros; callers drop them.
    """
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def gaussian_mmd(
    x: torch.Tensor, y: torch.Tensor, num_kernels: int = 5, kernel_mul: float = 2.0
) -> torch.Tensor:
    """Biased squared MMD between samples ``x`` ``[n, d]`` and ``y`` ``[m, d]``, mixture of Gaussian kernels.

    Bandwidths are ``base * kernel_mul ** (k - num_kernels // 2)`` for ``k < num_kernels``, with
    ``base`` the mean squared distance between distinct points of ``x`` and ``y`` pooled (detached, so
    the bandwidth is not itself optimised).
    """
    z = torch.cat([x, y]).float()
    sq = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).sum(-1)
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
        representation: ``block`` (decoder-block outputs) or ``mlp`` (their MLP outputs, official).
        num_kernels: Gaussian kernels in the MMD mixture.
        kernel_mul: Ratio between consecutive kernel bandwidths.
        template: Template of the harmful records; ``None``: the DataModule's.
        max_length: Token limit of the harmful records; ``None``: the DataModule's.
        seed: Shuffle seed of the harmful stream.

    Raises:
        ConfigError: on bad values (construction); in :meth:`attach`, on an empty harmful source or
            an architecture without the representation modules.
    """

    name = "repnoise"

    def __init__(
        self,
        harmful: Source,
        alpha: float = 0.1,
        beta: float = 0.001,
        batch_size: int | None = None,
        representation: str = "block",
        num_kernels: int = 5,
        kernel_mul: float = 2.0,
        template: str | None = None,
        max_length: int | None = None,
        seed: int = 42,
    ) -> None:
        sources = check_sources("RepNoise.harmful", harmful)
        check_number("RepNoise.alpha", alpha, low=0.0)
        check_number("RepNoise.beta", beta, low=0.0)
        check_number("RepNoise.num_kernels", num_kernels, low=1, integer=True)
        check_number("RepNoise.kernel_mul", kernel_mul, low=1.0, low_open=True)
        if representation not in REPRESENTATIONS:
            raise bad_value("RepNoise.representation", representation, f"one of {list(REPRESENTATIONS)}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.representation = representation
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

    def training_step(self, module, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """RepNoise loss on the user (harmless) batch and the next harmful batch."""
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
