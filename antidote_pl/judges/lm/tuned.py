"""The LM judge's fine-tuned head: the backbone's top decoder layers, trained, plus a pooled linear layer.

A frozen backbone's pooled features top out near 88-89% agreement with the labelled data (see
:mod:`antidote_pl.judges.lm`); training the layers above them reaches further. Training the whole
backbone on two CPU cores would take hours, so the split is:

* a frozen **trunk** (decoder layers ``1..trunk``) runs once per pair; its output, the residual
  stream at every token, is cached (:class:`TokenStates`, fp16);
* a **tuned** stack (the next ``k`` decoder layers, initialised from the backbone) and a head (layer
  norm + linear over the answer-mean and last-token states, :func:`pool_answer_last`) are trained on
  the cached states with AdamW, so each epoch costs only the ``k`` layers' forward and backward.

Everything here is plain torch over tensors; the judge's plumbing (data, cache, split, saving) lives in
:mod:`antidote_pl.judges.lm.training`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn

from antidote_pl.errors import bad_value, check_int

#: The tuned head's autocast precision (see :attr:`TuneSettings.precision`).
Precision = Literal["bf16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def pool_answer_last(hidden: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """The two pooled views of right-padded hidden states: answer mean and last token.

    Args:
        hidden: ``[B, T, H]`` states, each row right-padded after its ``lengths`` tokens.
        lengths: ``[B]`` real tokens per row.
        spans: ``[B, 2]`` the ``[start, end)`` answer tokens per row. An empty answer pools from its
            start to the row's end (the end-of-turn tokens) instead of dividing by zero.

    Returns:
        ``[B, 2, H]``: the mean over the answer tokens, then the state at the last real token.
    """
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    start, end = spans[:, :1], spans[:, 1:]
    end = torch.where(end > start, end, lengths[:, None])
    mask = ((positions >= start) & (positions < end)).to(hidden.dtype)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    return torch.stack([mean, last], 1)


class TokenStates(NamedTuple):
    """Variable-length token states of ``N`` pairs, stored flat.

    Attributes:
        states: ``[total tokens, H]`` (fp16 in the cache; cast to fp32 per batch).
        offsets: ``[N + 1]`` row ``i`` is ``states[offsets[i]:offsets[i + 1]]``.
        spans: ``[N, 2]`` each row's ``[start, end)`` answer tokens.
    """

    states: torch.Tensor
    offsets: torch.Tensor
    spans: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per row, ``[N]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu"):
        """``(states [B, T, H] fp32 right-padded, lengths [B], spans [B, 2])`` of ``rows``."""
        lengths = self.lengths[rows]
        x = torch.zeros(len(rows), int(lengths.max()), self.states.shape[1])
        for r, i in enumerate(rows.tolist()):
            x[r, : lengths[r]] = self.states[self.offsets[i] : self.offsets[i + 1]]
        return x.to(device), lengths.to(device), self.spans[rows].to(device)

    @staticmethod
    def cat(parts: Sequence[TokenStates]) -> TokenStates:
        """Rows of several parts, in order."""
        shift = torch.tensor([0, *[int(p.offsets[-1]) for p in parts[:-1]]]).cumsum(0)
        offsets = torch.cat([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        return TokenStates(torch.cat([p.states for p in parts]), offsets, torch.cat([p.spans for p in parts]))


class TunedHead(nn.Module):
    """Decoder layers on top of the cached trunk states, then layer norm + linear to one logit.

    Args:
        layers: The backbone's decoder layers that follow the trunk (trained in place).
        rotary: The backbone's rotary embedding module (gives each layer its position embeddings).
        hidden_size: Width of the residual stream.
    """

    def __init__(self, layers: nn.ModuleList, rotary: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.layers = layers
        self.rotary = rotary
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.out = nn.Linear(2 * hidden_size, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` for right-padded trunk states ``x`` (``[B, T, H]``)."""
        batch, width = x.shape[:2]
        positions = torch.arange(width, device=x.device)[None].expand(batch, width)
        embeddings = self.rotary(x, positions)
        # An explicit additive causal mask, so the layers behave as in the backbone whatever attention
        # implementation was loaded; right padding then never reaches a real token.
        causal = torch.full((width, width), torch.finfo(x.dtype).min, device=x.device).triu(1)
        mask = causal[None, None].expand(batch, 1, width, width)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
            x = x[0] if isinstance(x, tuple) else x
        pooled = pool_answer_last(x, lengths, spans).flatten(1)
        return self.out(self.norm(pooled)).squeeze(-1)


