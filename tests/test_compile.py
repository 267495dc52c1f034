"""Compiled decoding (static cache + torch.compile) reads the current gate, not a stale one."""

from __future__ import annotations

import pytest
from conftest import make_bundle, steerer_for
from transformers import CompileConfig

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]
NEW = {"max_new_tokens": 6, "min_new_tokens": 6}


def test_static_cache_compiled_generate_matches_eager(tiny_llama):
    model, _, adapter = tiny_llama
    first = steerer_for(adapter, make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=8.0, seed=0))
    # Same hook layout, different vectors: were a graph compiled under `first` reused under
    # `second`, it would keep steering with `first`'s vectors. The assertions below decide what
    # torch does: it re-checks module hooks, so `second` gets its own graph (as steerer.py says).
    second = steerer_for(adapter, make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=8.0, seed=5))
    scores = first.gate_scores(PROMPTS)["test"]
    assert abs(float(scores[0] - scores[1])) > 0.1, "the two prompts must get different gates"

    eager = {s: [s.generate([p], **NEW) for p in PROMPTS] for s in (first, second)}
    plain = [first.generate([p], steer=False, **NEW) for p in PROMPTS]
    assert eager[first] != plain and eager[second] != eager[first]

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise

    def compiled_generate(prompt: str) -> list[str]:
        batch = adapter.build_prompts([prompt])
        out = model.generate(
            **batch.inputs, do_sample=False, cache_implementation="static", compile_config=config,
            pad_token_id=adapter.pad_token_id, **NEW,
        )
        assert "_compiled_call" in model.__dict__, "decoding did not take the compiled path"
        return [adapter.decode(out[0, batch.seq_len :].tolist()).strip()]

    assert compiled_generate(PROMPTS[0]) == plain[0]
    for steerer in (first, second):
        with steerer.apply():
            # two consecutive prompts with different gates through one compiled graph
            assert [compiled_generate(p) for p in PROMPTS] == eager[steerer]
    assert compiled_generate(PROMPTS[1]) == plain[1]


def test_response_shaping_under_compiled_decoding(tiny_llama):
    """The shaper reads the gate buffers from a logits processor: compiled decoding changes nothing."""
    from crvlm_sdk.bundle.manifest import ResponseSpec

    model, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=8.0, seed=0)
    scores = steerer_for(adapter, bundle).gate_scores(PROMPTS)["test"]
    threshold = float(scores.mean())  # one prompt refused, the other passed
    spec = ResponseSpec(opening="Sorry.", stop_sentences=1, threshold=threshold)
    steerer = steerer_for(adapter, bundle.replaced(response=spec))
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True

    def run(prompts, **extra):
        batch = adapter.build_prompts(prompts)
        with steerer.apply():
            out = model.generate(**batch.inputs, do_sample=False, pad_token_id=adapter.pad_token_id,
                                 max_new_tokens=6, **extra)
        return out[:, batch.seq_len :].tolist()

    eager = run(PROMPTS)
    compiled = run(PROMPTS, cache_implementation="static", compile_config=config)
    assert "_compiled_call" in model.__dict__, "decoding did not take the compiled path"
    assert compiled == eager
    opening = adapter.encode_text("Sorry.")
    refused = [float(p) >= threshold for p in scores]
    assert sum(refused) == 1
    for ids, is_refused in zip(compiled, refused, strict=True):
        assert (ids[: len(opening)] == opening) is is_refused
