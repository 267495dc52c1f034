"""The Steerer changes activations exactly as h + α·p·v says, per row, and cleans up after itself."""

from __future__ import annotations

import pytest
import torch
from conftest import STEER_QUESTIONS, make_bundle, row_images, steerer_for

from crvlm_sdk import CrvlmError, Steerer
from crvlm_sdk.activations import hooks as hooks_module
from crvlm_sdk.activations.hooks import layer_hidden
from crvlm_sdk.types import PromptBatch

QUESTIONS = STEER_QUESTIONS
_images = row_images


def _batch(adapter, questions=QUESTIONS) -> PromptBatch:
    return adapter.build_prompts(questions, _images(adapter, len(questions)))


def _hand_logits(model, adapter, batch: PromptBatch, bundles, selection=None) -> torch.Tensor:
    """An independent implementation: p from an unsteered pass, then plain additive hooks."""
    layers = adapter.decoder_layers()
    b = batch.batch_size
    with torch.no_grad():
        ref = model(**batch.inputs, output_hidden_states=True)
    rows = torch.arange(b)
    handles = []
    try:
        for i, bundle in enumerate(bundles):
            m = bundle.manifest
            gates = bundle.gate().gates
            log_odds = [gates[g].log_odds(ref.hidden_states[g + 1][rows, batch.last_prompt_index]) for g in gates]
            p = torch.sigmoid(torch.stack(log_odds).mean(0))
            if selection is not None:
                p = p * selection[i]
            for layer in m.layers:
                delta = m.alpha * p.view(-1, 1, 1) * bundle.vectors[layer]

                def add(module, args, output, delta=delta):
                    return layer_hidden(output) + delta

                handles.append(layers[layer].register_forward_hook(add))
        with torch.no_grad():
            return model(**batch.inputs).logits
    finally:
        for h in handles:
            h.remove()


def test_steered_layer_output_is_h_plus_alpha_p_v(tiny):
    model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=3.0)
    batch = _batch(adapter)
    layers = adapter.decoder_layers()
    with torch.no_grad():
        ref = model(**batch.inputs, output_hidden_states=True)
    rows = torch.arange(batch.batch_size)
    p = bundle.gate().score({0: ref.hidden_states[1][rows, batch.last_prompt_index]})
    assert p.std() > 0.01, "test needs per-row gates that differ"
    seen = {}
    steerer = steerer_for(adapter, bundle)
    with steerer.apply(), torch.no_grad():
        handle = layers[1].register_forward_hook(lambda m, a, o: seen.setdefault("h1", layer_hidden(o).clone()))
        try:
            model(**batch.inputs)
        finally:
            handle.remove()
    expected = ref.hidden_states[2] + 3.0 * p.view(-1, 1, 1) * bundle.vectors[1]
    torch.testing.assert_close(seen["h1"], expected, rtol=1e-5, atol=1e-5)


def test_steered_logits_match_independent_implementation(tiny):
    model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=3.0)
    batch = _batch(adapter)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    with steerer_for(adapter, bundle).apply(), torch.no_grad():
        steered = model(**batch.inputs).logits
    expected = _hand_logits(model, adapter, batch, [bundle])
    assert (steered - plain).abs().max() > 1e-3, "steering must change the logits"
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)


def test_gate_above_band_uses_unsteered_prepass(tiny):
    model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=(0, 1), gate_layer=2, alpha=3.0)
    assert bundle.manifest.needs_prepass
    batch = _batch(adapter)
    with steerer_for(adapter, bundle).apply(), torch.no_grad():
        steered = model(**batch.inputs).logits
    torch.testing.assert_close(steered, _hand_logits(model, adapter, batch, [bundle]), rtol=1e-4, atol=1e-4)


def test_a_gate_reads_unsteered_activations_when_its_rows_other_bundle_steers_below_it(tiny):
    """Neither bundle needs a pre-pass alone; together, b's gate (layer 2) sits above a's band, so
    rows that select both read it in a pre-pass, and rows that select b alone do not need one."""
    model, _, adapter = tiny
    a = make_bundle(adapter, name="a", layers=(1,), gate_layer=0, alpha=3.0, seed=0)
    b = make_bundle(adapter, name="b", layers=(3,), gate_layer=2, alpha=3.0, seed=1)
    assert not a.manifest.needs_prepass and not b.manifest.needs_prepass
    batch = _batch(adapter)
    n = batch.batch_size
    calls = [0]
    counter = model.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    steerer = steerer_for(adapter, a, b)
    try:
        cases = (([["a", "b"]] * n, None, 2),
                 ([["b"]] * n, torch.tensor([[0.0] * n, [1.0] * n]), 1),
                 ([["a", "b"]] + [["b"]] * (n - 1), torch.tensor([[1.0] + [0.0] * (n - 1), [1.0] * n]), 2))
        for rows, selection, passes in cases:
            calls[0] = 0
            with steerer.apply(rows=rows), torch.no_grad():
                steered = model(**batch.inputs).logits
            assert calls[0] == passes
            expected = _hand_logits(model, adapter, batch, [a, b], selection)
            torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    finally:
        counter.remove()


