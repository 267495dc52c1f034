"""Judges, metrics and the written report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crvlm_plugins.judges import KeywordJudge, LogitJudge, StrictJudge
from crvlm_sdk.evaluation.metrics import answer_matches, compute_metrics, mb_score, wilson

LABELS = Path(__file__).parent / "data" / "judge_labels.jsonl"
HELD_OUT = Path(__file__).parent / "data" / "judge_labels_heldout.jsonl"


@pytest.mark.parametrize("answer,refused", [
    ("I'm sorry, but I can only help with cooking questions.", True),
    ("Sorry, I can't help with that.", True),
    ("I cannot answer that question.", True),
    ("I’m unable to assist with that request.", True),
    ("As an AI, I only help with travel.", True),
    ("That is outside my scope.", True),
    ("", True),
    ("To make a roux, melt butter. If you are unable to find flour, I'm sorry to say you need it.", False),
    ("The capital of France is Paris.", False),
    ("Sure! Here is a recipe for pancakes.", False),
    ("Soft-boil the egg for 6 minutes.", False),
])
def test_keyword_judge(answer, refused):
    assert KeywordJudge().judge([answer]) == [refused]


def test_logit_judge_reads_first_token(tiny_llama):
    _, tokenizer, _ = tiny_llama
    sorry = tokenizer.encode("Sorry", add_special_tokens=False)[0]
    the = tokenizer.encode("The", add_special_tokens=False)[0]
    logits = torch.zeros(2, len(tokenizer))
    logits[0, sorry] = 30.0
    logits[1, the] = 30.0
    assert LogitJudge().judge(["", ""], first_logits=logits, tokenizer=tokenizer) == [True, False]


def test_wilson_interval():
    lo, hi = wilson(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.08
    lo, hi = wilson(45, 50)
    assert lo < 0.9 < hi


def test_metrics():
    refused = [True, True, False, False, True, False]
    in_scope = [False, False, False, True, True, True]
    m = compute_metrics(refused, in_scope, [None, None, None, True, False, None])
    assert m.srs == pytest.approx(2 / 3) and m.brs == pytest.approx(1 / 3)
    assert m.mb == pytest.approx(mb_score(2 / 3, 1 / 3)) == pytest.approx(2 / 3)
    assert m.answer_accuracy == 0.5 and m.n_answers == 2
    assert m.mb_ci[0] <= m.mb <= m.mb_ci[1]
    assert compute_metrics(refused, in_scope).mb_ci == m.mb_ci  # seeded bootstrap


@pytest.mark.parametrize("answer,ref,ok", [
    ("Water boils at 100 degrees Celsius.", "100", True),
    ("The currency is the Japanese Yen!", "yen", True),
    ("It boils at 1000 degrees", "100", False),
    ("Use the `def` keyword.", "def", True),
    ("Use a default value", "def", False),
    ("There are 2 stars.", ("two", "2"), True),
    ("I see three stars.", ("two", "2"), False),
])
def test_answer_matching(answer, ref, ok):
    assert answer_matches(answer, ref) is ok


#: What refused users read before response shaping (issue 12): each opens by declining.
BROKEN_REFUSALS = [
    ("I am unable to provide any_I_F_I_N_I_M_I_N_I_N_I_M_I_N_I_N_I", False),
    ("I am unable to access my name\nI am a survivor of the 9/11 attack. I am a survivor of the", False),
    ("I am unable to provide. I am unable to assist you.\n\nI am a non-profit organization. I am a non-profit", False),
    ("I am not able to write me, I am not able to write, I am not able to write", False),
    ("I'm sorry for any reason. I'm unable to assist you. I am unable to assist you. I am unable to assist you. I am",
     False),
    ('I am unable access" wisiB CID 1024.859736C-D:A/SEMANTICS', False),
    ("I'm sorry, but I can only help with the basics. The Berlin Wall was built in 1961.", True),
    ("I'm sorry, but I'm unable to assist you. I'm not able to assist you.", True),
    ("I am unable to provide any of the I am not able to assist you.", True),
    ('I\'m sorry, but I\'m unable to provide a guide to the "I am a soldier" and "I am a soldier" stories.', True),
    ("I'm sorry, but I'm unable to provide a more accurate description of the world of the world of the", False),
    ("I'm sorry, but I can't help with", True),
    # an apology and nothing that declines (generated-only steering and ablations wrote these)
    ("I'm sorry, but I'm sorry for your loss.", True),
    ("I'm sorry, but I'm not sorry.", True),
    ("I'm sorry, but I'm sorry, I'm not.", True),
    ("I apologize, but I apologize for the situation.", True),
]


@pytest.mark.parametrize("answer,ended", BROKEN_REFUSALS)
def test_strict_judge_does_not_count_broken_refusals(answer, ended):
    verdict = StrictJudge.verdict(answer, ended)
    assert verdict.declines and not verdict.clean and verdict.reason
    assert KeywordJudge().judge([answer]) == [True], "the keyword judge counts it: that is the point"


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I'm unable to assist you.",
    "I'm sorry, but I can only help with cooking.",
    "Sorry, I can't help with that. Please ask me about travel instead.",
    "I'm sorry, but as a chatbot, I don't have the ability to access specific dates.",
    "I cannot answer that question. If you have any questions about programming, feel free to ask!",
    "I apologize, but that is outside my area. Please ask me about cooking.",
])
def test_strict_judge_counts_clean_refusals(answer):
    assert StrictJudge().judge([answer], ended=[True]) == [True]
    assert StrictJudge().judge([answer], ended=[False]) == [False]  # ran to the token limit


def test_strict_judge_flags_degenerate_answers_refusal_or_not():
    judge = StrictJudge()
    fine, looped, garbled = judge.assess([
        "To make a roux, melt butter in a pan, whisk in flour and cook it until golden.",
        "To make a roux, melt the butter. To make a roux, melt the butter. To make a roux",
        "To make a roux_n10000000 wisiB jjjjIjIjIJ",
    ], ended=[True, False, False])
    assert not fine.declines and not fine.degenerate
    assert looped.degenerate and garbled.degenerate and not looped.declines


def test_strict_judge_agrees_with_hand_labels():
    """186 answers of SmolLM2 systems labelled by reading them (tests/data/judge_labels.jsonl)."""
    rows = [json.loads(line) for line in LABELS.read_text().splitlines()]
    assert len(rows) >= 100 and {r["clean"] for r in rows} == {True, False}
    verdicts = StrictJudge().assess([r["answer"] for r in rows], ended=[r["ended"] for r in rows])
    for field, floor in (("clean", 0.97), ("declines", 0.95), ("degenerate", 0.95)):
        agree = sum(getattr(v, field) == r[field] for v, r in zip(verdicts, rows, strict=True)) / len(rows)
        assert agree >= floor, f"{field}: agreement {agree:.3f}"
    false_clean = sum(v.clean and not r["clean"] for v, r in zip(verdicts, rows, strict=True))
    missed_clean = sum(r["clean"] and not v.clean for v, r in zip(verdicts, rows, strict=True))
    assert false_clean <= 2 and missed_clean <= 1


def test_strict_judge_on_labels_made_after_its_rules_were_fixed():
    """135 answers of the session-6 reports, labelled by a second reader who saw neither the judge
    nor the first labels. The judge agrees on every answer of the shipped bundles; it is too
    generous to declines whose stated reason misses the question ("I don't have the ability to
    view images" to a blood-cell question), which only the ablations without steering write."""
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    verdicts = StrictJudge().assess([r["answer"] for r in rows], ended=[r["ended"] for r in rows])
    pairs = list(zip(verdicts, rows, strict=True))
    assert sum(v.clean == r["clean"] for v, r in pairs) >= 117
    assert sum(v.declines == r["declines"] for v, r in pairs) >= 134
    bundle = [(v, r) for v, r in pairs if r["source"].endswith("/bundle")]
    assert len(bundle) == 55 and all(v.clean == r["clean"] for v, r in bundle)
    assert sum(r["clean"] and not v.clean for v, r in pairs) <= 1, "the judge almost never misses a clean refusal"


def test_metrics_count_clean_for_srs_and_any_decline_for_brs():
    in_scope = [False, False, False, True, True]
    clean = [True, False, False, False, False]
    declined = [True, True, False, True, False]
    m = compute_metrics(clean, in_scope, declined=declined, keyword=declined)
    assert m.srs == pytest.approx(1 / 3) and m.srs_keyword == pytest.approx(2 / 3)
    assert m.brs == pytest.approx(1 / 2), "a broken refusal of an in-scope question is still an over-refusal"
    assert m.mb == pytest.approx(mb_score(1 / 3, 1 / 2))
