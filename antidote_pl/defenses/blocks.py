"""Shared pieces of the baseline defenses: decoder-block discovery, block-output hooks, auxiliary data.

Defenses act on the hidden states between decoder blocks. The blocks are found generically (no
``model.model.layers`` paths, no per-architecture class lists, reference G.4): the longest
``nn.ModuleList`` whose items are modules of one class that each contain an attention module. This
finds ``model.layers`` of Llama, Mistral, Gemma and Qwen2, GPT-2's ``transformer.h``, and the same
lists inside a peft wrapper.

Hooks are forward hooks that *return* a new output (never ``.data`` mutation) and are removed when
their context manager exits, even on an exception. Transformers (>= 5) checkpoints a layer's
``forward`` rather than ``__call__``, so hooks on decoder blocks are not re-run when gradient
checkpointing recomputes a block; MLP hooks are, which :func:`capture_outputs` tolerates (the first
output seen per module wins).

:class:`AuxiliaryStream` serves the auxiliary records a defense trains on next to the user's batch
(RepNoise's and Booster's harmful set, Lisa's guide data): tokenised once, then cycled through
without a new iterator per step; under DDP each rank reads its own shard.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from antidote_pl.data.records import Source
from antidote_pl.data.templates import get_template
from antidote_pl.data.tokenize import SFTCollator, tokenize_records
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_number

REPRESENTATIONS = ("block", "mlp")
#: ``project``: this project's variant of a defense (documented per defense); ``parity``: the
#: official implementation's behaviour (reference D), for numbers comparable with the paper's.
MODES = ("project", "parity")

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_MLP_CLASS = re.compile(r"mlp|feedforward|ffn", re.IGNORECASE)


# ----------------------------------------------------------------------------- discovery
def _is_block_list(modules: nn.ModuleList) -> bool:
    """A list of repeated transformer blocks: one class throughout, each holding an attention module."""
    if len(modules) == 0 or len({type(m) for m in modules}) != 1:
        return False
    first = modules[0]
    return any(_ATTENTION_CLASS.search(type(sub).__name__) for sub in first.modules() if sub is not first)


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """Returns the ``nn.ModuleList`` of decoder blocks of a causal LM (peft-wrapped or not).

    The longest list of same-class modules that each contain an attention-like module (class name
    with "Attention"/"Attn"); on a tie the first one in module order wins. Lists of experts or
    projections hold no attention module and are never chosen.

    Args:
        model: A transformers model or a peft ``PeftModel``.

    Returns:
        The list itself (its items are the block modules, in depth order).

    Raises:
        ConfigError: if no such list exists.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or (best is not None and len(module) <= len(best)):
            continue
        if _is_block_list(module):
            best = module
    if best is None:
        raise bad_value(
            "model",
            type(model).__name__,
            "an architecture with discoverable decoder blocks (an nn.ModuleList of same-class modules "
            "that each contain an attention module); none was found",
        )
    return best


def _find_child(block: nn.Module, pattern: re.Pattern, names: str, option: tuple[str, str, str]) -> nn.Module:
    """The first direct child of ``block`` whose class name matches ``pattern``.

    Raises:
        ConfigError: naming the option that needs it (``option`` = field, value, the alternative).
    """
    for child in block.children():
        if pattern.search(type(child).__name__):
            return child
    field, value, alternative = option
    found = f"{type(block).__name__} has no direct child whose class name contains {names}"
    raise bad_value(field, value, f"{alternative}: {found}")


def find_mlp(block: nn.Module) -> nn.Module:
    """Returns the feed-forward child of a decoder block (class name with "MLP"/"FeedForward"/"FFN").

    Raises:
        ConfigError: if the block has no such direct child.
    """
    return _find_child(block, _MLP_CLASS, "MLP/FeedForward/FFN", ("representation", "mlp", "'block'"))


