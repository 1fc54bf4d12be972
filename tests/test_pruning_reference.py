"""Parity proof: the one-pass batched hook method gives the official per-sample, layer-by-layer masks.

The reference below is written independently of ``antidote_pl.pruning`` and follows the official
procedure (reference doc §B.1-§B.4): capture each sample's layer-0 input separately (batch size 1, no
padding), then per decoder layer hook the LoRA ``nn.Linear`` modules whose names contain "lora", run the
layer sample by sample with a running mean of per-sample column sums of squares, build per-row masks
(stable ascending sort, keep ``int(cols * (1 - dense_ratio))`` lowest), and run the layer again to get the
next layer's inputs. The batched side pads samples of different lengths together, so the equality also
proves that padding is excluded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from antidote_pl.pruning import (
    collect,
    find_targets,
    masks_for_alphas,
    run_calibration,
    target_weights,
    to_param_layout,
    wanda_scores,
)

LENGTHS = [7, 12, 5, 9, 3, 11]
ALPHAS = [0.1, 0.25, 0.5]
PAD_ID = 0


class _StopForward(Exception):
    pass


def _tiny_lora_llama() -> nn.Module:
    model = get_peft_model(
        small_llama(attn_implementation="eager"),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    # peft initialises B to zero; a random B makes both factors' statistics and scores matter.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return model.eval()


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (1, n), generator=g) for n in LENGTHS]


# ---------------------------------------------------------------- official-style reference ----------


def _capture_layer0_inputs(model: nn.Module, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Catcher: records the hidden state entering decoder layer 0, one sample at a time, then aborts."""
    layers = model.base_model.model.model.layers
    captured: list[torch.Tensor] = []

    def catch(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().float().clone())
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in samples:
            with pytest.raises(_StopForward):
                model(input_ids=ids)
    finally:
        handle.remove()
    return captured


class _RunningWanda:
    """The Wanda ``add_batch`` statistic: running mean over forward calls of per-call column sums of x²."""

    def __init__(self, columns: int) -> None:
        self.scaler_row = torch.zeros(columns)
        self.nsamples = 0

    def add_batch(self, _module, inputs, _output) -> None:
        inp = inputs[0].detach()
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _run_layer(model: nn.Module, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    seq = hidden.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0)
    position_embeddings = model.base_model.model.model.rotary_emb(hidden, position_ids)
    causal = torch.full((seq, seq), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    out = layer(
        hidden, attention_mask=causal, position_ids=position_ids, position_embeddings=position_embeddings
    )
    return out[0] if isinstance(out, tuple) else out


def _official_masks(
    model: nn.Module, samples: list[torch.Tensor], dense_ratio: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inps = _capture_layer0_inputs(model, samples)
    masks, stats = {}, {}
    with torch.no_grad():
        for i, layer in enumerate(model.base_model.model.model.layers):
            subset = {n: m for n, m in layer.named_modules() if type(m) is nn.Linear and "lora" in n}
            wrapped = {n: _RunningWanda(m.weight.shape[1]) for n, m in subset.items()}
            handles = [subset[n].register_forward_hook(wrapped[n].add_batch) for n in subset]
            for hidden in inps:
                _run_layer(model, layer, hidden)
            for h in handles:
                h.remove()
            for n, module in subset.items():
                metric = module.weight.abs() * torch.sqrt(wrapped[n].scaler_row.reshape(1, -1))
                keep = int(metric.shape[1] * (1 - dense_ratio))
                kept = torch.sort(metric, dim=-1, stable=True)[1][:, :keep]
                bad = torch.ones_like(metric, dtype=torch.bool)
                bad.scatter_(1, kept, False)
                key = f"base_model.model.model.layers.{i}.{n}.weight"
                masks[key] = bad
                stats[key] = wrapped[n].scaler_row
            inps = [_run_layer(model, layer, hidden) for hidden in inps]
    return masks, stats


# ---------------------------------------------------------------- batched method ---------------------


def _padded_batches(samples: list[torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(s.shape[1] for s in chunk)
        ids = torch.full((len(chunk), width), PAD_ID)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : s.shape[1]] = s[0]
            mask[row, : s.shape[1]] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_batched_hooks_reproduce_official_layerwise_masks():
    model = _tiny_lora_llama()
    samples = _samples()
    targets = find_targets(model, "lora")
    with collect(model, targets) as stats:
        run_calibration(model, _padded_batches(samples, batch_size=4), stats)
    scores = wanda_scores(target_weights(targets), stats, "sample_mean")
    ours_by_alpha = masks_for_alphas(scores, ALPHAS, scope="row")

    for alpha in ALPHAS:
        official, official_stats = _official_masks(model, samples, dense_ratio=alpha)
        ours = to_param_layout(ours_by_alpha[alpha], targets)
        assert list(ours) == list(official)  # same 12 keys (2 layers x q/k/v x A/B), same order
        for key, mask in official.items():
            assert torch.equal(ours[key], mask), f"mask differs for {key} at alpha={alpha}"
    per_feature = stats.statistic("sample_mean")
    for key, scaler_row in official_stats.items():
        torch.testing.assert_close(per_feature[key], scaler_row, rtol=1e-5, atol=1e-6)
    assert {stats.n_samples[k] for k in targets} == {len(samples)}
    assert {stats.n_tokens[k] for k in targets} == {sum(LENGTHS)}


def test_counting_padding_would_change_the_statistic():
    """Sensitivity check for the test above: with padding counted, the statistic no longer matches."""
    model = _tiny_lora_llama()
    samples = _samples()
    targets = find_targets(model, "lora")
    _, official_stats = _official_masks(model, samples, dense_ratio=0.1)
    batches = _padded_batches(samples, batch_size=4)
    with collect(model, targets) as stats, torch.no_grad():
        for batch in batches:
            stats.set_token_mask(torch.ones_like(batch["attention_mask"], dtype=torch.bool))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_feature = stats.statistic("sample_mean")
    assert all(not torch.allclose(per_feature[k], official_stats[k], rtol=1e-3) for k in official_stats)