@pytest.mark.parametrize(("gate_layers", "band"), [((0, 1), (2, 3)), ((0, 2), (1,))])
def test_gate_read_at_several_layers_averages_their_log_odds(tiny, gate_layers, band):
    """In the same pass (gate layers below the band) and through the pre-pass (above it)."""
    model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=band, gate_layer=gate_layers, alpha=3.0)
    assert bundle.manifest.needs_prepass == (max(gate_layers) >= min(band))
    batch = _batch(adapter)
    with steerer_for(adapter, bundle).apply(), torch.no_grad():
        steered = model(**batch.inputs).logits
    torch.testing.assert_close(steered, _hand_logits(model, adapter, batch, [bundle]), rtol=1e-4, atol=1e-4)
    one = make_bundle(adapter, layers=band, gate_layer=gate_layers[0], alpha=3.0)
    with steerer_for(adapter, one).apply(), torch.no_grad():
        assert (model(**batch.inputs).logits - steered).abs().max() > 1e-4, "the second gate layer must count"
    scores = steerer_for(adapter, bundle).gate_scores(QUESTIONS, _images(adapter, len(QUESTIONS)))["test"]
    with torch.no_grad():
        ref = model(**batch.inputs, output_hidden_states=True)
    rows = torch.arange(batch.batch_size)
    gates = bundle.gate().gates
    by_hand = torch.sigmoid(torch.stack([gates[g].log_odds(ref.hidden_states[g + 1][rows, batch.last_prompt_index])
                                         for g in gate_layers]).mean(0))
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-5)


def test_batched_equals_unbatched(tiny):
    model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=3.0)
    steerer = steerer_for(adapter, bundle)
    images = _images(adapter, len(QUESTIONS))
    batch = adapter.build_prompts(QUESTIONS, images)
    scores = steerer.gate_scores(QUESTIONS, images)["test"]
    assert scores.max() - scores.min() > 0.05, "rows must get different gates"
    with steerer.apply(), torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        for i, question in enumerate(QUESTIONS):
            single = adapter.build_prompts([question], None if images is None else [images[i]])
            alone = model(**single.inputs).logits[:, -1]
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-4)


def test_gate_scores_match_manual_probe(tiny):
    model, _, adapter = tiny
    bundle = make_bundle(adapter, gate_layer=1, layers=(2, 3))
    batch = _batch(adapter)
    with torch.no_grad():
        ref = model(**batch.inputs, output_hidden_states=True)
    h = ref.hidden_states[2][torch.arange(batch.batch_size), batch.last_prompt_index]
    got = steerer_for(adapter, bundle).gate_scores(QUESTIONS, _images(adapter, len(QUESTIONS)))["test"]
    torch.testing.assert_close(got, bundle.gate().score({1: h}), rtol=1e-5, atol=1e-5)


def test_multi_tenant_rows_select_bundles(tiny_llama):
    model, _, adapter = tiny_llama
    a = make_bundle(adapter, name="a", layers=(1,), gate_layer=0, seed=1)
    b = make_bundle(adapter, name="b", layers=(2, 3), gate_layer=1, seed=2)
    batch = _batch(adapter)
    rows = [["a"], ["b"], ["a", "b"], []]
    selection = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]])
    with steerer_for(adapter, a, b).apply(rows=rows), torch.no_grad():
        steered = model(**batch.inputs).logits
    torch.testing.assert_close(steered, _hand_logits(model, adapter, batch, [a, b], selection), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    torch.testing.assert_close(steered[3], plain[3])  # the row with no bundle is untouched


def test_unknown_bundle_name_in_rows(tiny_llama):
    _, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter, name="a"))
    with pytest.raises(CrvlmError, match="unknown bundle 'zzz'"), steerer.apply(rows=[["zzz"]]):
        pass


