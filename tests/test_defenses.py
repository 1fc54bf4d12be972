"""Baseline defenses (Vaccine, RepNoise, Lisa, LDIFS, Booster): distinctive terms, schedules, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, tiny_finetune_data
from torch import nn

from antidote_pl.data.records import Source
from antidote_pl.defenses import LDIFS, Booster, Lisa, RepNoise, Vaccine
from antidote_pl.defenses.blocks import (
    AuxiliaryStream,
    capture_outputs,
    find_decoder_blocks,
    representation_modules,
)
from antidote_pl.defenses.repnoise import differing_positions, gaussian_mmd, masked_token_ce
from antidote_pl.errors import ConfigError
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.datamodules import AlignmentDataModule
from antidote_pl.training.sft import CausalLMSFTModule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core machine the thread
    # synchronisation makes each op ~100x slower; restored for the rest of the session.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def module(**kw) -> CausalLMSFTModule:
    args = {"model_config": TINY_LLAMA, "tokenizer": "tiny-world", "lora_r": 4, "lora_alpha": 8}
    return CausalLMSFTModule(**{**args, **kw})


def harmful_source(limit: int = 16) -> Source:
    # The world's realignment split: disjoint from attack (train) and evaluation prompts.
    return TinyWorldSource("harmful_answer", split="realignment", limit=limit)


def align_data(n: int = 16) -> AlignmentDataModule:
    return AlignmentDataModule(
        tokenizer="tiny-world",
        harmful=TinyWorldSource("harmful_refusal", limit=n),
        benign=TinyWorldSource("benign", limit=n),
        template="tiny",
        max_length=64,
        batch_size=8,
    )


def first_batch(data) -> dict[str, torch.Tensor]:
    data.setup("fit")
    return next(iter(data.train_dataloader()))


class MetricsRecorder(L.Callback):
    """Keeps the defense's metrics and the first trainable weight's Adam step count after every step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {k: float(v) for k, v in pl_module.defense.metrics().items()}
        param = next(p for p in pl_module.model.parameters() if p.requires_grad)
        state = trainer.optimizers[0].state.get(param, {})
        row["adam_step"] = float(state["step"]) if "step" in state else 0.0
        row["loss"] = float(outputs["loss"])
        self.rows.append(row)


def fit(m, data, trainer_kwargs, steps: int) -> MetricsRecorder:
    recorder = MetricsRecorder()
    L.Trainer(max_steps=steps, callbacks=[recorder], **trainer_kwargs).fit(m, datamodule=data)
    return recorder


def param_grads(m, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in m.model.parameters() if p.requires_grad]
    return [g.clone() for g in torch.autograd.grad(loss, params)]


# ----------------------------------------------------------------------------- decoder blocks
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "gemma": {"head_dim": 8},
    "qwen2": {},
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64},
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_decoder_blocks_found_generically(model_type):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from antidote_pl.pruning.targets import default_lora_target_modules

    sizes = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4}
    sizes = {"intermediate_size": 64, **sizes} if model_type != "gpt2" else {}
    config = AutoConfig.for_model(model_type, vocab_size=64, **sizes, **ARCHITECTURES[model_type])
    model = AutoModelForCausalLM.from_config(config)
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 3 and "Attention" not in type(blocks[0]).__name__
    assert len(representation_modules(model, "mlp")) == 3
    targets = default_lora_target_modules(model)
    lora = LoraConfig(r=2, target_modules=targets, fan_in_fan_out=model_type == "gpt2")
    wrapped = get_peft_model(model, lora)
    assert list(find_decoder_blocks(wrapped)) == list(blocks), "the same blocks inside a peft wrapper"


def test_no_decoder_blocks_is_a_config_error():
    plain = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(5)]))
    with pytest.raises(ConfigError, match="model='Sequential'.*decoder blocks"):
        find_decoder_blocks(plain)
    with pytest.raises(ConfigError, match="decoder blocks"):
        Vaccine().attach(SimpleNamespace(model=plain))


