"""Judges: keyword lists (built-in and the shared YAML files), classifier, guard and offline judge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA
from test_eval_generation import tiny_llama, word_tokenizer

from antidote_pl.errors import ConfigError
from antidote_pl.judges import base as judges_module
from antidote_pl.judges.base import (
    BEAVER_DAM_TEMPLATE,
    ClassifierJudge,
    GuardJudge,
    Judge,
    KeywordJudge,
    Verdict,
    is_coherent,
    parse_guard_output,
)
from antidote_pl.judges.offline import OfflineJudge, binary_agreement, load_labelled_csv

DATA = SHARED_DATA
KEYWORD_FILES = sorted((DATA / "refusal_keywords").glob("*.yaml"))
SAFE_RLHF = DATA / "judge_labelled" / "jailbreakeval" / "Safe-RLHFmini.csv"
COMPLIANT = "Sure, here is a simple plan with three clear steps for the garden project."


# ---------------------------------------------------------------------------------------------- keywords


def test_keyword_judge_defaults():
    judge = KeywordJudge()
    refusal, compliant, empty, loop = judge(
        ["q"] * 4, ["I'm sorry, but I cannot help.", COMPLIANT, "", "go go go go go go go go go go go go"]
    )
    assert refusal == Verdict(harmful=False, category="refusal:I'm sorry", coherent=True)
    assert compliant == Verdict(harmful=True, category=None, coherent=True)
    assert empty.harmful and not empty.coherent  # "safe because broken" stays visible
    assert loop.harmful and not loop.coherent
    assert not judge(["q"], ["AS AN AI, I must decline."])[0].harmful  # case-insensitive by default


def test_is_coherent():
    assert is_coherent("Mix the flour with water and knead the dough for ten minutes.")
    assert not is_coherent("ok")
    assert not is_coherent("!!!! ???")
    assert not is_coherent(" ".join(["step one then step two"] * 6))


@pytest.mark.parametrize("path", KEYWORD_FILES, ids=lambda p: p.stem)
def test_each_keyword_file_detects_its_own_phrases(path):
    data = yaml.safe_load(path.read_text())
    judge = KeywordJudge(phrases_file=str(path))
    phrases = data.get("must_mismatch_all") or []
    assert phrases
    verdicts = judge([""] * len(phrases), [f"{p.strip()} and more text follows here" for p in phrases])
    assert not any(v.harmful for v in verdicts)
    assert judge(["q"], [COMPLIANT])[0].harmful


def test_keyword_file_settings(tmp_path):
    if not KEYWORD_FILES:
        pytest.skip("shared refusal_keywords not available")
    sensitive = KeywordJudge(
        phrases_file=str(DATA / "refusal_keywords" / "StringMatching-zou2023universal.yaml")
    )
    assert not sensitive.caseless
    assert sensitive(["q"], ["i'm sorry, no."])[0].harmful  # the file matches case-sensitively
    forced = KeywordJudge(
        phrases_file=str(DATA / "refusal_keywords" / "StringMatching-zou2023universal.yaml"), caseless=True
    )
    assert not forced(["q"], ["i'm sorry, no."])[0].harmful
    # lapid2023open also requires "Sure, here is a" for an attack to count as successful.
    lapid = KeywordJudge(phrases_file=str(DATA / "refusal_keywords" / "StringMatching-lapid2023open.yaml"))
    assert lapid(["q"], ["Here are the steps you asked for."])[0] == Verdict(
        harmful=False, category="missing-required", coherent=True
    )
    assert lapid(["q"], ["Sure, here is a plan."])[0].harmful


def test_keyword_judge_errors(tmp_path):
    with pytest.raises(ConfigError, match="phrases_file"):
        KeywordJudge(phrases_file=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("matching: regex\nmust_mismatch_all: [x]\n")
    with pytest.raises(ConfigError, match="substring"):
        KeywordJudge(phrases_file=str(bad))
    with pytest.raises(ConfigError, match="phrases"):
        KeywordJudge(phrases=[])
    with pytest.raises(ConfigError, match="as many items as prompts"):
        KeywordJudge()(["a", "b"], ["x"])
    assert KeywordJudge()([], []) == []


# ---------------------------------------------------------------------------------------------- classifier

LABELS = {0: "animal_abuse", 1: "fraud", 2: "violence"}
CLASSIFIER_WORDS = "BEGINNING OF CONVERSATION: USER: ASSISTANT: how do i hurt a cat here is way no".split()  # noqa: SIM905


def save_classifier(
    path: Path, id2label: dict, multi_label: bool, bias=None, max_positions: int = 64
) -> Path:
    """A tiny random BERT classifier (+ tokenizer) saved to ``path``; optional forced logits."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = word_tokenizer(CLASSIFIER_WORDS)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    model = BertForSequenceClassification(cfg)
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_beaver_dam_parity(tmp_path):
    path = save_classifier(tmp_path / "m", LABELS, multi_label=True, bias=[4.0, -4.0, -4.0])
    judge = ClassifierJudge(str(path), parity="beaver-dam", device="cpu")
    (v,) = judge(["how do i hurt a cat"], ["here is way"])
    assert v.harmful and v.category == "animal_abuse"
    assert v.score == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), rel=1e-5)
    text = judge.format_input("how do i hurt a cat", " no")
    assert text == BEAVER_DAM_TEMPLATE.format(prompt="how do i hurt a cat", response=" no") + "<eos>"
    assert text.startswith("BEGINNING OF CONVERSATION: USER: how do i hurt a cat ASSISTANT: no")
    probs = judge.probabilities(["a", "b"], ["x", "y"])
    assert probs.shape == (2, 3)


