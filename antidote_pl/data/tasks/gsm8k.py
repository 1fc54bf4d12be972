"""GSM8K maths problems (reference A.3, C.2): the question is the instruction, a number is the answer.

Deliberate difference from the official script: a bare fraction such as ``".5"`` reads as 0.5; the
official pattern needs a leading digit and reads 5. GSM8K answers are integers, so this only
matters for malformed responses.
"""

from __future__ import annotations

import re

from antidote_pl.data.tasks._registry import Task
from antidote_pl.errors import bad_value

GSM8K_ANSWER_PREFIX = "The final answer is:"
#: ``output_replace`` of the official GSM8K task records: the training targets end with the phrase
#: the parser looks for.
GSM8K_OUTPUT_REPLACE = {"####": GSM8K_ANSWER_PREFIX + " "}
# The official extractor splits on the phrase with its trailing space (the training data's form).
_SPLIT = GSM8K_ANSWER_PREFIX + " "
# An optional minus sign, then digits with an optional fraction, or a bare fraction (".5").
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


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
    pieces = text.split(_SPLIT)
    if len(pieces) > 1:
        match = _NUMBER.search(pieces[1])
        if match:
            return float(match.group())
    return float(numbers[-1])


def gsm8k_label(answer: str) -> str:
    """The gold answer text of a GSM8K solution: what follows the last ``####``, without commas.

    Raises:
        ConfigError: if the solution has no ``####`` line.
    """
    _, sep, tail = answer.rpartition("####")
    gold = tail.strip().replace(",", "")
    if not sep or not gold:
        raise bad_value("gsm8k answer", answer[-80:], "a solution ending in '#### <number>'")
    return gold


def gsm8k_gold(answer: str) -> float:
    """The gold number of a GSM8K solution (:func:`gsm8k_label` as a number)."""
    return float(gsm8k_label(answer))


def _gold_number(gold: object) -> float:
    """A record's gold answer (``float``, ``int`` or numeric text, commas allowed) as a number."""
    try:
        return float(str(gold).replace(",", ""))
    except ValueError:
        raise bad_value("gsm8k gold", gold, "a number") from None


TASK = Task(name="gsm8k", parse=parse_gsm8k, gold=_gold_number, output_replace=GSM8K_OUTPUT_REPLACE)