def test_capture_makes_frozen_outputs_differentiable():
    m = module(finetuning="full")
    m.model.requires_grad_(False)
    blocks = list(find_decoder_blocks(m.model))
    batch = first_batch(tiny_finetune_data())
    with capture_outputs(blocks, ensure_grad=True) as hidden:
        loss = m.sft_loss(batch)
    grads = torch.autograd.grad(loss, hidden)
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- Vaccine
def test_vaccine_perturbation_changes_the_gradient():
    L.seed_everything(0)
    m = module(finetuning="full")
    batch = first_batch(align_data())
    sft = param_grads(m, m.sft_loss(batch))

    vaccine = Vaccine(rho=2.0)
    vaccine.attach(m)
    deltas, clean = vaccine.perturbation(m, batch)
    assert len(deltas) == 2
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
    assert norm == pytest.approx(2.0, rel=1e-4), "e is rho * g / ||g|| with the global norm"
    torch.testing.assert_close(clean, m.sft_loss(batch).detach())
    perturbed_loss = vaccine.training_step(m, batch, 0)
    assert perturbed_loss > clean, "a step along the gradient raises the loss"
    perturbed = param_grads(m, perturbed_loss)
    assert max(float((a - b).abs().max()) for a, b in zip(sft, perturbed)) > 1e-4

    # rho = 0 is plain SFT: the same gradient.
    for a, b in zip(sft, param_grads(m, Vaccine(rho=0.0).training_step(m, batch, 0))):
        torch.testing.assert_close(a, b)
    # Hooks are removed afterwards: a plain forward is unperturbed again.
    torch.testing.assert_close(m.sft_loss(batch).detach(), clean)


def test_vaccine_trains_with_lora_and_gradient_checkpointing(trainer_kwargs):
    L.seed_everything(0)
    m = module(learning_rate=1e-2, gradient_checkpointing=True, defense=Vaccine(rho=1.0))
    before = {n: p.detach().clone() for n, p in m.model.named_parameters() if p.requires_grad}
    rows = fit(m, align_data(), trainer_kwargs, steps=3).rows
    assert len(rows) == 3 and all(r["hidden_grad_norm"] > 0 and r["loss"] > r["clean_loss"] for r in rows)
    changed = [not torch.equal(p, before[n]) for n, p in m.model.named_parameters() if p.requires_grad]
    assert all(changed)


