"""AG News topics (reference A.3, C.2): a title and description in, one of four class names out.

Deliberate difference from the official script: it accepts ``"Sci/Tech"`` and the lowercase
``"sci"`` but not ``"sci/tech"``, while it accepts lowercase forms of the three other classes
(reference G.9). Here every class is also accepted in lowercase, so ``"sci/tech"`` counts; ``"sci"``
is still accepted for parity.
"""

from __future__ import annotations

from antidote_pl.data.tasks._registry import Task

#: Instruction of the official AG News task records (``input`` = title and description).
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # index = AG News class id - 1

_ACCEPTED = {
    **{name: name for name in AGNEWS_CLASSES},
    **{name.lower(): name for name in AGNEWS_CLASSES},
    "sci": "Sci/Tech",  # the official script's only lowercase form for this class
}


def parse_agnews(text: str) -> str | None:
    """The AG News class name if the stripped response is exactly one (see the module note)."""
    return _ACCEPTED.get(text.strip())


TASK = Task(name="agnews", parse=parse_agnews, labels=AGNEWS_CLASSES, instruction=AGNEWS_INSTRUCTION)
