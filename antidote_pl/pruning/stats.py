"""Streaming Wanda activation statistics: per-input-feature sums of squared activations.

The official code collects them with a per-sample, layer-by-layer loop that keeps every layer input in
memory (reference §B.3). Because no mask is applied during calibration, one ordinary batched forward
pass with hooks on every target is exactly equivalent; here it needs O(in_features) memory per target
plus one batch, and padding is excluded through a per-batch token mask (reference §G.3, §G.5).

The pass also stops early: once every hooked target has received its input for the batch, the rest
of the forward (later layers, the final norm and the LM head, a large share of a forward with a big
vocabulary) cannot change the statistics, so :func:`run_calibration` ends it there (see
:class:`_ForwardStop`). The statistics are bit-identical to a full forward's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from antidote_pl.errors import ConfigError, bad_value, check_choice, check_int
from antidote_pl.pruning.targets import TargetInfo

STATISTICS = ("sample_mean", "token_mean", "sample_token_mean")
TOKEN_MASKS = ("attention", "response", "decisive")
IGNORE_INDEX = -100
DEFAULT_DECISIVE_TOKENS = 8
# Tokens of the probe forward that counts each target's calls per forward (see _ForwardStop).
_PROBE_TOKENS = 4


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward whose remaining layers feed no target."""


class _ForwardStop:
    """Counts target calls in a forward and ends it once every target had all of its calls.

    How often each target runs per forward is measured once by a short probe forward (a module may
    run several times, e.g. a shared layer); a forward is then stopped at the call that completes the
    count. If the probe misses a target (e.g. an expert a routed model did not use), stopping stays
    off and every forward runs to the end, so a late call can never be lost. Call counts must not
    depend on the input otherwise (true of dense decoder LMs: each target runs a fixed number of
    times per forward, whatever the tokens).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)
        self.expected: dict[str, int] | None = None
        self.probed = False
        self.probing = False
        self.armed = False
        self.calls = dict.fromkeys(self.names, 0)
        self.remaining = 0

    def start_batch(self) -> None:
        """Resets the per-forward counts (before each forward)."""
        self.calls = dict.fromkeys(self.names, 0)
        self.remaining = sum(self.expected.values()) if self.expected else 0

    def finish_probe(self) -> None:
        """Turns the probe's counts into the expected calls per forward."""
        self.probing, self.probed = False, True
        self.expected = dict(self.calls) if all(self.calls.values()) else None

    def seen(self, name: str) -> None:
        """Counts one call of target ``name``; raises :class:`_StopForward` after the last one."""
        if self.probing:
            self.calls[name] += 1
            return
        if not self.armed or self.expected is None:
            return  # a forward outside run_calibration, or stopping is off
        count = self.calls[name] = self.calls[name] + 1
        if count <= self.expected[name]:
            self.remaining -= 1
            if self.remaining == 0:
                raise _StopForward