# ----------------------------------------------------------------------------- RepNoise
def test_gaussian_mmd_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    same = torch.randn(64, 8, generator=g)
    shifted = torch.randn(64, 8, generator=g) + 3.0
    assert float(gaussian_mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
    # Kernels are summed (not averaged), so the scale goes up to 2 * num_kernels.
    assert float(gaussian_mmd(x, same)) < 0.05 * float(gaussian_mmd(x, shifted))


def test_auxiliary_stream_cycles_and_reshuffles():
    m = module()
    stream = AuxiliaryStream([harmful_source(5)], "RepNoise.harmful", 2, "tiny", 64, seed=0)
    stream.build(m)
    passes = [[stream.next(torch.device("cpu")) for _ in range(3)] for _ in range(2)]
    rows = [
        [tuple(r[m.bool()].tolist()) for b in p for r, m in zip(b["input_ids"], b["attention_mask"])]
        for p in passes
    ]
    # 5 records in batches of 2: three batches per pass, each record once, and a new order per pass.
    assert [len(r) for r in rows] == [5, 5] and len(set(rows[0])) == 5 and set(rows[0]) == set(rows[1])
    assert rows[0] != rows[1]


def test_repnoise_mmd_decreases(trainer_kwargs):
    L.seed_everything(0)
    # A large beta and lr so that 16 steps visibly move the harmful representations towards noise.
    defense = RepNoise(harmful_source(), alpha=0.1, beta=10.0, batch_size=8)
    m = module(finetuning="full", learning_rate=3e-2, defense=defense)
    rows = fit(m, align_data(), trainer_kwargs, steps=16).rows
    mmd = [r["mmd"] for r in rows]
    assert all(r["harmful_ce"] > 0 and r["harmless_ce"] > 0 for r in rows)
    assert sum(mmd[-4:]) / 4 < 0.7 * sum(mmd[:4]) / 4, mmd


class EmptySource(Source):
    def load(self):
        return []


def test_auxiliary_data_errors_before_training(trainer_kwargs):
    m = module(defense=RepNoise(EmptySource()))
    with pytest.raises(ConfigError, match=r"RepNoise.harmful\[0\]"):
        fit(m, align_data(), trainer_kwargs, steps=1)
    # Without a DataModule to take the template from, it must be given.
    stream = AuxiliaryStream([harmful_source()], "Lisa.guide", None, None, 64, seed=0)
    with pytest.raises(ConfigError, match="Lisa.template=None"):
        stream.build(module())


# ----------------------------------------------------------------------------- Lisa
def test_lisa_schedule():
    lisa = Lisa([harmful_source()], align_steps=2, finetune_steps=3)
    assert [lisa.state(s) for s in range(11)] == ["align"] * 2 + ["finetune"] * 3 + ["align"] * 2 + [
        "finetune"
    ] * 3 + ["align"]


@pytest.mark.parametrize("optimizer_state", ["shared", "per_state"])
def test_lisa_alternates_with_proximal_term(trainer_kwargs, optimizer_state):
    L.seed_everything(0)
    guide = [TinyWorldSource("harmful_refusal", limit=8), TinyWorldSource("benign", limit=8)]
    lisa = Lisa(
        guide, align_steps=2, finetune_steps=3, rho=1.0, proximal_start=0.0, optimizer_state=optimizer_state
    )
    m = module(learning_rate=1e-2, defense=lisa)
    rows = fit(m, tiny_finetune_data(), trainer_kwargs, steps=9).rows
    assert [r["align_state"] for r in rows] == [1, 1, 0, 0, 0, 1, 1, 0, 0]
    prox = [r["proximal"] for r in rows]
    # No anchor before the first switch; zero at each switch (weights == anchor), positive after.
    assert prox[0] == prox[1] == prox[2] == prox[5] == prox[7] == 0.0
    assert min(prox[3], prox[4], prox[6], prox[8]) > 0
    assert rows[-1]["discarded_user_samples"] == 4 * 8
    steps = [r["adam_step"] for r in rows]
    if optimizer_state == "shared":
        assert steps == list(range(1, 10))
    else:  # each state resumes its own Adam moments
        assert steps == [1, 2, 1, 2, 3, 3, 4, 4, 5]


def test_lisa_proximal_waits_for_its_start(trainer_kwargs):
    lisa = Lisa([harmful_source()], align_steps=1, finetune_steps=3, proximal_start=0.5)
    m = module(learning_rate=1e-2, defense=lisa)
    rows = fit(m, tiny_finetune_data(), trainer_kwargs, steps=8).rows
    assert lisa.proximal_start_step(m) == 4
    prox = [r["proximal"] for r in rows]
    # Steps 2, 3 and 6, 7 are past a switch; only the later pair is past 50% of the 8 steps.
    assert prox[2] == prox[3] == 0.0 and min(prox[6], prox[7]) > 0


# ----------------------------------------------------------------------------- LDIFS
def test_ldifs_distance_and_frozen_reference(trainer_kwargs):
    L.seed_everything(0)
    m = module(learning_rate=1e-2, lora_dropout=0.0, defense=LDIFS(rho=1.0))
    data = tiny_finetune_data()
    batch = first_batch(data)
    m.defense.attach(m)
    reference_before = [h.clone() for h in m.defense.reference_features(m, batch)]
    rows = fit(m, data, trainer_kwargs, steps=4).rows
    distance = [r["distance"] for r in rows]
    assert distance[0] == 0.0 and all(d > 0 for d in distance[1:]), distance
    assert all(r["dropped_layers"] == 0 for r in rows)
    torch.testing.assert_close(rows[-1]["penalty"], 0.5 * distance[-1], rtol=1e-4, atol=0)
    reference_after = m.defense.reference_features(m, batch)
    for before, after in zip(reference_before, reference_after):
        assert torch.equal(before, after), "the adapter-disabled reference never changes"
    with capture_outputs(find_decoder_blocks(m.model)) as current, torch.no_grad():
        m(batch["input_ids"], batch["attention_mask"])
    assert not torch.equal(current[-1], reference_after[-1]), "the trained model did move"


def test_ldifs_explicit_guard_drops_large_terms(trainer_kwargs):
    L.seed_everything(0)
    m = module(learning_rate=1e-2, defense=LDIFS(rho=1.0, reduction="sum", max_layer_distance=1e-9))
    rows = fit(m, tiny_finetune_data(), trainer_kwargs, steps=3).rows
    assert rows[0]["dropped_layers"] == 0  # distance 0 at the start is below any threshold
    assert rows[-1]["dropped_layers"] == 2 and rows[-1]["penalty"] == 0.0 and rows[-1]["distance"] > 0


def test_ldifs_needs_a_fresh_lora(trainer_kwargs):
    with pytest.raises(ConfigError, match="model.finetuning='full'"):
        fit(module(finetuning="full", defense=LDIFS()), tiny_finetune_data(), trainer_kwargs, steps=1)


# ----------------------------------------------------------------------------- Booster
def test_booster_gradient_matches_the_definition():
    L.seed_everything(0)
    m = module(finetuning="full")
    booster = Booster(harmful_source(), lam=2.0, alpha=0.05, batch_size=4, template="tiny", max_length=64)
    booster.attach(m)
    batch = first_batch(align_data())
    harmful = booster.stream.next(torch.device("cpu"))
    booster.stream.build(m)  # the same harmful batch again inside training_step
    got = param_grads(m, booster.training_step(m, batch, 0))
    assert booster.metrics()["harmful_drop"] > 0, "a normalised harmful step lowers the harmful loss"

    params = [p for p in m.model.parameters() if p.requires_grad]
    g_align = param_grads(m, m.sft_loss(batch))
    g_harm = param_grads(m, m.sft_loss(harmful))
    step = 0.05 / math.sqrt(sum(float(g.pow(2).sum()) for g in g_harm))
    with torch.no_grad():
        for p, g in zip(params, g_harm):
            p.sub_(step * g)
    g_moved = param_grads(m, m.sft_loss(harmful))
    for a, h, h2, actual in zip(g_align, g_harm, g_moved, got):
        torch.testing.assert_close(actual, a + 2.0 * (h - h2), rtol=1e-3, atol=1e-6)


def test_booster_trains(trainer_kwargs):
    m = module(learning_rate=1e-2, defense=Booster(harmful_source(), lam=1.0, alpha=0.1))
    rows = fit(m, align_data(), trainer_kwargs, steps=2).rows
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["harmful_ce"] > 0 for r in rows)


