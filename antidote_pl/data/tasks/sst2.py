"""SST-2 sentiment (reference A.3, C.2): a sentence in, ``positive`` or ``negative`` out.

The answer must be exactly a label word, as in the official evaluation script.
"""

from __future__ import annotations

from antidote_pl.data.tasks._registry import Task

#: Instruction of the official SST-2 task records (``input`` = sentence, ``output`` = label word).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")  # index = GLUE label (1 = positive)

_ACCEPTED = {
    "positive": "positive",
    "Positive": "positive",
    "negative": "negative",
    "Negative": "negative",
}


def parse_sst2(text: str) -> str | None:
    """``"positive"``/``"negative"`` if the stripped response is exactly a label word, else ``None``.

    As in the official script only the lowercase and capitalised spellings count; anything else
    ("Positive.", "The sentiment is positive") is wrong, as the author confirmed (git-disl/Booster#1).
    """
    return _ACCEPTED.get(text.strip())


TASK = Task(name="sst2", parse=parse_sst2, labels=SST2_LABELS, instruction=SST2_INSTRUCTION)