@pytest.mark.parametrize("decode_steps", [None, 0, 2])
@pytest.mark.parametrize("use_cache", [True, False])
def test_decode_steps_limits_steering_to_the_first_generated_tokens(tiny_llama, decode_steps, use_cache):
    model, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1,), gate_layer=0, alpha=4.0, decode_steps=decode_steps)
    steerer = steerer_for(adapter, bundle)
    layer = adapter.decoder_layers()[1]
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    # Hooks run in registration order: one registered before apply() sees the unsteered output,
    # one registered inside it sees the steered output, so their difference is the steering.
    first = layer.register_forward_hook(lambda m, a, o: before.append(layer_hidden(o)[:, -1].clone()))
    try:
        with steerer.apply():
            second = layer.register_forward_hook(lambda m, a, o: after.append(layer_hidden(o)[:, -1].clone()))
            try:
                batch = _batch(adapter)
                with torch.inference_mode():
                    model.generate(**batch.inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   use_cache=use_cache, pad_token_id=adapter.pad_token_id)
            finally:
                second.remove()
    finally:
        first.remove()
    steered = [bool((b - a).abs().max() > 1e-6) for a, b in zip(before, after, strict=True)]
    assert len(steered) == 6  # the prefill and five decoding steps
    limit = len(steered) if decode_steps is None else decode_steps + 1
    assert steered == [True] * limit + [False] * (len(steered) - limit)


@pytest.mark.parametrize("gate_layer", [0, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_tokens_only_leaves_the_prompt_alone_and_reads_the_gate_in_one_pass(tiny_llama, use_cache,
                                                                                     gate_layer):
    model, _, adapter = tiny_llama
    # a gate above the band (layer 3 over layer 1) needs a pre-pass when the prompt is steered
    bundle = make_bundle(adapter, layers=(1,), gate_layer=gate_layer, alpha=4.0, decode_steps=2)
    bundle = bundle.replaced(steer_prompt=False)
    assert not bundle.manifest.needs_prepass
    layer = adapter.decoder_layers()[1]
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    calls = [0]
    counter = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    first = layer.register_forward_hook(lambda m, a, o: before.append(layer_hidden(o).clone()))
    try:
        with steerer_for(adapter, bundle).apply():
            second = layer.register_forward_hook(lambda m, a, o: after.append(layer_hidden(o).clone()))
            try:
                with torch.inference_mode():
                    model.generate(**_batch(adapter).inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   use_cache=use_cache, pad_token_id=adapter.pad_token_id)
            finally:
                second.remove()
    finally:
        first.remove()
        counter.remove()
    assert calls[0] == 6  # the prefill and five decoding steps: no pre-pass
    prompt_len = before[0].shape[1]
    for step, (a, b) in enumerate(zip(before, after, strict=True)):
        changed = (b - a).abs().amax(dim=(0, 2)) > 1e-6  # per position of this call
        positions = range(b.shape[1]) if not use_cache or step == 0 else [prompt_len + step - 1]
        expected = [prompt_len <= pos < prompt_len + 2 for pos in positions]
        assert changed.tolist() == expected, f"step {step}"


@pytest.mark.parametrize(("gate_layer", "decode_steps", "steer_prompt"),
                         [(0, None, True), (3, None, True), (0, 2, True), (3, 2, False), (3, None, False)])
def test_generate_with_cache_equals_without(tiny, gate_layer, decode_steps, steer_prompt):
    _model, _, adapter = tiny
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=gate_layer, alpha=6.0, decode_steps=decode_steps)
    bundle = bundle.replaced(steer_prompt=steer_prompt)
    steerer = steerer_for(adapter, bundle)
    images = _images(adapter, len(QUESTIONS))
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8}
    cached = steerer.generate(QUESTIONS, images, use_cache=True, **kwargs)
    uncached = steerer.generate(QUESTIONS, images, use_cache=False, **kwargs)
    plain = steerer.generate(QUESTIONS, images, steer=False, **kwargs)
    assert cached == uncached
    assert cached != plain, "steering must change the generations for this test to mean anything"


def test_rotation_preserves_token_norms(tiny_llama):
    model, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1,), gate_layer=0, alpha=5.0, operator="rotation")
    batch = _batch(adapter)
    layer = adapter.decoder_layers()[1]
    seen = {}
    with torch.no_grad():
        ref = model(**batch.inputs, output_hidden_states=True)
        with steerer_for(adapter, bundle).apply():
            handle = layer.register_forward_hook(lambda m, a, o: seen.setdefault("h", layer_hidden(o).clone()))
            try:
                model(**batch.inputs)
            finally:
                handle.remove()
    before = ref.hidden_states[2]
    torch.testing.assert_close(seen["h"].norm(dim=-1), before.norm(dim=-1), rtol=1e-4, atol=1e-4)
    cos_before = torch.nn.functional.cosine_similarity(before, bundle.vectors[1].view(1, 1, -1), dim=-1)
    cos_after = torch.nn.functional.cosine_similarity(seen["h"], bundle.vectors[1].view(1, 1, -1), dim=-1)
    mask = batch.inputs["attention_mask"].bool()
    assert bool((cos_after[mask] > cos_before[mask]).all())


def _hook_counts(model) -> tuple[int, int]:
    fwd = sum(len(m._forward_hooks) for m in model.modules())
    pre = sum(len(m._forward_pre_hooks) for m in model.modules())
    return fwd, pre


