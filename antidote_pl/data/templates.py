"""Prompt templates: the one place where a record becomes prompt text and response text.

Training (tokenisation and label masking) and generation (evaluation prompts) both go through
:func:`render` / :func:`render_prompt`, so train and eval prompts cannot drift apart (the official
code's SST-2 evaluation kept an older template than its training, see the reference notes G.8).

Templates:

* ``alpaca``: the official Alpaca-style template, ending ``"### Response:\\n"`` (official code since
  2025-03-30);
* ``alpaca_legacy``: the same without the newline after ``"### Response:"`` (paper-era code and the
  official SST-2 evaluation);
* ``tiny``: the tiny world's word-level chat format ``user : ... assistant :``;
* ``raw``: empty prompt and the output as response (language-model pretraining, loss on all tokens);
* ``chat``: the tokenizer's own chat template (``tokenizer.apply_chat_template``) with the
  instruction (and input) as one user turn and ``add_generation_prompt=True``, for instruct models
  that expect their own format (e.g. SmolLM2-Instruct). It needs the tokenizer, so ``render`` and
  ``render_prompt`` take it as an argument; the response is the output, ended by the tokenizer's
  EOS (for ChatML models ``<|im_end|>``, the end of the assistant turn).

The response never contains the EOS token; tokenisation appends its id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from antidote_pl.data.records import Record
from antidote_pl.errors import bad_value

_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Template:
    """A named pair of functions turning a record into prompt text and response text.

    Attributes:
        name: Registry key.
        prompt: Record -> prompt text (what the model is conditioned on); with
            ``needs_tokenizer``, (record, tokenizer) -> prompt text.
        response: Record -> target text, without EOS.
        needs_tokenizer: The prompt is built by the tokenizer (chat templates).
    """

    name: str
    prompt: Callable[..., str]
    response: Callable[[Record], str]
    needs_tokenizer: bool = False


def _text(record: Record, key: str, required: bool = True) -> str:
    """Returns ``record[key]`` as a string; optional keys default to ``""``."""
    value = record.get(key)
    if value is None:
        if required:
            raise bad_value(f"record.{key}", value, f"a string (record keys: {sorted(record)})")
        return ""
    return str(value)


def _alpaca_prompt(record: Record, response_header: str) -> str:
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    if extra:
        body = f"### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n"
        return f"{_PREAMBLE_WITH_INPUT}\n\n{body}{response_header}"
    return f"{_PREAMBLE_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n{response_header}"


def _tiny_prompt(record: Record) -> str:
    # Word-level tokenizer split on whitespace: every piece must be a separate word.
    extra = _text(record, "input", required=False)
    prompt = f"user : {_text(record, 'instruction')}"
    if extra:
        prompt += f" input : {extra}"
    return prompt + " assistant :"


def _output(record: Record) -> str:
    return _text(record, "output", required=False)


def _chat_prompt(record: Record, tokenizer: Any) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_value("template", "chat", "a tokenizer with a chat template (or another template)")
    extra = _text(record, "input", required=False)
    content = _text(record, "instruction") + (f"\n\n{extra}" if extra else "")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        # Templates that write BOS as text (Llama-3 style) would get a second one when the prompt
        # is tokenised with the tokenizer's special tokens; keep only the tokenizer's.
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
    return text


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("alpaca", lambda r: _alpaca_prompt(r, "### Response:\n"), _output),
        Template("alpaca_legacy", lambda r: _alpaca_prompt(r, "### Response:"), _output),
        Template("tiny", _tiny_prompt, lambda r: " " + _output(r)),
        Template("raw", lambda r: "", _output),
        Template("chat", _chat_prompt, _output, needs_tokenizer=True),
    )
}


def get_template(name: str, field: str = "template") -> Template:
    """Looks a template up by name.

    Args:
        name: A key of :data:`TEMPLATES`.
        field: Config field name used in the error message.

    Raises:
        ConfigError: if the name is unknown.
    """
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise bad_value(field, name, f"one of {sorted(TEMPLATES)}") from None


def _prompt(t: Template, record: Record, tokenizer: Any) -> str:
    if not t.needs_tokenizer:
        return t.prompt(record)
    if tokenizer is None:
        raise bad_value("template", t.name, "a template that needs no tokenizer here (none was given)")
    return t.prompt(record, tokenizer)


def render(record: Record, template: str, tokenizer: Any = None) -> tuple[str, str]:
    """Renders a record for supervised training.

    Args:
        record: A record with ``instruction``, ``input`` and ``output``.
        template: A key of :data:`TEMPLATES`.
        tokenizer: The model's tokenizer; required by ``chat``, ignored by the others.

    Returns:
        ``(prompt, response)``; the response carries no EOS.

    Raises:
        ConfigError: on an unknown template, a record missing ``instruction`` where needed, or a
            chat template without a tokenizer (or one with no chat template).
    """
    t = get_template(template)
    return _prompt(t, record, tokenizer), t.response(record)


def render_prompt(record: Record, template: str, tokenizer: Any = None) -> str:
    """Renders only the prompt of a record, for generation (``output`` may be absent).

    With ``chat`` the prompt ends with the template's generation prompt (the assistant header), the
    same text training conditions on.

    Raises:
        ConfigError: as :func:`render`.
    """
    return _prompt(get_template(template), record, tokenizer)


__all__ = ["TEMPLATES", "Template", "get_template", "render", "render_prompt"]
