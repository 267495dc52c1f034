"""Batched capture equals per-sample capture, and reads the right token positions."""

from __future__ import annotations

import pytest
import torch

from crvlm_sdk import CrvlmError, Sample, capture
from crvlm_sdk.activations.capture import MIN_SHARED_PREFIX, _LayerReader, capture_forced, position_weights

QUESTIONS = [
    "What is the capital of France?",
    "Please explain, in a few short sentences, how a bicycle gear system works.",
    "Hi",
    "Name three colours.",
    "Why do cats purr when they are happy or stressed?",
]


def _samples(adapter) -> list[Sample]:
    if not adapter.supports_images:
        return [Sample(q) for q in QUESTIONS]
    from PIL import Image

    return [Sample(q, Image.new("RGB", (40, 30), (50 * i, 20, 200)) if i % 2 == 0 else None)
            for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("position,prefix", [("last_prompt", None), ("prefix_last", "Sorry, I can't"),
                                             ("prefix_mean", "Sorry, I can't")])
def test_batched_equals_per_sample(tiny, position, prefix):
    _, _, adapter = tiny
    samples = _samples(adapter)
    layers = [0, 2, 3]
    batched = capture(adapter, samples, layers, position=position, forced_prefix=prefix, batch_size=5, keep=True,
                      progress=False)
    single = capture(adapter, samples, layers, position=position, forced_prefix=prefix, batch_size=1, keep=True,
                     progress=False)
    assert batched.count == single.count == len(samples)
    for layer in layers:
        torch.testing.assert_close(batched.rows(layer), single.rows(layer), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.mean(layer), single.mean(layer), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.mean(layer), batched.rows(layer).mean(0), rtol=1e-5, atol=1e-6)


def test_positions_match_output_hidden_states(tiny):
    """Hand computation from raw hidden states at the documented positions (left-padded batch)."""
    model, _, adapter = tiny
    samples = _samples(adapter)
    prefix = "Sorry, I cannot help"
    batch = adapter.build_prompts([s.question for s in samples], [s.image for s in samples], forced_prefix=prefix)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "rows must be padded differently"
    with torch.no_grad():
        hs = model(**batch.inputs, output_hidden_states=True).hidden_states
    got = capture(adapter, samples, [1], position="prefix_mean", forced_prefix=prefix, keep=True,
                  progress=False).rows(1)
    for i in range(len(samples)):
        start, end = int(batch.prefix_start[i]), int(batch.prefix_end[i])
        torch.testing.assert_close(got[i], hs[2][i, start:end].mean(0), rtol=1e-4, atol=1e-5)
        # the forced prefix tokens are exactly the prefix text
        assert adapter.decode(batch.inputs["input_ids"][i, start:end].tolist()) == prefix
        # the last prompt token closes the assistant header, right before the prefix
        assert int(batch.last_prompt_index[i]) == start - 1
        header = adapter.decode(batch.inputs["input_ids"][i, start - 3 : start].tolist())
        assert header.endswith("assistant\n")


def test_running_stats_memory_does_not_keep_rows(tiny_llama):
    _, _, adapter = tiny_llama
    stats = capture(adapter, [Sample(q) for q in QUESTIONS], [1], progress=False)
    assert stats.samples is None
    assert stats.sums[1].dtype == torch.float64
    with pytest.raises(CrvlmError, match="keep=True"):
        stats.rows(1)


def test_prefix_position_without_prefix_is_an_error(tiny_llama):
    _, _, adapter = tiny_llama
    batch = adapter.build_prompts(QUESTIONS)
    with pytest.raises(CrvlmError, match="needs a forced prefix"):
        position_weights(batch, "prefix_last")


def test_layer_out_of_range(tiny_llama):
    _, _, adapter = tiny_llama
    with pytest.raises(CrvlmError, match=r"layers \[9\] out of range for a model with 4 decoder layers"):
        capture(adapter, [Sample("hi")], [9], progress=False)


@pytest.mark.parametrize("position", ["prefix_mean", "prefix_last"])
def test_forced_prefixes_share_the_prompt(tiny, position):
    """One pass of the shared prompt + cached continuations reads what full passes read."""
    _, _, adapter = tiny
    samples = _samples(adapter)
    prefixes = ["Sorry, I can't", "Sure! Here is"]
    system = "Only answer questions about cooking."
    full = capture_forced(adapter, samples, [0, 3], prefixes, position=position, system=system, batch_size=3,
                          keep=True, progress=False, share_prompt=False)
    alone = capture(adapter, samples, [0, 3], position=position, system=system, forced_prefix=prefixes[1],
                    batch_size=3, keep=True, progress=False)
    auto = capture_forced(adapter, samples, [0, 3], prefixes, position=position, system=system, batch_size=3,
                          keep=True, progress=False)
    for layer in (0, 3):
        torch.testing.assert_close(full[1].rows(layer), alone.rows(layer), rtol=1e-5, atol=1e-6)
        for got, want in zip(auto, full, strict=True):
            assert got.count == want.count == len(samples)
            torch.testing.assert_close(got.rows(layer), want.rows(layer), rtol=1e-4, atol=1e-5)


def test_forced_prefixes_cached_path_on_llama(tiny_llama, caplog):
    """The KV-cache path itself (no fallback) is exact on a plain decoder."""
    _, _, adapter = tiny_llama
    samples = [Sample(q) for q in QUESTIONS]
    prefixes = ["Sorry, I can't", "Sure"]
    shared = capture_forced(adapter, samples, [1, 3], prefixes, batch_size=2, keep=True, progress=False,
                            share_prompt=True)
    full = capture_forced(adapter, samples, [1, 3], prefixes, batch_size=2, keep=True, progress=False,
                          share_prompt=False)
    for got, want in zip(shared, full, strict=True):
        torch.testing.assert_close(got.rows(3), want.rows(3), rtol=1e-4, atol=1e-5)
    with caplog.at_level("INFO", logger="crvlm_sdk.activations.capture"):
        capture_forced(adapter, samples, [1], prefixes, progress=False)
    assert "differs" not in caplog.text


def test_forced_prefixes_need_forced_positions(tiny_llama):
    _, _, adapter = tiny_llama
    with pytest.raises(CrvlmError, match="use capture"):
        capture_forced(adapter, [Sample("hi")], [1], ["Sorry"], position="last_prompt", progress=False)


def test_forced_prefixes_fall_back_where_the_cache_cannot_continue(tiny_vlm_dirs, caplog):
    """Qwen2-VL derives 3-D positions from the whole prompt: the check must fall back, not crash."""
    from PIL import Image

    from crvlm_sdk import adapter_for, load_model

    model, processor = load_model(tiny_vlm_dirs("qwen2-vl"))
    adapter = adapter_for(model, processor)
    samples = [Sample(q, Image.new("RGB", (40, 30), (60 * i, 20, 200)) if i % 2 == 0 else None)
               for i, q in enumerate(QUESTIONS[:3])]
    prefixes = ["Sorry, I can't", "Sure"]
    with caplog.at_level("INFO", logger="crvlm_sdk.activations.capture"):
        auto = capture_forced(adapter, samples, [1], prefixes, keep=True, progress=False)
    assert "running full passes" in caplog.text
    full = capture_forced(adapter, samples, [1], prefixes, keep=True, progress=False, share_prompt=False)
    for got, want in zip(auto, full, strict=True):
        torch.testing.assert_close(got.rows(1), want.rows(1))


def test_shared_prefix_reads_what_full_passes_read(tiny):
    """The leading tokens every row shares run once per batch; the reads must not change."""
    _, _, adapter = tiny
    samples = _samples(adapter)
    system = "Only answer questions about cooking, and say sorry otherwise."
    batch = adapter.build_prompts([s.question for s in samples], [s.image for s in samples], system=system)
    split = _LayerReader(adapter, [1]).split(batch, position_weights(batch, "last_prompt"))
    assert split is not None and split.length >= MIN_SHARED_PREFIX, "the system message is shared by every row"
    assert adapter.decode(split.prefix["input_ids"][0].tolist()).count(system) == 1
    for position, prefix in (("last_prompt", None), ("prefix_mean", "Sorry, I can't")):
        shared = capture(adapter, samples, [0, 3], position=position, system=system, forced_prefix=prefix,
                         batch_size=5, keep=True, progress=False, share_prefix=True)
        full = capture(adapter, samples, [0, 3], position=position, system=system, forced_prefix=prefix,
                       batch_size=5, keep=True, progress=False, share_prefix=False)
        for layer in (0, 3):
            torch.testing.assert_close(shared.rows(layer), full.rows(layer), rtol=1e-4, atol=1e-5)


def test_shared_prefix_stops_before_image_tokens(tiny_llava_dir):
    """Image placeholders are equal in every row but carry different pictures: never shared."""
    from PIL import Image

    from crvlm_sdk import adapter_for, load_model

    model, processor = load_model(tiny_llava_dir)
    adapter = adapter_for(model, processor)
    images = [Image.new("RGB", (40, 30), (60 * i, 20, 200)) for i in range(3)]
    batch = adapter.build_prompts(["What is this?", "What colour is it?", "Describe it."], images,
                                  system="Only describe pictures of circles.")
    split = _LayerReader(adapter, [1]).split(batch)
    assert split is not None
    assert adapter.image_token_id not in split.prefix["input_ids"][0].tolist()
    assert split.length < int((batch.inputs["input_ids"][0] == adapter.image_token_id).nonzero()[0])


def test_shared_prefix_not_used_when_reads_fall_inside_it(tiny_llama):
    _, _, adapter = tiny_llama
    batch = adapter.build_prompts(["Same question?", "Same question?"], system="A long enough system message here.",
                                  forced_prefix="Sorry")
    weights = torch.zeros(batch.batch_size, batch.seq_len)
    weights[:, 2] = 1.0  # a read inside the shared tokens
    reader = _LayerReader(adapter, [1])
    assert reader.split(batch) is not None
    assert reader.split(batch, weights) is None


def test_shared_prefix_is_checked_once_per_model(tiny_llama, monkeypatch):
    _, _, adapter = tiny_llama
    calls = []
    original = _LayerReader.same_reads

    def counting(self, full, shared):
        calls.append(1)
        return original(self, full, shared)

    monkeypatch.setattr(_LayerReader, "same_reads", counting)
    samples = [Sample(q) for q in QUESTIONS]
    for _ in range(2):
        capture(adapter, samples, [1], system="Only answer questions about cooking.", batch_size=2, progress=False)
    assert len(calls) == 1


def test_shared_prefix_falls_back_where_positions_are_not_1d(tiny_vlm_dirs, caplog):
    """Qwen2-VL with pictures: explicit 1-D positions are wrong for its 3-D rotary; must fall back."""
    from PIL import Image

    from crvlm_sdk import adapter_for, load_model

    model, processor = load_model(tiny_vlm_dirs("qwen2-vl"))
    adapter = adapter_for(model, processor)
    samples = [Sample(q, Image.new("RGB", (40, 30), (60 * i, 20, 200))) for i, q in enumerate(QUESTIONS[:3])]
    system = "Only answer questions about cooking, and say sorry otherwise."
    with caplog.at_level("INFO", logger="crvlm_sdk.activations.capture"):
        auto = capture(adapter, samples, [1], system=system, keep=True, progress=False)
    assert "running full passes" in caplog.text
    full = capture(adapter, samples, [1], system=system, keep=True, progress=False, share_prefix=False)
    torch.testing.assert_close(auto.rows(1), full.rows(1))


def test_rows_come_back_in_the_callers_order(tiny_llama):
    """Batches are formed shortest-first to cut padding; kept rows must not show it."""
    _, _, adapter = tiny_llama
    samples = [Sample(q) for q in QUESTIONS]
    assert [len(q) for q in QUESTIONS] != sorted(len(q) for q in QUESTIONS)
    rows = capture(adapter, samples, [2], batch_size=2, keep=True, progress=False).rows(2)
    forced = capture_forced(adapter, samples, [2], ["Sorry"], batch_size=2, keep=True, progress=False)[0].rows(2)
    for i, sample in enumerate(samples):
        alone = capture(adapter, [sample], [2], keep=True, progress=False).rows(2)[0]
        torch.testing.assert_close(rows[i], alone, rtol=1e-4, atol=1e-5)
        alone = capture(adapter, [sample], [2], position="prefix_mean", forced_prefix="Sorry", keep=True,
                        progress=False).rows(2)[0]
        torch.testing.assert_close(forced[i], alone, rtol=1e-4, atol=1e-5)
