"""Judges, metrics and the written report."""

from __future__ import annotations

import pytest
import torch

from crvlm_plugins.judges import KeywordJudge, LogitJudge
from crvlm_sdk.metrics import answer_matches, compute_metrics, mb_score, wilson


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
