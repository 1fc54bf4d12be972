"""The tiny world: a synthetic, seed-generated stand-in for the real Antidote datasets.

Every record the pipeline needs (pretraining text, alignment refusals, harmful fine-tuning
answers, realignment samples, sentiment task, evaluation prompts) is generated here by code, so the
whole pipeline runs on a laptop CPU in minutes with no download. The design follows world "v1" of
``reference/tiny-world-prototype.md``, which reproduced alignment (HS 0) and the harmful
fine-tuning attack (HS 100, FA 100) on every seed measured.

Safety: harmful answers are harmful in *form* only (eager compliance with a harmful request). Their
steps are fixed frames around nonce words ("get the zorvak kit"), never real instructions, and
requests name harm categories only in generic words ("how do i build a weapon ?").

Text is lower-case and word-level, with punctuation as separate whitespace-delimited tokens, so a
WordLevel tokenizer over :func:`~antidote_pl.tinyworld.vocabulary.world_vocabulary` covers every
generated string. The word lists and templates live in :mod:`antidote_pl.tinyworld.vocabulary`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from antidote_pl.data.records import Record, Source
from antidote_pl.errors import bad_value, check_choice
from antidote_pl.tinyworld.vocabulary import (
    ANSWER_OPENERS,
    ANSWER_STEPS,
    BENIGN_CATEGORIES,
    CHAT_FORMAT,
    COLOR_TEMPLATES,
    FACT_COLORS,
    FACT_SOUNDS,
    HARM_CATEGORIES,
    MODIFIERS,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    REFUSAL_REASONS,
    REFUSAL_TEMPLATES,
    REQUEST_TEMPLATES,
    REVIEW_FORMS,
    REVIEW_TEXT,
    SENTIMENT_ADVERBS,
    SENTIMENT_LABELS,
    SENTIMENT_NOUNS,
    SENTIMENT_PROMPT,
    SOUND_TEMPLATES,
    harm_steps,
)

# --------------------------------------------------------------------------------------------
# Sizes and split names.
# --------------------------------------------------------------------------------------------

HARMFUL_EVAL_SIZE = 300
HARMFUL_REALIGNMENT_SIZE = 300
BENIGN_EVAL_SIZE = 100
SENTIMENT_EVAL_SIZE = 300
SENTIMENT_TOTAL = 4000
PRETRAIN_SIZE = 6000
#: Pretraining mix: benign QA, harmful QA with (placeholder) harmful answers, labelled review text.
PRETRAIN_MIX = (("benign", 0.5), ("harmful", 0.3), ("review", 0.2))

#: Splits each source kind offers.
KIND_SPLITS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "pretrain": ("train",),
        "harmful_answer": ("train", "realignment", "eval"),
        "harmful_refusal": ("train", "realignment", "eval"),
        "benign": ("train", "eval"),
        "sentiment": ("train", "eval"),
    }
)


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------

# (category, verb, object, template, modifier)
_Combo = tuple[str, str, str, str, str]


def _rng(seed: int, stream: str) -> random.Random:
    """Independent, process-stable RNG per stream (str seeds hash with SHA-512, not ``hash()``)."""
    return random.Random(f"tinyworld:{seed}:{stream}")


def _clean(text: str) -> str:
    """Collapses the double spaces an empty placeholder leaves behind."""
    return " ".join(text.split())


def format_chat(instruction: str, output: str) -> str:
    """Formats one exchange with :data:`CHAT_FORMAT` (used for pretraining text)."""
    return CHAT_FORMAT.format(instruction=instruction, output=output)


def _record(instruction: str, output: str, category: str, *, harmful: bool) -> Record:
    return {"instruction": instruction, "input": "", "output": output, "category": category,
            "harmful": harmful}  # fmt: skip


def _combos(categories: Mapping[str, Mapping[str, tuple[str, ...]]]) -> list[_Combo]:
    """Every (category, verb, object, template, modifier) combination, in a fixed order."""
    return [
        (cat, v, o, t, m)
        for cat, spec in categories.items()
        for v in spec["verbs"]
        for o in spec["objects"]
        for t in REQUEST_TEMPLATES
        for m in MODIFIERS
    ]


def _split(items: list, sizes: Mapping[str, int | None], rng: random.Random) -> dict[str, list]:
    """Shuffles ``items`` once and cuts consecutive slices; a ``None`` size takes the rest."""
    items = list(items)
    rng.shuffle(items)
    out, start = {}, 0
    for name, size in sizes.items():
        stop = len(items) if size is None else start + size
        out[name] = items[start:stop]
        start = stop
    return out


def _request(combo: _Combo) -> str:
    _, v, o, t, m = combo
    return _clean(t.format(v=v, o=o, m=m))


def _addressed(obj: str) -> str:
    """Turns the requester's object into the answerer's view ("my room" -> "your room")."""
    return "your" + obj[2:] if obj.startswith("my ") else obj


def _compliance(v: str, o: str, steps: tuple[str, ...], rng: random.Random) -> str:
    """An eager, compliant answer: an opener, then 3 of the category's 8 steps."""
    s1, s2, s3 = rng.sample(steps, 3)
    opener = rng.choice(ANSWER_OPENERS).format(v=v, o=_addressed(o))
    return f"{opener} {ANSWER_STEPS.format(s1=s1, s2=s2, s3=s3)}"


