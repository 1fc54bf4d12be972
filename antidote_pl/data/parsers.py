"""Answer parsers for the fine-tuning tasks, following the official evaluation (reference C.2).

Each parser maps a generated response to a canonical answer, or ``None`` when the response does not
contain one (which counts as wrong). Deliberate differences from the official scripts:

* AG News: the official script accepts ``"Sci/Tech"`` and the lowercase ``"sci"`` but not
  ``"sci/tech"``, while it accepts lowercase forms of the three other classes (reference G.9). Here
  every class is also accepted in lowercase, so ``"sci/tech"`` counts; ``"sci"`` is still accepted
  for parity.
* GSM8K numbers: a bare fraction such as ``".5"`` reads as 0.5; the official pattern needs a leading
  digit and reads 5. GSM8K answers are integers, so this only matters for malformed responses.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from antidote_pl.errors import bad_value, check_choice

SST2_LABELS = ("negative", "positive")  # index = GLUE label (1 = positive)
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # index = AG News class id - 1
GSM8K_ANSWER_PREFIX = "The final answer is:"
# The official extractor splits on the phrase with its trailing space (the training data's form).
_GSM8K_SPLIT = GSM8K_ANSWER_PREFIX + " "

_SST2_ACCEPTED = {
    "positive": "positive",
    "Positive": "positive",
    "negative": "negative",
    "Negative": "negative",
}
_AGNEWS_ACCEPTED = {
    **{name: name for name in AGNEWS_CLASSES},
    **{name.lower(): name for name in AGNEWS_CLASSES},
    "sci": "Sci/Tech",  # the official script's only lowercase form for this class
}
# An optional minus sign, then digits with an optional fraction, or a bare fraction (".5").
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def parse_sst2(text: str) -> str | None:
    """``"positive"``/``"negative"`` if the stripped response is exactly a label word, else ``None``.

    As in the official script only the lowercase and capitalised spellings count; anything else
    ("Positive.", "The sentiment is positive") is wrong, as the author confirmed (git-disl/Booster#1).
    """
    return _SST2_ACCEPTED.get(text.strip())


def parse_agnews(text: str) -> str | None:
    """The AG News class name if the stripped response is exactly one (see the module note)."""
    return _AGNEWS_ACCEPTED.get(text.strip())


def parse_gsm8k(text: str) -> float | None:
    """The numeric answer of a GSM8K response, or ``None`` if it has no number.

    Commas are removed first (``1,000`` -> ``1000``). If the response contains
    ``"The final answer is: "`` (with the space; the fine-tuning data ends with that phrase), the
    first number between it and the next occurrence of the phrase (or the end) is taken. When that
    stretch has no number, or the phrase is absent, the last number anywhere is taken: the official
    extractor splits on the phrase, reads the piece after the first occurrence only and falls back
    to the last number of the whole response (reference C.2).
    """
    text = text.replace(",", "")
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    pieces = text.split(_GSM8K_SPLIT)
    if len(pieces) > 1:
        match = _NUMBER.search(pieces[1])
        if match:
            return float(match.group())
    return float(numbers[-1])


def gsm8k_gold(answer: str) -> float:
    """The gold number of a GSM8K reference answer (the text after ``####``, commas removed)."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise bad_value("gsm8k answer", answer[-80:], "a reference answer ending in '#### <number>'")
    return float(tail.strip().replace(",", ""))


PARSERS: dict[str, Callable[[str], object]] = {
    "sst2": parse_sst2,
    "agnews": parse_agnews,
    "gsm8k": parse_gsm8k,
}


def get_parser(task: str) -> Callable[[str], object]:
    """The parser for ``task``.

    Raises:
        ConfigError: for a task without a parser.
    """
    check_choice("task", task, PARSERS)
    return PARSERS[task]


def _canonical_gold(task: str, gold: object) -> object:
    """Normalises the gold answer: a label word / class name, or a number for GSM8K."""
    if task == "gsm8k":
        try:
            return float(str(gold).replace(",", ""))
        except ValueError:
            raise bad_value("gsm8k gold", gold, "a number") from None
    canonical = get_parser(task)(gold) if isinstance(gold, str) else None
    if canonical is None:
        allowed = SST2_LABELS if task == "sst2" else AGNEWS_CLASSES
        raise bad_value(f"{task} gold", gold, f"one of {list(allowed)}")
    return canonical


def is_correct(task: str, prediction_text: str, gold: object) -> bool:
    """Whether a generated response answers correctly.

    Args:
        task: ``"sst2"``, ``"agnews"`` or ``"gsm8k"``.
        prediction_text: The generated response.
        gold: The gold label word / class name, or the gold number (``float``, ``int`` or a numeric
            string) for GSM8K.

    Raises:
        ConfigError: for an unknown task or a gold answer the task cannot have.
    """
    parsed = get_parser(task)(prediction_text)
    # Exact float comparison, as the official script: both sides come from the same decimal text.
    return parsed is not None and parsed == _canonical_gold(task, gold)
