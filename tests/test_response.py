"""Response shaping: refused rows open with forced tokens, end after n sentences, or read the
template; rows the gate passes are never touched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bundle, steerer_for

from crvlm_sdk import BundleError, CrvlmError
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.evaluation.evaluate import without_gate
from crvlm_sdk.steering.response import ResponseShaper, RowPlan, end_of_sequence_id, sentence_end_ids

QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread at home without a bread machine or any special tools?",
    "Hi",
    "Name three colours.",
    "Write a haiku about rain.",
    "Tell me a joke about cats.",
]
NEW = {"max_new_tokens": 8}


def _ids(steerer, questions=QUESTIONS, *, steer=True, rows=None, response=None, **kwargs):
    """New token ids of ``model.generate`` called by user code inside ``apply()`` (or unsteered)."""
    adapter = steerer.adapter
    batch = adapter.build_prompts(questions)
    args = {"do_sample": False, "pad_token_id": adapter.pad_token_id, **NEW, **kwargs}
    with torch.no_grad():
        if steer:
            with steerer.apply(rows=rows, response=response):
                out = steerer.model.generate(**batch.inputs, **args)
        else:
            out = steerer.model.generate(**batch.inputs, **args)
    return [row.tolist() for row in out[:, batch.seq_len :]]


def _until_eos(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture
def gated(tiny_llama):
    """A bundle whose threshold sits between the gate scores, so about half the rows are refused."""
    model, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=4.0)
    p = steerer_for(adapter, bundle).gate_scores(QUESTIONS)["test"]
    ordered = sorted(p.tolist())
    threshold = (ordered[2] + ordered[3]) / 2
    refused = [float(x) >= threshold for x in p]
    assert 0 < sum(refused) < len(refused), "the test needs refused and passed rows"
    return model, adapter, bundle, threshold, refused


def test_refused_rows_get_the_opening_and_end_after_its_sentence(gated):
    model, adapter, bundle, threshold, refused = gated
    spec = ResponseSpec(opening="Sorry.", stop_sentences=1, threshold=threshold)
    steerer = steerer_for(adapter, bundle.replaced(response=spec))
    eos = end_of_sequence_id(model, adapter, None)
    opening = adapter.encode_text("Sorry.")
    shaped = _ids(steerer)
    unshaped = _ids(steerer, response=False)
    for row, is_refused, plain in zip(shaped, refused, unshaped, strict=True):
        if is_refused:
            assert _until_eos(row, eos) == [*opening, eos]
        else:  # passed rows: steered exactly as without response shaping, never cut
            assert row == plain
    details = steerer.generate_detailed(QUESTIONS, **NEW)
    assert [t for t, r in zip(details.texts, refused, strict=True) if r] == ["Sorry."] * sum(refused)
    assert all(e for e, r in zip(details.ended, refused, strict=True) if r)


def test_stop_counts_sentences_after_the_opening(gated):
    model, adapter, bundle, threshold, refused = gated
    spec = ResponseSpec(opening="Sorry.", stop_sentences=2, threshold=threshold)
    steerer = steerer_for(adapter, bundle.replaced(response=spec))
    eos = end_of_sequence_id(model, adapter, None)
    ends = sentence_end_ids(adapter, model.get_output_embeddings().weight.shape[0])
    opening = adapter.encode_text("Sorry.")
    for row, is_refused in zip(_ids(steerer, max_new_tokens=24), refused, strict=True):
        if not is_refused:
            continue
        assert row[: len(opening)] == opening
        body = _until_eos(row, eos)
        if body[-1] == eos:  # ended: exactly after the second sentence end
            assert sum(bool(ends[t]) for t in body[:-1]) == 2 and bool(ends[body[-2]])
        else:  # ran to the limit without a second sentence
            assert sum(bool(ends[t]) for t in body) < 2


def test_template_rows_read_the_message_and_passed_rows_are_unsteered(gated):
    _, adapter, bundle, threshold, refused = gated
    message = "I'm sorry, but I can only help with testing."
    spec = ResponseSpec(mode="template", message=message, threshold=threshold)
    steerer = steerer_for(adapter, bundle.replaced(response=spec))
    texts = steerer.generate(QUESTIONS, max_new_tokens=24)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=24)
    for text, is_refused, unsteered in zip(texts, refused, plain, strict=True):
        assert text == (message if is_refused else unsteered)


def test_overrides_per_call(gated):
    _, adapter, bundle, threshold, refused = gated
    steerer = steerer_for(adapter, bundle.replaced(response=ResponseSpec(threshold=threshold)))
    texts = steerer.generate(QUESTIONS, response={"mode": "template", "message": "No."}, **NEW)
    assert [t for t, r in zip(texts, refused, strict=True) if r] == ["No."] * sum(refused)
    everyone = steerer.generate(QUESTIONS, response={"mode": "template", "message": "No.", "threshold": 1e-9}, **NEW)
    assert everyone == ["No."] * len(QUESTIONS)
    with pytest.raises(BundleError, match=r"unknown response setting\(s\) \['colour'\]"):
        steerer.generate(QUESTIONS, response={"colour": "red"})
    with pytest.raises(BundleError, match="template mode needs a non-empty `message`"):
        steerer.generate(QUESTIONS, response={"mode": "template", "message": " "})


def test_rows_read_their_own_bundles_opening(tiny_llama):
    model, _, adapter = tiny_llama
    base = without_gate(make_bundle(adapter, layers=(1,), gate_layer=0, alpha=1.0))
    a = base.replaced(name="a", response=ResponseSpec(opening="Alpha.", stop_sentences=1))
    b = base.replaced(name="b", response=ResponseSpec(opening="Beta.", stop_sentences=1))
    steerer = steerer_for(adapter, a, b)
    eos = end_of_sequence_id(model, adapter, None)
    rows = [["a"], ["b"], [], ["b", "a"]]
    got = _ids(steerer, QUESTIONS[:4], rows=rows)
    assert _until_eos(got[0], eos) == [*adapter.encode_text("Alpha."), eos]
    assert _until_eos(got[1], eos) == [*adapter.encode_text("Beta."), eos]
    assert got[2] == _ids(steerer, QUESTIONS[:4], steer=False)[2]  # no bundle: untouched
    assert _until_eos(got[3], eos) == [*adapter.encode_text("Alpha."), eos]  # first bundle in Steerer order


def test_shaper_forces_only_refused_rows():
    """The processor alone, on made-up scores: refused rows follow the plan, others are untouched."""
    vocab, eos, dot = 10, 9, 5
    ends = torch.zeros(vocab, dtype=torch.bool)
    ends[dot] = True
    p = torch.tensor([0.9, 0.2, 0.7])
    mask = torch.tensor([1.0, 1.0, 0.0])  # row 2 does not use this bundle
    shaper = ResponseShaper([RowPlan(0.5, [3, 4], stop_sentences=1)], lambda: [(p, mask)], ends, eos)
    ids = torch.zeros(3, 4, dtype=torch.long)
    scores = torch.randn(3, vocab)
    expected_free = scores.clone()
    for step, token in enumerate([3, 4, None, eos]):
        out = shaper(ids, scores.clone())
        assert torch.equal(out[1:], expected_free[1:]), "passed and unselected rows are untouched"
        chosen = int(out[0].argmax())
        if step < 2:
            assert chosen == token and torch.isinf(out[0]).sum() == vocab - 1
        elif step == 2:
            assert torch.equal(out[0], expected_free[0])  # free to write its sentence
            chosen = dot
        else:
            assert chosen == eos  # one sentence written: the row ends
        ids = torch.cat([ids, torch.tensor([[chosen], [0], [0]])], dim=1)


def test_sentence_ends(tiny_llama):
    model, _, adapter = tiny_llama
    ends = sentence_end_ids(adapter, model.get_output_embeddings().weight.shape[0])
    for text, expected in ((".", True), ("?", True), ("\n", True), ('."', True), ("Hello", False),
                           (",", False), ("1.", False)):
        ids = adapter.encode_text(text)
        if len(ids) == 1:
            assert bool(ends[ids[0]]) is expected, text


def test_end_token_comes_from_generate_then_the_model_then_the_tokenizer():
    from types import SimpleNamespace as NS

    model = NS(generation_config=NS(eos_token_id=[7, 8]))
    adapter = NS(tokenizer=NS(eos_token_id=5))
    assert end_of_sequence_id(model, adapter, 3) == 3
    assert end_of_sequence_id(model, adapter, None) == 7
    assert end_of_sequence_id(NS(generation_config=NS(eos_token_id=None)), adapter, None) == 5
    with pytest.raises(CrvlmError, match="needs an end-of-sequence token"):
        end_of_sequence_id(NS(generation_config=None), NS(tokenizer=None), None)