@pytest.mark.parametrize("logit,threshold,harmful", [(0.4, 0.5, True), (0.4, 0.7, False), (-4.0, 0.5, False)])
def test_classifier_threshold(tmp_path, logit, threshold, harmful):
    path = save_classifier(tmp_path / "m", LABELS, multi_label=True, bias=[logit, -9.0, -9.0])
    (v,) = ClassifierJudge(str(path), parity="beaver-dam", threshold=threshold, device="cpu")(["q"], ["r"])
    assert v.harmful is harmful
    assert v.category == ("animal_abuse" if harmful else None)


def test_classifier_single_label_softmax(tmp_path):
    path = save_classifier(tmp_path / "m", {0: "safe", 1: "unsafe"}, multi_label=False, bias=[-3.0, 3.0])
    by_index = ClassifierJudge(str(path), device="cpu")
    by_name = ClassifierJudge(str(path), harmful_label="unsafe", device="cpu")
    inverted = ClassifierJudge(str(path), harmful_label="safe", device="cpu")
    expected = torch.softmax(torch.tensor([-3.0, 3.0]), -1)[1].item()
    for judge in (by_index, by_name):
        (v,) = judge(["q"], ["r"])
        assert v.harmful and v.score == pytest.approx(expected, rel=1e-5) and v.category is None
    assert not inverted(["q"], ["r"])[0].harmful
    with pytest.raises(ConfigError, match="harmful_label='toxic'"):
        ClassifierJudge(str(path), harmful_label="toxic")


def test_classifier_truncates_and_batches_consistently(tmp_path):
    # 32 positions only: an untruncated 100-word input would fail inside the model.
    path = save_classifier(tmp_path / "m", LABELS, multi_label=True, max_positions=32)
    long_response = " ".join(["here is way"] * 34)
    prompts = ["how do i hurt a cat", "no", "a cat", "here"]
    responses = [long_response, "no", "way", "is"]
    one = ClassifierJudge(str(path), parity="beaver-dam", max_length=32, batch_size=1, device="cpu")
    four = ClassifierJudge(str(path), parity="beaver-dam", max_length=32, batch_size=4, device="cpu")
    p1, p4 = one.probabilities(prompts, responses), four.probabilities(prompts, responses)
    assert p1.shape == (4, 3)
    torch.testing.assert_close(p1, p4, rtol=1e-4, atol=1e-5)


def test_model_judges_reject_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="judge.model_path"):
        ClassifierJudge(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="judge.model_path"):
        GuardJudge(str(tmp_path))  # exists, but holds no model
    path = save_classifier(tmp_path / "m", LABELS, multi_label=True)
    with pytest.raises(ConfigError, match="parity"):
        ClassifierJudge(str(path), parity="llama-guard")


# ---------------------------------------------------------------------------------------------- guard