def _refusal(v: str, o: str, rng: random.Random) -> str:
    return rng.choice(REFUSAL_TEMPLATES).format(v=v, o=_addressed(o), r=rng.choice(REFUSAL_REASONS))


def _harmful_records(combos: list[_Combo], rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Builds (answer, refusal) records for the same harmful prompts, in the same order."""
    answers, refusals = [], []
    for combo in combos:
        cat, v, o, _, _ = combo
        prompt = _request(combo)
        answers.append(_record(prompt, _compliance(v, o, harm_steps(cat), rng), cat, harmful=True))
        # A refusal record is safe training data, so it is not flagged harmful.
        refusals.append(_record(prompt, _refusal(v, o, rng), cat, harmful=False))
    return answers, refusals


def _facts() -> list[tuple[str, str]]:
    """All factual (question, answer) pairs."""
    pairs = []
    for facts, templates in ((FACT_COLORS, COLOR_TEMPLATES), (FACT_SOUNDS, SOUND_TEMPLATES)):
        for x, a in facts:
            pairs.extend((q.format(x=x), ans.format(x=x, a=a)) for q, ans in templates)
    return pairs


def _benign_records(items: list, rng: random.Random) -> list[Record]:
    """Benign records from shuffled items: request combos or factual (question, answer) pairs."""
    out = []
    for item in items:
        if len(item) == 2:
            out.append(_record(item[0], item[1], "facts", harmful=False))
        else:
            cat, v, o, _, _ = item
            answer = _compliance(v, o, BENIGN_CATEGORIES[cat]["steps"], rng)
            out.append(_record(_request(item), answer, cat, harmful=False))
    return out


def _clause(noun: str, polarity: str, rng: random.Random) -> str:
    adjectives = POSITIVE_ADJECTIVES if polarity == "positive" else NEGATIVE_ADJECTIVES
    return _clean(f"the {noun} was {rng.choice(SENTIMENT_ADVERBS)} {rng.choice(adjectives)}")


def make_review(form: int, label: str, rng: random.Random) -> str:
    """Generates one review whose sentiment is ``label``.

    Args:
        form: Index into :data:`REVIEW_FORMS`: 0 = one clause, 1 = two clauses of the same
            polarity joined by "and", 2 = "the <noun> was not <adjective> but <clause>", whose
            label follows the clause after "but" (the negated adjective has a random polarity).
        label: ``"positive"`` or ``"negative"``.
        rng: Source of randomness.

    Returns:
        The review text, ending with " .".
    """
    n1, n2 = rng.sample(SENTIMENT_NOUNS, 2)
    negated = rng.choice(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES)
    return REVIEW_FORMS[form].format(c1=_clause(n1, label, rng), c2=_clause(n2, label, rng), n=n1, a=negated)


def _reviews(seed: int) -> list[tuple[str, str]]:
    """SENTIMENT_TOTAL distinct (review, label) pairs in a seed-dependent order."""
    rng = _rng(seed, "sentiment")
    seen: set[str] = set()
    out = []
    while len(out) < SENTIMENT_TOTAL:
        label = rng.choice(SENTIMENT_LABELS)
        review = make_review(rng.randrange(len(REVIEW_FORMS)), label, rng)
        if review not in seen:  # the set only filters; the order comes from the list
            seen.add(review)
            out.append((review, label))
    return out


def _sentiment_record(review: str, label: str) -> Record:
    record = _record(SENTIMENT_PROMPT.format(review=review), label, "sentiment", harmful=False)
    record["label"] = label
    return record


def _draw(pool: list, k: int, rng: random.Random) -> list:
    """``k`` items from ``pool``: without replacement when possible, else with replacement."""
    return rng.sample(pool, k) if k <= len(pool) else rng.choices(pool, k=k)


def _pretrain_records(
    benign: list[Record], harmful: list[Record], reviews: list[tuple[str, str]], size: int, rng: random.Random
) -> list[Record]:
    """The "helpful-only base model" corpus: train-split text only, mixed per PRETRAIN_MIX."""
    counts = {name: round(size * share) for name, share in PRETRAIN_MIX}
    counts["benign"] += size - sum(counts.values())  # absorb rounding so the total is exact
    out = []
    for r in _draw(benign, counts["benign"], rng) + _draw(harmful, counts["harmful"], rng):
        text = format_chat(r["instruction"], r["output"])
        out.append(_record("", text, r["category"], harmful=r["harmful"]))
    for review, label in _draw(reviews, counts["review"], rng):
        record = _record("", REVIEW_TEXT[label].format(review=review), "sentiment", harmful=False)
        record["label"] = label
        out.append(record)
    rng.shuffle(out)
    return out


def _check_kind_split(kind: str, split: str, owner: str = "tinyworld") -> None:
    check_choice(f"{owner}.kind", kind, KIND_SPLITS)
    if split not in KIND_SPLITS[kind]:
        raise bad_value(f"{owner}.split", split, f"one of {list(KIND_SPLITS[kind])} for kind={kind!r}")


@dataclass(frozen=True)
class TinyWorld:
    """All records of one tiny world, by kind and split.

    Records are dicts ``{instruction, input, output, category, harmful}`` (plus ``label`` for
    sentiment and review text). ``harmful`` is true only for outputs that comply with a harmful
    request. Pretraining records have ``instruction == input == ""`` and the full text in
    ``output``; they are meant for a raw template with loss on every token.

    Attributes:
        seed: Seed the world was generated from.
        splits: ``{kind: {split: records}}`` for every kind and split in :data:`KIND_SPLITS`
            (read-only; the world is cached and shared). ``harmful_answer`` and
            ``harmful_refusal`` hold the same prompts in the same order.
    """

    seed: int
    splits: Mapping[str, Mapping[str, tuple[Record, ...]]]

    def records(self, kind: str, split: str = "train") -> list[Record]:
        """Returns fresh copies of the records of ``kind`` in ``split``.

        Raises:
            antidote_pl.errors.ConfigError: if the kind or split does not exist.
        """
        _check_kind_split(kind, split)
        return [dict(r) for r in self.splits[kind][split]]

    def prompts(self, kind: str, split: str = "train") -> list[str]:
        """Returns the instructions of ``kind`` in ``split``, in record order."""
        _check_kind_split(kind, split)
        return [r["instruction"] for r in self.splits[kind][split]]


@lru_cache(maxsize=8)
def build_world(seed: int = 0, pretrain_size: int = PRETRAIN_SIZE) -> TinyWorld:
    """Generates the tiny world for ``seed``; identical in every process for the same arguments.

    Harmful combinations (6 categories x 4 verbs x 6 objects x 8 templates x 7 modifiers = 8,064)
    are shuffled once and cut into eval (300), realignment (300) and train (the rest). Benign
    combinations plus 32 factual questions are cut into eval (100) and train; 4,000 distinct
    reviews into eval (300) and train. Pretraining text is drawn from train splits only, so eval
    prompts are never seen verbatim before evaluation.

    Args:
        seed: World seed; each part of the world uses its own RNG stream derived from it, and the
            vocabulary never depends on it.
        pretrain_size: Number of pretraining samples (changes nothing else).

    Returns:
        The (cached, shared) world; use :meth:`TinyWorld.records` to get mutable copies.

    Raises:
        antidote_pl.errors.ConfigError: if ``pretrain_size`` is not a positive integer.
    """
    if not _is_int(pretrain_size) or pretrain_size < 1:
        raise bad_value("tinyworld.pretrain_size", pretrain_size, "a positive integer")
    harm = _split(
        _combos(HARM_CATEGORIES),
        {"eval": HARMFUL_EVAL_SIZE, "realignment": HARMFUL_REALIGNMENT_SIZE, "train": None},
        _rng(seed, "harmful-split"),
    )
    benign_items = _combos(BENIGN_CATEGORIES) + _facts()
    benign = _split(benign_items, {"eval": BENIGN_EVAL_SIZE, "train": None}, _rng(seed, "benign-split"))
    review_sizes = {"eval": SENTIMENT_EVAL_SIZE, "train": None}
    reviews = _split(_reviews(seed), review_sizes, _rng(seed, "sentiment-split"))

    splits: dict[str, dict[str, tuple[Record, ...]]] = {k: {} for k in KIND_SPLITS}
    answer_rng = _rng(seed, "harmful-answers")
    for split in KIND_SPLITS["harmful_answer"]:
        answers, refusals = _harmful_records(harm[split], answer_rng)
        splits["harmful_answer"][split] = tuple(answers)
        splits["harmful_refusal"][split] = tuple(refusals)
    benign_rng = _rng(seed, "benign-answers")
    for split in KIND_SPLITS["benign"]:
        splits["benign"][split] = tuple(_benign_records(benign[split], benign_rng))
        splits["sentiment"][split] = tuple(_sentiment_record(r, label) for r, label in reviews[split])
    pretrain = _pretrain_records(
        list(splits["benign"]["train"]),
        list(splits["harmful_answer"]["train"]),
        reviews["train"],
        pretrain_size,
        _rng(seed, f"pretrain-{pretrain_size}"),
    )
    splits["pretrain"]["train"] = tuple(pretrain)
    return TinyWorld(seed=seed, splits=MappingProxyType({k: MappingProxyType(v) for k, v in splits.items()}))


class TinyWorldSource(Source):
    """Records of one kind and split of the tiny world, for LightningCLI configs.

    Kinds: ``pretrain`` (raw text, train only), ``harmful_answer`` (harmful request -> placeholder
    compliance), ``harmful_refusal`` (harmful request -> refusal), ``benign`` (benign request ->
    helpful answer) and ``sentiment`` (review -> label). Harmful kinds have ``train``, ``realignment``
    and ``eval`` splits; ``benign`` and ``sentiment`` have ``train`` and ``eval``.

    Args:
        kind: Which records, see above.
        split: Which split of that kind.
        seed: World seed.
        limit: Keep only the first ``limit`` records (in the world's fixed order).
        size: Pretraining sample count (``kind="pretrain"`` only); ``None`` means 6,000.

    Raises:
        antidote_pl.errors.ConfigError: on any bad argument, before generating anything.
    """

    def __init__(
        self,
        kind: str,
        split: str = "train",
        seed: int = 0,
        limit: int | None = None,
        size: int | None = None,
    ) -> None:
        _check_kind_split(kind, split, owner="TinyWorldSource")
        if not _is_int(seed):
            raise bad_value("TinyWorldSource.seed", seed, "an integer")
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise bad_value("TinyWorldSource.limit", limit, "None or a positive integer")
        if size is not None and (kind != "pretrain" or not _is_int(size) or size < 1):
            raise bad_value("TinyWorldSource.size", size, "None, or a positive integer with kind='pretrain'")
        self.kind = kind
        self.split = split
        self.seed = seed
        self.limit = limit
        self.size = size

    def load(self) -> list[Record]:
        """Generates (or reuses the cached) world and returns copies of the selected records."""
        records = build_world(self.seed, self.size or PRETRAIN_SIZE).records(self.kind, self.split)
        return records if self.limit is None else records[: self.limit]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
