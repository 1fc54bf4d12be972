"""The text that judges and answer parsers see: a generation normalised as the official code does.

The official Antidote evaluation decodes prompt and generation together and keeps
``output.split("### Response:")[1].strip()``: the text after the prompt's response marker, cut where
the model writes that marker again (a new turn it invents), stripped. Here generations are decoded
without the prompt, so the same text is ``generation.split(marker)[0].strip()``.
"""

from __future__ import annotations

# Templates whose prompts end with a response marker the model may repeat. Other templates (the
# tiny world's, chat templates) keep the generation as decoded.
RESPONSE_MARKERS = {"alpaca": "### Response:", "alpaca_legacy": "### Response:"}


def normalise_response(generation: str, template: str) -> str:
    """The part of ``generation`` the official code judges and parses, for prompts in ``template``.

    Args:
        generation: Decoded new tokens (no prompt).
        template: The prompt template the generation answers.

    Returns:
        For Alpaca templates, the text before any repeated ``### Response:`` marker, stripped;
        otherwise ``generation`` unchanged.
    """
    marker = RESPONSE_MARKERS.get(template)
    if marker is None:
        return generation
    return generation.split(marker, 1)[0].strip()