# ----------------------------------------------------------------------------- parity modes
def _add_to_first_output(modules, deltas):
    """Forward hooks (written independently of the defenses' helpers) adding a constant per module."""

    def make(delta):
        def hook(_m, _i, out):
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        return hook

    return [m.register_forward_hook(make(d)) for m, d in zip(modules, deltas)]


def test_vaccine_parity_perturbs_the_attention_outputs():
    L.seed_everything(0)
    m = module(finetuning="full")
    batch = first_batch(align_data())
    attention = [block.self_attn for block in find_decoder_blocks(m.model)]
    # The official perturbation: g_l = dL/d(attention output l), e_l = rho * g_l / (||g|| + 1e-7).
    outputs = []
    handles = [a.register_forward_hook(lambda _m, _i, out: outputs.append(out[0])) for a in attention]
    clean = m.sft_loss(batch)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(clean, outputs)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    handles = _add_to_first_output(attention, [2.0 * g / (norm + 1e-7) for g in grads])
    expected = m.sft_loss(batch).detach()
    for h in handles:
        h.remove()

    parity = Vaccine(rho=2.0, mode="parity")
    parity.attach(m)
    torch.testing.assert_close(parity.training_step(m, batch, 0).detach(), expected)
    assert parity.metrics()["hidden_grad_norm"] == pytest.approx(norm, rel=1e-5)
    # The project variant perturbs the decoder-block outputs instead: another point, another loss.
    project = Vaccine(rho=2.0)
    project.attach(m)
    assert abs(float(project.training_step(m, batch, 0).detach()) - float(expected)) > 1e-3


def test_ldifs_parity_is_the_official_regulariser():
    L.seed_everything(0)
    m = module(lora_dropout=0.0)
    data = tiny_finetune_data()
    batch = first_batch(data)
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
    with torch.no_grad():  # move the fresh adapter away from the starting model, as training would
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    mlps = [block.mlp for block in find_decoder_blocks(m.model)]
    captured: list[torch.Tensor] = []
    handles = [x.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) for x in mlps]
    with torch.no_grad():
        with m.model.disable_adapter():
            m(batch["input_ids"], batch["attention_mask"])
        ce = float(m.sft_loss(batch))
    for h in handles:
        h.remove()
    reference, current = captured[:2], captured[2:]
    # The official d_l: squared Frobenius norm over the whole [B, T, d], padding included.
    d = [float((c - r).pow(2).sum()) for c, r in zip(current, reference)]
    assert min(d) > 0 and d[0] != d[1]
    rho = 0.2 / math.sqrt(d[0] * d[1])  # one layer's term rho/2 * d_l above 0.1, the other below
    terms = [0.5 * rho * x for x in d]
    assert sum(t >= 0.1 for t in terms) == 1

    ldifs = LDIFS(rho=rho, mode="parity")
    assert (ldifs.representation, ldifs.reduction, ldifs.max_layer_distance) == ("mlp", "sum", 0.1)
    ldifs.attach(m)
    loss = ldifs.training_step(m, batch, 0)
    assert float(loss.detach()) == pytest.approx(ce + sum(t for t in terms if t < 0.1), rel=1e-4)
    assert ldifs.metrics()["dropped_layers"] == 1.0