def _assert_clean(model, before) -> None:
    assert _hook_counts(model) == before
    assert "generate" not in model.__dict__
    assert not hasattr(model, "_crvlm_active_steerer")


def test_hooks_removed_when_generate_raises(tiny_llama, monkeypatch):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter))
    before = _hook_counts(model)
    layer = adapter.decoder_layers()[3]
    calls = {"n": 0}
    original = layer.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure in decoding step")
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        steerer.generate(QUESTIONS, max_new_tokens=5)
    assert calls["n"] == 3
    _assert_clean(model, before)


def test_hooks_removed_when_registration_fails_half_way(tiny_llama, monkeypatch):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter, layers=(1, 2, 3)))
    before = _hook_counts(model)
    real = hooks_module._register
    calls = {"n": 0}

    def flaky(spec):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected registration failure")
        return real(spec)

    monkeypatch.setattr(hooks_module, "_register", flaky)
    with pytest.raises(RuntimeError, match="injected registration failure"), steerer.apply():
        pass
    assert calls["n"] == 3
    _assert_clean(model, before)


def test_hooks_removed_when_user_code_raises(tiny_llama):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter))
    before = _hook_counts(model)
    with pytest.raises(ValueError), steerer.apply():
        assert _hook_counts(model) != before
        raise ValueError("user error")
    _assert_clean(model, before)
    # and the steerer is reusable afterwards
    with steerer.apply():
        pass
    _assert_clean(model, before)


def test_nested_apply_is_refused(tiny_llama):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter))
    before = _hook_counts(model)
    with steerer.apply(), pytest.raises(CrvlmError, match="already active"), steerer.apply():
        pass
    _assert_clean(model, before)


def test_vectors_follow_layer_dtype(tiny_llama):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter))
    model.to(torch.bfloat16)
    with steerer.apply():
        pass
    item = steerer._runtime.loaded[0]
    assert all(v.dtype == torch.bfloat16 for v in item.vectors.values())
    assert item.gate.gates[0].tensors()["weight"].dtype == torch.float32
    out = steerer.generate(QUESTIONS[:2], max_new_tokens=3)
    assert len(out) == 2


def test_from_bundle_path_roundtrip(tiny_llama, tmp_path):
    model, processor, adapter = tiny_llama
    make_bundle(adapter).save(tmp_path / "b")
    steerer = Steerer.from_bundle(model, tmp_path / "b", processor)
    assert steerer.bundle_names == ["test"]
    assert steerer.generate("Hello", max_new_tokens=2)


def test_alpha_scale_scales_steering_without_touching_the_manifest(tiny_llama):
    model, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=3.0)
    batch = _batch(adapter)
    steerer = steerer_for(adapter, bundle)
    with torch.no_grad():
        with steerer.apply(alpha_scale=2.0):
            scaled = model(**batch.inputs).logits
        with steerer.apply(alpha_scale=0.0):
            off = model(**batch.inputs).logits
        plain = model(**batch.inputs).logits
        with steerer_for(adapter, bundle.replaced(alpha=6.0)).apply():
            doubled = model(**batch.inputs).logits
    torch.testing.assert_close(scaled, doubled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, plain)
    assert bundle.manifest.alpha == 3.0
    assert steerer.generate(QUESTIONS[:2], max_new_tokens=3, alpha_scale=2.0) == \
        steerer_for(adapter, bundle.replaced(alpha=6.0)).generate(QUESTIONS[:2], max_new_tokens=3)
    with pytest.raises(CrvlmError, match="alpha_scale must be a finite number >= 0"), steerer.apply(alpha_scale=-1):
        pass


def test_another_threads_forward_is_refused_not_steered_while_apply_runs(tiny_llama):
    """The hooks are the model's: another thread's plain forward used to be steered silently."""
    import threading

    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=3.0))
    batch = _batch(adapter)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    caught: list[BaseException] = []

    def other() -> None:
        try:
            with torch.no_grad():
                model(**batch.inputs)
        except BaseException as exc:
            caught.append(exc)

    with steerer.apply():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(caught) == 1 and isinstance(caught[0], CrvlmError) and "another thread" in str(caught[0])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch.inputs).logits, plain)  # after the block: unsteered


def test_generate_without_steering_inside_apply_is_unsteered(tiny_llama):
    _, _, adapter = tiny_llama
    steerer = steerer_for(adapter, make_bundle(adapter, layers=(1, 2), gate_layer=0, alpha=6.0))
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=6)
    with steerer.apply():
        inside = steerer.generate(QUESTIONS, steer=False, max_new_tokens=6)
    assert inside == plain
    assert steerer.generate(QUESTIONS, max_new_tokens=6) != plain, "the bundle must change something"