@dataclass(frozen=True)
class TuneSettings:
    """How the tuned head is trained.

    Attributes:
        epochs: Passes over the training rows (fractions allowed).
        lr: AdamW learning rate of the tuned decoder layers.
        head_lr: Learning rate of the new layer norm and linear layer.
        batch_size: Pairs per step (batches are length-bucketed, so padding stays small).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay to zero.
        seed: Seed of the batch order.
        precision: ``"bf16"`` runs the tuned layers under bfloat16 autocast (fp32 master weights;
            1.5x faster per step than fp32 on the project's 2-core AVX512-BF16 machine, see
            ``benchmarks/bench_tuned_head.py``) or ``"fp32"``. Prediction uses the same precision
            as training.
    """

    epochs: float = 2.0
    lr: float = 3e-5
    head_lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_steps: int = 30
    seed: int = 0
    precision: Precision = "bf16"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise bad_value("precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        for name in ("epochs", "lr", "head_lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise bad_value(name, value, "a number > 0")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise bad_value("weight_decay", self.weight_decay, "a number >= 0")
        check_int("batch_size", self.batch_size, 1)
        check_int("warmup_steps", self.warmup_steps, 0)

    def as_dict(self) -> dict[str, Any]:
        """The settings, for the judge's metadata."""
        return asdict(self)


def autocast(device: torch.device, precision: str):
    """The autocast context of a tuned head's forward pass (a no-op for ``"fp32"``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def length_batches(
    lengths: torch.Tensor, rows: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Row batches of similar length: sorted, then (with ``generator``) jittered and shuffled.

    Without a generator the order is deterministic (for prediction); with one, rows are sorted by
    length plus up to 24 tokens of noise, cut into batches, and the batches shuffled, so training
    sees varied batches at little padding cost.
    """
    if rows.numel() == 0:
        return []
    key = lengths[rows].float()
    if generator is not None:
        key = key + torch.rand(len(rows), generator=generator) * 24
    chunks = list(rows[torch.argsort(key, stable=True)].split(batch_size))
    if generator is not None:
        chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=generator).tolist()]
    return chunks


def warmup_decay(step: int, warmup_steps: int, total: int) -> float:
    """The learning-rate factor at optimiser step ``step`` (0-based) of ``total``.

    A linear warm-up over ``warmup_steps`` (the first step already at ``1 / warmup_steps``) times a
    linear decay to zero over the whole run. Kept rather than transformers'
    ``get_linear_schedule_with_warmup``, which starts at 0 and decays only after the warm-up: the
    rates differ at every step (tests/test_lm_judge.py), and the shipped judge was trained with these.
    """
    return min(1.0, (step + 1) / max(warmup_steps, 1)) * max(0.0, 1.0 - step / total)


def _optimizer(head: TunedHead, settings: TuneSettings, total: int):
    """AdamW over the tuned layers (``lr``) and the new norm and linear layer (``head_lr``), with the
    :func:`warmup_decay` schedule over ``total`` steps."""
    new = [*head.norm.parameters(), *head.out.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": head.layers.parameters(), "lr": settings.lr}, {"params": new, "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, settings.warmup_steps, total)
    )
    return optimizer, schedule


def fit_tuned_head(
    head: TunedHead,
    tokens: TokenStates,
    gold: torch.Tensor,
    rows: torch.Tensor,
    settings: TuneSettings,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Trains ``head`` in place on ``rows`` of ``tokens`` with labels ``gold`` (binary cross-entropy).

    Args:
        head: The head to train (its decoder layers and linear part all train).
        tokens: Cached trunk states of every pair.
        gold: ``[N]`` 0/1 labels of every pair.
        rows: Indices of the training pairs.
        settings: Optimiser and schedule.
        progress: Called with ``(step, total steps, loss)`` after each step.

    Returns:
        ``{"steps", "first_loss", "last_loss"}`` (the losses are means over the first/last 20 steps).
    """
    device = next(head.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    per_epoch = len(length_batches(tokens.lengths, rows, settings.batch_size))
    total = max(1, round(per_epoch * settings.epochs))
    optimizer, schedule = _optimizer(head, settings, total)
    head.train()
    losses: list[float] = []
    step = 0
    while step < total:
        for batch_rows in length_batches(tokens.lengths, rows, settings.batch_size, generator):
            x, lengths, spans = tokens.batch(batch_rows, device)
            with autocast(device, settings.precision):
                logits = head(x, lengths, spans).float()
            loss = nn.functional.binary_cross_entropy_with_logits(logits, gold[batch_rows].float().to(device))
            optimizer.zero_grad()
            loss.backward()
            # Clipping keeps an early large-gradient batch from wrecking the pretrained layers.
            nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, total, losses[-1])
            if step >= total:
                break
    head.eval()
    window = min(20, len(losses))
    return {
        "steps": total,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }


@torch.no_grad()
def tuned_probabilities(
    head: TunedHead, tokens: TokenStates, rows: torch.Tensor, batch_size: int = 16, precision: str = "bf16"
) -> torch.Tensor:
    """Harmfulness probabilities of ``rows`` (in the order given), shape ``[len(rows)]``.

    ``precision`` should be the one the head was trained with (:attr:`TuneSettings.precision`).
    """
    head.eval()
    device = next(head.parameters()).device
    out = torch.zeros(len(rows))
    position = torch.empty(int(rows.max()) + 1 if rows.numel() else 0, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    for batch_rows in length_batches(tokens.lengths, rows, batch_size):
        x, lengths, spans = tokens.batch(batch_rows, device)
        with autocast(device, precision):
            logits = head(x, lengths, spans)
        out[position[batch_rows]] = torch.sigmoid(logits.float()).cpu()
    return out