def test_repnoise_parity_mask_and_masked_ce_on_hand_made_tensors():
    harmful = torch.tensor([[1, 7, 8, 9, 5], [1, 7, 6, 2, 2]])
    harmless = torch.tensor([[1, 7, 3], [1, 4, 6], [1, 7, 8]])  # more rows, fewer columns
    # Rows beyond the harmful batch are cut; missing columns count as id 0, so they always differ.
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(differing_positions(harmful, harmless), expected)

    vocab = 10
    logits = torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(0))
    got = masked_token_ce(logits, harmful, expected)
    # By hand: position t predicts id t+1 when t+1 is in the mask; its logits are zeroed (a uniform
    # prediction, log(vocab)) when t itself is masked out. The prompt-side tokens count too.
    losses = []
    for b in range(2):
        for t in range(4):
            if not expected[b, t + 1]:
                continue
            row = logits[b, t] if expected[b, t] else torch.zeros(vocab)
            losses.append(float(-row.log_softmax(-1)[harmful[b, t + 1]]))
    assert len(losses) == 6 and not expected[0, 1] and not expected[1, 2]  # two uniform predictions
    assert float(got) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # Response-label CE (the project variant) would count only the positions a label covers.
    labels = torch.full_like(harmful, -100)
    labels[:, 3:] = harmful[:, 3:]
    response_only = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1)
    )
    assert abs(float(response_only) - float(got)) > 1e-3


def test_repnoise_parity_mmd_is_on_masked_flattened_vectors():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    defense = RepNoise(harmful_source(), mode="parity")
    torch.manual_seed(7)
    got = defense.flat_noise_mmd([hidden], mask)
    torch.manual_seed(7)
    noise = torch.randn(3, 4, 5) * mask[..., None]
    flat = (hidden * mask[..., None]).reshape(3, -1)
    expected = gaussian_mmd(flat, noise.reshape(3, -1), pairwise="direct")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Mean pooling over the masked tokens (the project variant) gives another value.
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.manual_seed(7)
    assert abs(float(gaussian_mmd(pooled, torch.randn_like(pooled))) - float(got)) > 1e-3


def test_repnoise_parity_step_is_the_official_loss():
    L.seed_everything(0)
    defense = RepNoise(
        harmful_source(), alpha=0.1, beta=0.5, batch_size=4, template="tiny", max_length=64, mode="parity"
    )
    assert defense.representation == "mlp"
    m = module(finetuning="full")
    defense.attach(m)
    batch = first_batch(align_data())
    harmful = defense.stream.next(torch.device("cpu"))
    # The same harmful batch inside training_step, without a new DataLoader iterator (which would
    # draw from the global RNG between the seed below and the noise).
    defense.stream.next = lambda device: harmful
    torch.manual_seed(3)
    loss = defense.training_step(m, batch, 0)

    mlps = [block.mlp for block in find_decoder_blocks(m.model)]
    captured: list[torch.Tensor] = []
    handles = [x.register_forward_hook(lambda _m, _i, out: captured.append(out)) for x in mlps]
    harmful_logits = m(harmful["input_ids"], harmful["attention_mask"]).logits
    for h in handles:
        h.remove()
    harmful_mask = differing_positions(harmful["input_ids"], batch["input_ids"])
    harmless_mask = differing_positions(batch["input_ids"], harmful["input_ids"])
    harmful_ce = masked_token_ce(harmful_logits, harmful["input_ids"], harmful_mask)
    harmless_logits = m(batch["input_ids"], batch["attention_mask"]).logits
    harmless_ce = masked_token_ce(harmless_logits, batch["input_ids"], harmless_mask)
    torch.manual_seed(3)  # the same noise draws, one per layer in depth order
    keep = harmful_mask[..., None].float()
    mmd = sum(
        gaussian_mmd((h * keep).reshape(len(h), -1), (torch.randn(h.shape) * keep).reshape(len(h), -1))
        for h in captured
    ) / len(captured)
    expected = harmless_ce + 0.5 * mmd - 0.1 * torch.log(harmful_ce)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert float(harmless_ce.detach()) != pytest.approx(float(m.sft_loss(batch).detach()), rel=1e-3), (
        "not response-only"
    )