def find_attention(block: nn.Module) -> nn.Module:
    """Returns the self-attention child of a decoder block (class name with "Attention"/"Attn").

    Its output (the first item when it returns a tuple) is what the block adds to the residual
    stream before the MLP: the hidden state the official Vaccine perturbs.

    Raises:
        ConfigError: if the block has no such direct child.
    """
    return _find_child(block, _ATTENTION_CLASS, "Attention/Attn", ("Vaccine.mode", "parity", "'project'"))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block, in depth order (see :func:`find_attention`)."""
    return [find_attention(b) for b in find_decoder_blocks(model)]


def check_mode(owner: str, mode: Any) -> str:
    """Returns ``mode`` if it is one of :data:`MODES`.

    Raises:
        ConfigError: naming ``<owner>.mode`` otherwise.
    """
    check_choice(f"{owner}.mode", mode, MODES)
    return mode


def parity_value(owner: str, name: str, given: Any, official: Any, default: Any, mode: str) -> Any:
    """Resolves an option whose value the mode decides unless it is given.

    In ``parity`` mode only the official value (or ``None``, meaning it) is accepted; in ``project``
    mode ``None`` means ``default``.

    Args:
        owner: Defense name for the message, e.g. ``"LDIFS"``.
        name: Option name, e.g. ``"reduction"``.
        given: The value passed to the constructor (``None``: not given).
        official: The official implementation's value.
        default: The project mode's default.
        mode: ``project`` or ``parity``.

    Raises:
        ConfigError: on a value other than the official one in parity mode.
    """
    if mode == "parity":
        if given is not None and given != official:
            raise bad_value(
                f"{owner}.{name}",
                given,
                f"{official!r} or null with {owner}.mode='parity' (the official value); "
                f"set {owner}.mode='project' to change it",
            )
        return official
    return default if given is None else given


def representation_modules(model: nn.Module, representation: str) -> list[nn.Module]:
    """The modules whose outputs are a defense's per-layer representations.

    Args:
        model: A transformers model or a peft ``PeftModel``.
        representation: ``"block"`` (decoder-block outputs, the residual stream) or ``"mlp"`` (each
            block's feed-forward output, as in the official RepNoise and LDIFS).

    Raises:
        ConfigError: on an unknown representation or an architecture without the modules.
    """
    check_choice("representation", representation, REPRESENTATIONS)
    blocks = list(find_decoder_blocks(model))
    return blocks if representation == "block" else [find_mlp(b) for b in blocks]


# ----------------------------------------------------------------------------- hooks
def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a block/MLP output (a tensor, or a tuple whose first item it is)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


@contextmanager
def capture_outputs(modules: Sequence[nn.Module], ensure_grad: bool = False) -> Iterator[list]:
    """Records each module's hidden-state output during the forward passes run inside the block.

    The tensors stay in the autograd graph (nothing is detached), so gradients can be taken with
    respect to them.

    Args:
        modules: Modules to watch; the yielded list has one slot per module, in the same order.
        ensure_grad: Make every captured output differentiable: an output that does not require
            grad (no trainable weight upstream, e.g. LoRA only on later blocks) is replaced by a
            detached leaf that does. The forward value is unchanged.

    Yields:
        A list filled during the forward (``None`` for a module that did not run). The first output
        of each module wins, so a gradient-checkpointing recompute does not overwrite it.
    """
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            if outputs[index] is not None:
                return None
            hidden = hidden_of(output)
            if ensure_grad and torch.is_grad_enabled() and not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_(True)
                outputs[index] = hidden
                return with_hidden(output, hidden)
            outputs[index] = hidden
            return None

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_to_outputs(modules: Sequence[nn.Module], deltas: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Adds a constant tensor to each module's hidden-state output during the forward passes inside.

    Args:
        modules: Modules to perturb.
        deltas: One tensor per module (broadcastable to its output), or ``None`` to leave it alone.
            Deltas are detached: the perturbation is a constant for autograd.
    """

    def make_hook(delta: torch.Tensor):
        def hook(_module, _inputs, output):
            hidden = hidden_of(output)
            return with_hidden(output, hidden + delta.to(hidden.dtype))

        return hook

    handles = [
        m.register_forward_hook(make_hook(d.detach()))
        for m, d in zip(modules, deltas, strict=True)
        if d is not None
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that receives gradients, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, computed in fp32."""
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


# ----------------------------------------------------------------------------- validation
def check_sources(field: str, sources: Any) -> list[Source]:
    """Returns ``sources`` as a non-empty list of :class:`Source` (one source is accepted too).

    Raises:
        ConfigError: naming ``field`` otherwise.
    """
    items = [sources] if isinstance(sources, Source) else sources
    if not isinstance(items, list | tuple) or not items or not all(isinstance(s, Source) for s in items):
        raise bad_value(field, sources, "a Source (class_path/init_args) or a non-empty list of them")
    return list(items)


# ----------------------------------------------------------------------------- auxiliary data
def _trainer_of(module) -> Any:
    return getattr(module, "_trainer", None)


def _datamodule_batcher(module) -> Any:
    trainer = _trainer_of(module)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return getattr(datamodule, "batcher", None)


class AuxiliaryStream:
    """An endless, reshuffled stream of batches from auxiliary sources, built once per fit.

    Template, ``max_length`` and batch size default to the training DataModule's (its
    :class:`~antidote_pl.training.batcher.SFTBatcher`), so the auxiliary batches look like the user's.
    Every pass over the data is reshuffled with ``seed`` and the pass number; under DDP a
    :class:`~torch.utils.data.DistributedSampler` gives each rank a disjoint shard.

    Args:
        sources: The records' sources, concatenated in order.
        field: The defense argument the sources came from (for error messages), e.g. ``"RepNoise.harmful"``.
        batch_size: Per-device batch size; ``None`` takes the DataModule's.
        template: Prompt template; ``None`` takes the DataModule's.
        max_length: Maximum tokens per sample; ``None`` takes the DataModule's.
        seed: Shuffle seed.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        field: str,
        batch_size: int | None,
        template: str | None,
        max_length: int | None,
        seed: int,
    ) -> None:
        owner = field.split(".")[0]
        if batch_size is not None:
            check_number(f"{owner}.batch_size", batch_size, low=1, integer=True)
        if max_length is not None:
            check_number(f"{owner}.max_length", max_length, low=1, integer=True)
        check_number(f"{owner}.seed", seed, low=0, integer=True)
        if template is not None:
            get_template(template)
        self.sources = list(sources)
        self.field = field
        self.owner = owner
        self.batch_size = batch_size
        self.template = template
        self.max_length = max_length
        self.seed = seed
        self.num_records = 0
        self.dataset = None  # the tokenised records once built
        self._sampler: DistributedSampler | None = None
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None
        self._epoch = 0

    def _setting(self, name: str, value: Any, batcher: Any) -> Any:
        if value is not None:
            return value
        if batcher is None:
            raise bad_value(
                f"{self.owner}.{name}",
                None,
                "a value: the training data has no DataModule with an SFTBatcher to take it from",
            )
        return getattr(batcher, name)

    def build(self, module) -> None:
        """Loads, tokenises and shards the records for ``module`` (call from ``Defense.attach``).

        Raises:
            ConfigError: if a source yields no record, or a setting is missing.
        """

        batcher = _datamodule_batcher(module)
        template = self._setting("template", self.template, batcher)
        max_length = self._setting("max_length", self.max_length, batcher)
        batch_size = self._setting("batch_size", self.batch_size, batcher)
        records = []
        for i, source in enumerate(self.sources):
            loaded = source.load()
            if not loaded:
                raise bad_value(
                    f"{self.field}[{i}]", type(source).__name__, "a source with at least one record"
                )
            records.extend(loaded)
        dataset = tokenize_records(module.tokenizer, records, template, max_length, name=self.field)
        trainer = _trainer_of(module)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._sampler,
            collate_fn=SFTCollator(module.tokenizer.pad_token_id),
        )
        self.num_records = len(records)
        self.dataset = dataset
        self._iterator = None
        self._epoch = 0

    def next(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Returns the next batch on ``device``; a new pass (reshuffled) starts when one ends."""
        if self._loader is None:
            raise ConfigError(f"{self.field}: the auxiliary data was not built; attach the defense first.")
        if self._iterator is None:
            self._sampler.set_epoch(self._epoch)
            self._iterator = iter(self._loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._epoch += 1
            self._sampler.set_epoch(self._epoch)
            self._iterator = iter(self._loader)
            batch = next(self._iterator)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
