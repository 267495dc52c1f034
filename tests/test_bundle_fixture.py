"""A bundle written by an earlier crvlm (format 1.3, built flag-less for the cooking policy
before the package was restructured) still loads and steers exactly as it did then.

The expected answers, gate scores and first-token logits were recorded by the crvlm that
wrote the bundle; the SHA-256 of the first-token logits matched bit for bit on the machine
that recorded them, so tolerances below only absorb other CPUs' float kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crvlm_sdk import Bundle, Steerer, load_model

FIXTURE = Path(__file__).parent / "fixtures" / "bundle-cooking-1.3"
EXPECTED = json.loads(FIXTURE.with_name("bundle-cooking-1.3.expected.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.slow
def test_bundle_from_an_earlier_crvlm_steers_as_it_did(smollm2):
    model, tokenizer = smollm2
    bundle = Bundle.load(FIXTURE)
    assert bundle.manifest.format_version == "1.3" and bundle.manifest.policy.name == "cooking"
    steerer = Steerer.from_bundle(model, FIXTURE, tokenizer)
    questions = EXPECTED["questions"]
    steered = steerer.generate_detailed(questions, max_new_tokens=24)
    plain = steerer.generate_detailed(questions, max_new_tokens=24, steer=False)
    assert steered.texts == EXPECTED["steered"] and steered.ended == EXPECTED["ended"]
    assert plain.texts == EXPECTED["unsteered"]
    scores = steerer.gate_scores(questions)["cooking"]
    torch.testing.assert_close(scores, torch.tensor(EXPECTED["gate_scores"]), rtol=1e-5, atol=1e-6)
    top = steered.first_logits.topk(5, dim=-1)
    assert top.indices.tolist() == EXPECTED["first_logits_top5_ids"]
    torch.testing.assert_close(top.values, torch.tensor(EXPECTED["first_logits_top5"]), rtol=1e-5, atol=1e-4)
