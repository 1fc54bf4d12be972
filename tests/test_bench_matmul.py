"""The matmul benchmark's FLOP model (benchmarks/bench_matmul.py) and a one-case run of it."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_matmul import SMOLLM2, LlamaShape, main, step_flops


def test_smollm2_matmul_weights_are_its_parameters():
    # 134.5M parameters, of which 576 x 61 norm weights multiply nothing.
    assert SMOLLM2.body_params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) == 106_168_320
    assert SMOLLM2.head_params == 576 * 49152
    assert SMOLLM2.lora_params(16) == 30 * 16 * (576 + 576 + 2 * (576 + 192))


def test_step_flops():
    shape = LlamaShape(hidden=4, intermediate=8, layers=1, heads=1, kv_heads=1, head_dim=4, vocab=10)
    params = shape.body_params + shape.head_params  # 4*4*4 + 3*4*8 = 160, + 40
    train = step_flops("train", shape, rank=1, batch=2, tokens=3)
    attention = 2 * shape.attention_flops(3, 3)
    lora = 2 * shape.lora_params(1) * 6
    assert train["forward"] == 2 * params * 6 + attention + lora
    # A frozen base gets input gradients only (1x its forward); the LoRA factors both (2x).
    assert train["backward"] == 2 * params * 6 + 2 * attention + 2 * lora
    gen = step_flops("generate", shape, prompts=2, prompt_tokens=3, new_tokens=1)
    # One new token: the prompt's forward, the head for its last position only.
    assert gen["total"] == 2 * shape.body_params * 6 + 2 * shape.head_params * 2 + 2 * shape.attention_flops(
        3, 3
    )
    more = step_flops("generate", shape, prompts=2, prompt_tokens=3, new_tokens=3)
    assert more["total"] - gen["total"] == 2 * (2 * 2 * params) + 2 * (
        shape.attention_flops(1, 4) + shape.attention_flops(1, 5)
    )
    score = step_flops("score", shape, samples=2, tokens=3)
    assert (
        score["total"] == 2 * shape.body_params * 6 + 2 * shape.attention_flops(3, 3)
        and score["backward"] == 0
    )
    with pytest.raises(ValueError, match="step='eval'"):
        step_flops("eval", shape)


def test_one_case_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    args = ["--threads", "1", "--repeats", "1", "--min-seconds", "0.01", "--cases", "gen mlp down"]
    result = main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(result["results"]))
    (row,) = result["results"]
    assert row["shape"] == [40, 1536, 576] and set(row["by_dtype"]) == {"fp32", "bf16"}
    assert all(v["gflops"] > 0 for v in row["by_dtype"].values())
    assert "| gen mlp down | 40x1536x576 | 1 |" in capsys.readouterr().out