class ActivationStats:
    """Accumulates, per target, fp32 sums of squared inputs per input feature over real tokens.

    Three normalisations are available from the same pass (see :meth:`statistic`):

    * ``"sample_mean"`` (official parity): ``Σ_s Σ_t x²`` divided by the number of samples, so long
      samples weigh more.
    * ``"token_mean"``: the same sum divided by the number of tokens. It differs from
      ``"sample_mean"`` only by a factor shared by all targets that saw the same tokens, so it selects
      the same masks; it puts score values on a per-token scale.
    * ``"sample_token_mean"``: the mean over samples of each sample's per-token mean, so every sample
      weighs the same regardless of its length (the fix suggested in reference §G.5).

    Attributes:
        sum_sq: Per target, ``Σ_s Σ_t x²`` per input feature (fp32).
        sum_sample_mean_sq: Per target, ``Σ_s (Σ_t x² / T_s)`` per input feature (fp32).
        n_tokens: Per target, number of counted tokens.
        n_samples: Per target, number of samples with at least one counted token.
    """

    def __init__(self, features: Mapping[str, int], device: torch.device | str | None = None) -> None:
        """Creates zeroed accumulators.

        Args:
            features: Input-feature count per target name.
            device: Where the accumulators live (move them next to the activations to avoid
                per-batch transfers; under DDP it must be a device the process group can reduce on).
        """
        self.sum_sq = {
            n: torch.zeros(int(f), dtype=torch.float32, device=device) for n, f in features.items()
        }
        self.sum_sample_mean_sq = {n: torch.zeros_like(t) for n, t in self.sum_sq.items()}
        self.n_tokens = dict.fromkeys(features, 0)
        self.n_samples = dict.fromkeys(features, 0)
        self._mask: torch.Tensor | None = None
        self._mask_tokens = 0
        self._mask_samples = 0
        self._drop: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._recent: list[tuple[tuple, torch.Tensor, tuple[torch.Tensor, int, int]]] = []
        self._stop: _ForwardStop | None = None  # set by collect() while its hooks are on

    @classmethod
    def for_targets(
        cls, targets: Mapping[str, TargetInfo], device: torch.device | str | None = None
    ) -> ActivationStats:
        """Accumulators sized for ``targets`` (see :func:`~antidote_pl.pruning.targets.find_targets`)."""
        return cls({name: info.in_features for name, info in targets.items()}, device=device)

    @property
    def names(self) -> list[str]:
        """Target names, in insertion order."""
        return list(self.sum_sq)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Sets which positions of the *next* forward pass count; call before every batch.

        Args:
            mask: ``[B, T]`` bool (True = count), e.g. ``attention_mask.bool()``; ``None`` counts
                every position of every hooked input.
        """
        self._recent = []
        if mask is None:
            self._mask = self._drop = self._weights = None
            return
        if mask.dim() != 2:
            raise bad_value("token_mask.shape", tuple(mask.shape), "a [batch, seq_len] mask")
        self._mask = mask.bool()
        self._drop = ~self._mask.unsqueeze(-1)
        row_tokens = self._mask.sum(dim=1)
        self._weights = _token_weights(self._mask, row_tokens)
        # One host sync per batch here instead of one per hooked module.
        counts = torch.stack([row_tokens.sum(), (row_tokens > 0).sum()])
        self._mask_tokens, self._mask_samples = counts.tolist()

    @torch.no_grad()
    def update(self, name: str, x: torch.Tensor) -> None:
        """Adds one forward input of target ``name`` (the hook body).

        Args:
            name: Target name.
            x: ``[B, T, in]`` (or ``[T, in]``, counted as one sample) input activations of any float
                dtype; they are cast to fp32 before squaring.
        """
        acc = self.sum_sq[name]
        if x.shape[-1] != acc.numel():
            raise ConfigError(
                f"target {name}: input has {x.shape[-1]} features, statistic expects {acc.numel()}."
            )
        x = x.detach()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        sums, tokens, samples = self._batch_sums(name, x)
        if acc.device != sums.device:
            acc = self.sum_sq[name] = acc.to(sums.device)
            self.sum_sample_mean_sq[name] = self.sum_sample_mean_sq[name].to(sums.device)
        acc.add_(sums[0])
        self.sum_sample_mean_sq[name].add_(sums[1])
        self.n_tokens[name] += int(tokens)
        self.n_samples[name] += int(samples)

    def _batch_sums(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """This batch's ``[2, in]`` fp32 contributions, ``Σ_s Σ_t x²`` and ``Σ_s (Σ_t x² / T_s)`` over
        counted positions, with the batch's counted tokens and samples.

        Both sums come from one matrix product of per-position weights (see :func:`_token_weights`)
        with the squared inputs, instead of a chain of small reductions: on small models the hooks'
        cost is mostly per-operation overhead. Targets that read the very same input tensor (the
        ``lora_A`` of q, k and v all see one hidden state) share one result. The last two distinct
        inputs of the current batch are remembered (enough for peft's A, B, A, B, ... call order);
        holding them keeps their memory from being reused by another tensor while they serve as keys,
        and :meth:`set_token_mask` releases them.
        """
        key = _input_key(x)
        for i, entry in enumerate(self._recent):
            if key is not None and entry[0] == key:
                # Most recently used first, so the next distinct input evicts the other entry.
                self._recent = [entry, *self._recent[:i], *self._recent[i + 1 :]]
                return entry[2]
        if self._mask is None:
            full = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            weights, drop = _token_weights(full, full.sum(dim=1)), None
            tokens, samples = x.shape[0] * x.shape[1], x.shape[0]
        else:
            if tuple(x.shape[:-1]) != tuple(self._mask.shape):
                raise ConfigError(
                    f"target {name}: input positions {tuple(x.shape[:-1])} do not match the token mask "
                    f"{tuple(self._mask.shape)}; set a mask for this batch or None."
                )
            weights, drop = self._weights.to(x.device), self._drop.to(x.device)
            tokens, samples = self._mask_tokens, self._mask_samples
        # One fresh fp32 buffer, squared and masked in place.
        sq = x.square() if x.dtype == torch.float32 else x.float().square_()
        if drop is not None:
            # Zeroed after squaring, not left to the zero weights: padded positions may hold inf/NaN,
            # and 0 * inf would leak NaN into the sums.
            sq.masked_fill_(drop, 0.0)
        result = (weights @ sq.reshape(-1, sq.shape[-1]), tokens, samples)
        if key is not None:
            self._recent = [(key, x, result), *self._recent[:1]]
        return result

    def statistic(self, kind: str = "sample_mean") -> dict[str, torch.Tensor]:
        """Per-target, per-input-feature mean squared activation (the Wanda ``scaler_row``).

        Args:
            kind: One of ``"sample_mean"``, ``"token_mean"``, ``"sample_token_mean"``.

        Raises:
            ConfigError: Unknown ``kind``, or a target that saw no counted token.
        """
        check_choice("statistic", kind, STATISTICS)
        empty = [n for n in self.names if self.n_tokens[n] == 0]
        if empty:
            raise bad_value(
                "calibration data",
                f"0 counted tokens for {len(empty)} targets (e.g. {empty[0]})",
                "at least one real token reaching every target",
            )
        if kind == "token_mean":
            return {n: self.sum_sq[n] / self.n_tokens[n] for n in self.names}
        sums = self.sum_sq if kind == "sample_mean" else self.sum_sample_mean_sq
        return {n: sums[n] / self.n_samples[n] for n in self.names}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor dict (CPU) for saving with safetensors."""
        out: dict[str, torch.Tensor] = {}
        for n in self.names:
            out[f"sum_sq/{n}"] = self.sum_sq[n].cpu()
            out[f"sum_sample_mean_sq/{n}"] = self.sum_sample_mean_sq[n].cpu()
            out[f"counts/{n}"] = torch.tensor([self.n_tokens[n], self.n_samples[n]], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> ActivationStats:
        """Inverse of :meth:`to_tensors`."""
        prefix = "sum_sq/"
        features = {k[len(prefix) :]: v.numel() for k, v in tensors.items() if k.startswith(prefix)}
        stats = cls(features, device=device)
        try:
            for n in features:
                stats.sum_sq[n].copy_(tensors[f"sum_sq/{n}"])
                stats.sum_sample_mean_sq[n].copy_(tensors[f"sum_sample_mean_sq/{n}"])
                stats.n_tokens[n], stats.n_samples[n] = (int(v) for v in tensors[f"counts/{n}"].tolist())
        except KeyError as e:
            raise bad_value(
                "stats tensors", sorted(tensors)[:4], f"the keys written by to_tensors ({e})"
            ) from e
        return stats

    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> None:
        """SUM-reduces sums and counts over ``group``; a no-op unless torch.distributed is initialised.

        All sums are packed into one fp32 buffer and all counts into one int64 buffer on the device of
        the first accumulator, so two collectives serve any number of targets. Every rank must hold the
        same target names in the same order.
        """
        if not (dist.is_available() and dist.is_initialized()) or not self.names:
            return
        device = next(iter(self.sum_sq.values())).device
        sums = [self.sum_sq, self.sum_sample_mean_sq]
        flat = torch.cat([d[n].to(device) for d in sums for n in self.names])
        counts = torch.tensor(
            [c[n] for c in (self.n_tokens, self.n_samples) for n in self.names],
            dtype=torch.int64,
            device=device,
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for d in sums:
            for n in self.names:
                size = d[n].numel()
                d[n] = flat[offset : offset + size].clone()
                offset += size
        k = len(self.names)
        values = counts.tolist()
        self.n_tokens = dict(zip(self.names, values[:k]))
        self.n_samples = dict(zip(self.names, values[k:]))


def _token_weights(mask: torch.Tensor, row_tokens: torch.Tensor) -> torch.Tensor:
    """``[2, B*T]`` fp32 weights per position: row 0 counts each real token once, row 1 weighs it by
    ``1 / T_s`` (its sample's token count), so ``weights @ x²`` yields both accumulated sums."""
    counted = mask.float()
    per_sample = counted / row_tokens.clamp_min(1).unsqueeze(-1)
    return torch.stack([counted, per_sample]).view(2, -1)


def _input_key(x: torch.Tensor) -> tuple | None:
    """Identity of a tensor's current contents (memory, layout, in-place version), or None."""
    try:
        version = x._version
    except RuntimeError:  # inference-mode tensors track no version, so they are never shared
        return None
    return (x.data_ptr(), x.device, x.dtype, tuple(x.shape), x.stride(), version)


def _hook(
    stats: ActivationStats, stop: _ForwardStop, name: str, module: nn.Module, args: tuple, kwargs: dict
) -> None:
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if x is None:
        raise ConfigError(f"target {name}: forward was called without a tensor input.")
    if not stop.probing:
        stats.update(name, x)
    stop.seen(name)


@contextlib.contextmanager
def collect(
    model: nn.Module,
    targets: Mapping[str, TargetInfo],
    stats: ActivationStats | None = None,
    device: torch.device | str | None = None,
) -> Iterator[ActivationStats]:
    """Hooks every target's input for the duration of the block; hooks are removed on exit.

    Args:
        model: The model the targets were found in (checked, so targets from another model instance,
            e.g. one rebuilt by peft, fail loudly instead of silently collecting nothing).
        targets: From :func:`~antidote_pl.pruning.targets.find_targets`.
        stats: Accumulators to add to; new ones are created when omitted.
        device: Device for new accumulators (default: the first target's parameter device).

    Yields:
        The statistics being accumulated.
    """
    module_ids = {id(m) for m in model.modules()}
    foreign = [n for n, t in targets.items() if id(t.hook_module) not in module_ids]
    if foreign:
        raise bad_value("targets", foreign[:3], "targets discovered on this same model instance")
    if stats is None:
        if device is None and targets:
            device = next(iter(targets.values())).param.device
        stats = ActivationStats.for_targets(targets, device=device)
    missing = [n for n in targets if n not in stats.sum_sq]
    if missing:
        raise bad_value("stats", missing[:3], "accumulators for every target")
    stop = _ForwardStop(targets)
    handles = [
        t.hook_module.register_forward_pre_hook(partial(_hook, stats, stop, name), with_kwargs=True)
        for name, t in targets.items()
    ]
    stats._stop = stop
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        stats._stop = None
        stats.set_token_mask(None)


def batch_token_mask(
    batch: Mapping[str, torch.Tensor],
    token_mask: str = "attention",
    decisive_tokens: int = DEFAULT_DECISIVE_TOKENS,
) -> torch.Tensor:
    """Positions that count for the statistic: real tokens, optionally only some of them.

    Args:
        batch: Dict with ``input_ids``, ``attention_mask`` and (for ``"response"`` and
            ``"decisive"``) ``labels``, unshifted as in HF batches, ``-100`` on the prompt.
        token_mask: ``"attention"``: every non-padding token (official parity); ``"response"``:
            non-padding tokens whose label is not -100; ``"decisive"``: the prompt (real tokens
            labelled -100) and the first ``decisive_tokens`` response tokens of each sample, where a
            refusal or a compliance is decided.
        decisive_tokens: ``k`` of ``"decisive"``: response tokens counted per sample (0 = prompt only).
    """
    check_choice("token_mask", token_mask, TOKEN_MASKS)
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
    else:
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if token_mask == "attention":
        return mask
    if "labels" not in batch:
        raise bad_value("token_mask", token_mask, "batches with `labels` (or token_mask='attention')")
    response = mask & (batch["labels"] != IGNORE_INDEX)
    if token_mask == "response":
        return response
    check_int("decisive_tokens", decisive_tokens, 0)
    # 1-based rank of each response token within its sample.
    rank = response.long().cumsum(dim=1)
    return (mask & ~response) | (response & (rank <= decisive_tokens))


def run_calibration(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    stats: ActivationStats,
    token_mask: str = "attention",
    device: torch.device | str | None = None,
    decisive_tokens: int = DEFAULT_DECISIVE_TOKENS,
) -> int:
    """Runs the no-grad forward passes that feed hooked statistics (inside :func:`collect`).

    The model is put in eval mode (LoRA dropout off, as in the official run) and its previous mode is
    restored afterwards. Labels are not passed to the model, so no loss is computed. Each forward
    ends as soon as every hooked target has received its input (layers after the last target and
    the LM head never run); a short probe forward first counts each target's calls per forward.

    Args:
        model: The hooked model.
        batches: Dicts with ``input_ids``, ``attention_mask`` and optionally ``labels``.
        stats: The statistics returned by :func:`collect`.
        token_mask: ``"attention"``, ``"response"`` or ``"decisive"`` (see :func:`batch_token_mask`).
        device: Where inputs go (default: the device of the model's first parameter).
        decisive_tokens: Response tokens per sample counted by ``token_mask="decisive"``.

    Returns:
        Number of batches run.
    """
    check_choice("token_mask", token_mask, TOKEN_MASKS)
    if token_mask == "decisive":
        check_int("decisive_tokens", decisive_tokens, 0)
    if device is None:
        device = next(model.parameters()).device
    stop = stats._stop
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch_token_mask(batch, token_mask, decisive_tokens)
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
                if stop is not None and not stop.probed:
                    _probe(model, inputs, stop)
                stats.set_token_mask(mask.to(device))
                _forward(model, inputs, stop)
                n += 1
    finally:
        stats.set_token_mask(None)
        if stop is not None:
            stop.armed = False
        model.train(was_training)
    return n


def _probe(model: nn.Module, inputs: Mapping[str, torch.Tensor], stop: _ForwardStop) -> None:
    """One forward on the first few tokens of one sample, counting (not accumulating) target calls."""
    probe = {k: v[:1, :_PROBE_TOKENS] for k, v in inputs.items()}
    if "attention_mask" in probe:
        # Real tokens only, so a left-padded first sample still runs like real data.
        probe["attention_mask"] = torch.ones_like(probe["attention_mask"])
    stop.probing = True
    stop.start_batch()
    try:
        model(**probe, use_cache=False)
    finally:
        stop.finish_probe()


def _forward(model: nn.Module, inputs: Mapping[str, Any], stop: _ForwardStop | None) -> None:
    """One calibration forward, ended by the hooks once every target has its input."""
    if stop is None:
        model(**inputs, use_cache=False)
        return
    stop.start_batch()
    stop.armed = True
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        stop.armed = False