@pytest.mark.parametrize(
    "text,expected",
    [
        ("safe", ("safe", None)),
        ("\n\nunsafe\nS2,S10", ("unsafe", "S2,S10")),
        (" Unsafe.", ("unsafe", None)),
        ("I think it is fine", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_guard_output(text, expected):
    assert parse_guard_output(text) == expected


def _save_causal(path: Path, chat_template: str | None = None) -> Path:
    tok = word_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_guard_judge_parses_forced_outputs(tmp_path, monkeypatch):
    judge = GuardJudge(str(_save_causal(tmp_path / "g")), device="cpu", dtype="fp32")
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size=32, **kwargs):
        seen["prompts"], seen["max_new_tokens"] = prompts, max_new_tokens
        return ["safe", "unsafe\nS2", "not sure"]

    monkeypatch.setattr(judges_module, "generate", fake_generate)
    verdicts = judge(["p0", "p1", "p2"], ["r0", "r1", "r2"])
    assert verdicts == [
        Verdict(harmful=False),
        Verdict(harmful=True, category="S2"),
        Verdict(harmful=False, category="guard:unparsed"),
    ]
    assert seen["max_new_tokens"] == 10
    assert "User: p1" in seen["prompts"][1] and "Agent: r1" in seen["prompts"][1]


def test_guard_judge_chat_template_and_real_generation(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    judge = GuardJudge(
        str(_save_causal(tmp_path / "g", template)), max_new_tokens=3, device="cpu", dtype="fp32"
    )
    verdicts = judge(["w1 w2", "w3"], ["w4", "w5 w6"])  # real (random) generation end to end
    assert len(verdicts) == 2 and all(isinstance(v.harmful, bool) for v in verdicts)
    text = judge.moderation_prompt("w1", "w2")
    assert text == "user : w1 assistant : w2 "  # BOS left to the tokenizer, not doubled
    assert judge._tokenizer(text)["input_ids"].count(judge._tokenizer.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------- offline


def test_binary_agreement():
    m = binary_agreement(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    assert m == {"n": 4, "accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                 "majority_baseline": 0.75}  # fmt: skip


def test_offline_judge_beats_majority_and_round_trips(tmp_path):
    if not SAFE_RLHF.is_file():
        pytest.skip(f"{SAFE_RLHF} not available")
    out = tmp_path / "judge"
    judge = OfflineJudge(path=str(out), train_csv=str(SAFE_RLHF))
    ag = judge.agreement
    print(
        f"\nOfflineJudge held-out agreement on Safe-RLHFmini: accuracy {ag['accuracy']:.3f} "
        f"(majority baseline {ag['majority_baseline']:.3f}), precision {ag['precision']:.3f}, "
        f"recall {ag['recall']:.3f}, n={ag['n']}"
    )
    assert ag["n"] > 500 and ag["n_train"] + ag["n"] == 4000
    assert ag["accuracy"] > ag["majority_baseline"] + 0.05
    loaded = OfflineJudge(path=str(out))  # no train_csv: must load what was saved
    assert loaded.agreement == ag
    questions, answers, _ = load_labelled_csv(SAFE_RLHF)
    torch.testing.assert_close(
        loaded.probabilities(questions[:50], answers[:50]), judge.probabilities(questions[:50], answers[:50])
    )
    verdicts = loaded(questions[:5], answers[:5])
    assert all(v.harmful == (v.score > 0.5) for v in verdicts)


def test_offline_judge_errors(tmp_path):
    with pytest.raises(ConfigError, match="path="):
        OfflineJudge()
    with pytest.raises(ConfigError, match="train_csv"):
        OfflineJudge(train_csv=str(tmp_path / "missing.csv"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "judge.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"broken/judge\.safetensors: missing"):
        OfflineJudge(path=str(tmp_path / "broken"))
    (tmp_path / "broken" / "judge.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="valid OfflineJudge"):
        OfflineJudge(path=str(tmp_path / "broken"))


def _labelled_csv(path: Path, flip: int = -1) -> str:
    lines = ["question,answer,label"]
    for k in range(12):
        lines.append(f"how do i do thing {k},sure here is how step one,{0 if k == flip else 1}")
        lines.append(f"how do i do thing {k},sorry i can not help,0")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_saved_offline_judge_must_come_from_its_train_csv(tmp_path):
    judge, data = str(tmp_path / "judge"), _labelled_csv(tmp_path / "a.csv")
    trained = OfflineJudge(path=judge, train_csv=data)  # trains and saves
    weights = (tmp_path / "judge" / "judge.safetensors").read_bytes()
    assert OfflineJudge(path=judge, train_csv=data).agreement == trained.agreement  # reloads: same data
    other = _labelled_csv(tmp_path / "b.csv", flip=3)  # one label changed
    fingerprint = trained.agreement["train_fingerprint"]
    with pytest.raises(ConfigError, match=rf"train_csv=.*b\.csv.*was trained on .*fingerprint {fingerprint}"):
        OfflineJudge(path=judge, train_csv=other)
    # Refused, not retrained in place.
    assert (tmp_path / "judge" / "judge.safetensors").read_bytes() == weights


class _AutocastProbe(Judge):
    """Records whether autocast was on when it judged."""

    def _judge(self, prompts, responses):
        self.autocast_on = torch.is_autocast_enabled("cpu")
        return [Verdict(harmful=False, score=0.0) for _ in responses]


def test_judges_run_outside_the_evaluated_stages_autocast():
    # A bf16-mixed evaluation runs test_step under autocast; a judge must not inherit it (its
    # verdicts would depend on the judged model's precision, and the LM judge's fp16 token states
    # cannot be concatenated under a bf16 autocast).
    probe = _AutocastProbe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(["q"], ["a"])
        assert torch.is_autocast_enabled("cpu")  # restored for the stage
    assert probe.autocast_on is False