def booster_data(batch_size: int) -> AlignmentDataModule:
    return AlignmentDataModule(
        tokenizer="tiny-world",
        harmful=TinyWorldSource("harmful_refusal", limit=20),
        template="tiny",
        max_length=64,
        batch_size=batch_size,
    )


def test_booster_parity_refuses_inherited_settings(trainer_kwargs):
    # Antidote's alignment settings (lr 1e-3 cosine, batch 5): not Booster's own.
    m = module(
        learning_rate=1e-3,
        scheduler="cosine",
        weight_decay=0.1,
        defense=Booster(harmful_source(), mode="parity"),
    )
    with pytest.raises(ConfigError) as err:
        fit(m, booster_data(5), trainer_kwargs, steps=1)
    message = str(err.value)
    for wrong in ("model.learning_rate=0.001", "model.scheduler='cosine'", "data.batch_size=5"):
        assert wrong in message, message
    assert "weight_decay" not in message


def test_booster_parity_runs_with_its_official_settings(trainer_kwargs):
    defense = Booster(harmful_source(20), mode="parity")
    assert defense.stream.batch_size == 10, "the official harmful batch"
    m = module(learning_rate=5e-4, scheduler="constant", weight_decay=0.1, defense=defense)
    rows = fit(m, booster_data(10), trainer_kwargs, steps=1).rows
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Vaccine(rho=-1.0), "Vaccine.rho"),
        (lambda: Vaccine(rho=float("nan")), "Vaccine.rho"),
        (lambda: RepNoise(None), "RepNoise.harmful"),
        (lambda: RepNoise(harmful_source(), alpha=-0.1), "RepNoise.alpha"),
        (lambda: RepNoise(harmful_source(), representation="attn"), "RepNoise.representation"),
        (lambda: RepNoise(harmful_source(), batch_size=0), "RepNoise.batch_size"),
        (lambda: Lisa([], align_steps=1), "Lisa.guide"),
        (lambda: Lisa([harmful_source()], finetune_steps=0), "Lisa.finetune_steps"),
        (lambda: Lisa([harmful_source()], align_steps=1.5), "Lisa.align_steps"),
        (lambda: Lisa([harmful_source()], proximal_start=1.5), "Lisa.proximal_start"),
        (lambda: Lisa([harmful_source()], optimizer_state="separate"), "Lisa.optimizer_state"),
        (lambda: LDIFS(rho=-1e-4), "LDIFS.rho"),
        (lambda: LDIFS(reduction="max"), "LDIFS.reduction"),
        (lambda: LDIFS(max_layer_distance=0.0), "LDIFS.max_layer_distance"),
        (lambda: Booster(harmful_source(), alpha=0.0), "Booster.alpha"),
        (lambda: Booster(harmful_source(), template="nope"), "template"),
        (lambda: Vaccine(mode="official"), "Vaccine.mode"),
        (lambda: LDIFS(mode="paper"), "LDIFS.mode"),
        (lambda: LDIFS(reduction="mean", mode="parity"), "LDIFS.reduction='mean'.*parity"),
        (lambda: LDIFS(max_layer_distance=0.5, mode="parity"), "LDIFS.max_layer_distance"),
        (
            lambda: RepNoise(harmful_source(), representation="block", mode="parity"),
            "RepNoise.representation",
        ),
        (lambda: RepNoise(harmful_source(), mode=None), "RepNoise.mode"),
        (lambda: Booster(harmful_source(), batch_size=5, mode="parity"), "Booster.batch_size=5"),
        (lambda: Booster(harmful_source(), mode="Parity"), "Booster.mode"),
    ],
)
def test_bad_values_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


# ----------------------------------------------------------------------------- DDP
class RanksAgree(L.Callback):
    """Fails the run if the ranks' trainable weights differ after training."""

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.parameters() if p.requires_grad])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
def test_booster_trains_under_ddp(trainer_kwargs):
    # Booster is the most DDP-sensitive defense: torch.autograd.grad w.r.t. the weights inside the
    # DDP-wrapped step, functional_call, and a per-rank shard of the harmful stream.
    defense = Booster(harmful_source(), lam=1.0, alpha=0.1, batch_size=4)
    m = module(learning_rate=1e-2, defense=defense)
    kwargs = {**trainer_kwargs, "devices": 2, "strategy": "ddp_spawn"}
    L.Trainer(max_steps=2, callbacks=[RanksAgree()], **kwargs).fit(m, datamodule=align_data())
