"""Calibration forwards end after the last hooked target: same statistics, no wasted layers.

Reference statistics come from full forwards inside ``collect`` (the hooks without
``run_calibration``, so nothing is stopped); ``run_calibration`` must give bit-identical sums and
counts while the LM head and any layer after the last target never run.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from antidote_pl.pruning import batch_token_mask, collect, find_targets, run_calibration

LAYERS = 4


def tiny_llama(lora: bool) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    if not lora:
        return model.eval()
    model = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft's zero B would make every B-input statistic trivial
            nn.init.normal_(p, std=0.5)
    return model.eval()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 97, (3, 9), generator=g)
        attention = torch.ones_like(ids)
        attention[1, 6:] = 0  # right padding
        labels = ids.masked_fill(torch.arange(9) < 4, -100).masked_fill(attention == 0, -100)
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def reference(model, targets, token_mask="attention"):
    """Full forwards with the same hooks and token masks, never stopped."""
    with collect(model, targets) as stats, torch.no_grad():
        for batch in batches():
            stats.set_token_mask(batch_token_mask(batch, token_mask))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return stats


def counters(model) -> dict[str, list]:
    """Completed forwards of the LM head, the final norm and every decoder layer, by input shape."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = {"head": base.lm_head, "norm": base.model.norm}
    modules.update({f"layer{i}": layer for i, layer in enumerate(base.model.layers)})
    calls = {k: [] for k in modules}
    for key, module in modules.items():
        module.register_forward_hook(
            lambda _m, args, _o, key=key: calls[key].append(tuple(args[0].shape[:2]))
        )
    return calls


def assert_identical(got, want) -> None:
    assert got.names == want.names
    for n in want.names:
        assert torch.equal(got.sum_sq[n], want.sum_sq[n]), n
        assert torch.equal(got.sum_sample_mean_sq[n], want.sum_sample_mean_sq[n]), n
        assert (got.n_tokens[n], got.n_samples[n]) == (want.n_tokens[n], want.n_samples[n]), n


@pytest.mark.parametrize(
    ("kind", "lora", "include", "last_layer"),
    [
        ("lora", True, None, LAYERS - 1),
        ("lora", True, ["layers.1."], 1),
        ("lora_delta", True, ["layers.0."], 0),
        ("linear", False, ["layers.0.", "layers.1."], 1),
    ],
    ids=["lora-all", "lora-early", "lora_delta-early", "linear-early"],
)
def test_statistics_identical_and_head_and_late_layers_skipped(kind, lora, include, last_layer):
    model = tiny_llama(lora)
    targets = find_targets(model, kind, include=include)
    want = reference(model, targets, "response")
    calls = counters(model)
    with collect(model, targets) as stats:
        assert run_calibration(model, batches(), stats, token_mask="response") == 3
    assert_identical(stats, want)
    # Only the probe (one sample, 4 tokens) runs to the end; the three batches of 3 x 9 tokens stop
    # inside the last hooked layer, so neither it nor anything after it completes for them.
    assert calls["head"] == [(1, 4)] and calls["norm"] == [(1, 4)]
    for i in range(LAYERS):
        expected = [(1, 4)] + [(3, 9)] * 3 if i < last_layer else [(1, 4)]
        assert calls[f"layer{i}"] == expected, (i, calls)


class SharedTwice(nn.Module):
    """A module run twice per forward (a shared layer): stopping after its first call would be wrong."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.shared = nn.Linear(6, 6)
        self.other = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.shared(self.emb(input_ids))
        h = self.shared(self.other(h).tanh())
        return self.head(h)


class OnlyLongInputs(SharedTwice):
    """``other`` runs only for inputs longer than the probe: stopping must turn itself off."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.shared(self.emb(input_ids))
        if input_ids.shape[1] > 4:
            h = self.other(h)
        return self.head(h)


@pytest.mark.parametrize("cls", [SharedTwice, OnlyLongInputs])
def test_calls_per_forward_are_counted_not_assumed(cls):
    torch.manual_seed(0)
    model = cls().eval()
    targets = {n: t for n, t in find_targets(model, "linear").items() if "head" not in n}
    data = [{"input_ids": torch.randint(0, 11, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    with collect(model, targets) as want, torch.no_grad():
        want.set_token_mask(data[0]["attention_mask"].bool())
        model(**data[0])
    head = []
    model.head.register_forward_hook(lambda _m, args, _o: head.append(tuple(args[0].shape[:2])))
    with collect(model, targets) as stats:
        run_calibration(model, data, stats)
    assert_identical(stats, want)
    # Twice-shared: the stop waits for the second call and the head never runs. Routed: no stop.
    assert head == ([(1, 4)] if cls is SharedTwice else [(1, 4), (2, 7)])
