"""Gates that read the question's tokens as well as the last prompt token (``last+question``):
the span is found from token ids alone, the build's capture and the Steerer read the same
features, and the out-of-fold gate selection works."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STEER_QUESTIONS, row_images, steerer_for

from crvlm_sdk import CrvlmError, get_plugin_manager
from crvlm_sdk.activations.capture import capture, question_weights
from crvlm_sdk.build.gate import fit_gate
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.policy import Policy
from crvlm_sdk.types import Sample

QUESTIONS = STEER_QUESTIONS
_images = row_images


def _span_text(adapter, batch, weights, row: int) -> str:
    ids = batch.inputs["input_ids"][row][weights[row] > 0]
    return adapter.tokenizer.decode(ids.tolist())


def test_the_question_span_is_the_question_and_the_assistant_header(tiny):
    _, _, adapter = tiny
    opener = adapter.question_opener()
    assert opener, "a chat template with a user turn has an opening"
    batch = adapter.build_prompts(QUESTIONS, _images(adapter, len(QUESTIONS)), system="Be brief. Never lie.")
    weights = question_weights(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.last_prompt_index,
                               opener, adapter.image_token_ids())
    torch.testing.assert_close(weights.sum(1), torch.ones(len(QUESTIONS)))
    for row, question in enumerate(QUESTIONS):
        text = _span_text(adapter, batch, weights, row)
        assert question in text and "Never lie" not in text, text
        assert weights[row, batch.last_prompt_index[row]] > 0
        assert weights[row, : batch.last_prompt_index[row] + 1].gt(0).sum() < batch.inputs["attention_mask"][row].sum()
    image_ids = torch.isin(batch.inputs["input_ids"], torch.tensor(sorted(adapter.image_token_ids() or {-1})))
    assert not bool((weights[image_ids] > 0).any()), "image placeholders are not part of the question"


def test_without_the_opener_a_row_averages_its_whole_prompt():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    last = torch.tensor([4, 4])
    weights = question_weights(ids, mask, last, (2, 3), set())
    torch.testing.assert_close(weights[0], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(weights[1], torch.tensor([0, 0, 0, 0.5, 0.5]))  # after the opener 2, 3


def test_capture_reads_the_last_token_and_the_question_mean(tiny):
    model, _, adapter = tiny
    samples = [Sample(q, img) for q, img in zip(QUESTIONS, _images(adapter, 4) or [None] * 4, strict=True)]
    both = capture(adapter, samples, [1, 2], position="last_and_question", keep=True, progress=False)
    last = capture(adapter, samples, [1, 2], keep=True, progress=False)
    hidden = adapter.hidden_size
    for layer in (1, 2):
        assert both.rows(layer).shape == (4, 2 * hidden)
        torch.testing.assert_close(both.rows(layer)[:, :hidden], last.rows(layer), rtol=1e-4, atol=1e-5)
    for i, sample in enumerate(samples):  # one prompt at a time, by hand
        batch = adapter.build_prompts([sample.question], None if sample.image is None else [sample.image])
        with torch.no_grad():
            states = model(**batch.inputs, output_hidden_states=True).hidden_states
        w = question_weights(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.last_prompt_index,
                             adapter.question_opener(), adapter.image_token_ids())
        for layer in (1, 2):
            torch.testing.assert_close(both.rows(layer)[i, hidden:], (w[0] @ states[layer + 1][0]).float(),
                                       rtol=1e-4, atol=1e-4)
    shared = capture(adapter, samples, [2], position="last_and_question", keep=True, progress=False,
                     share_prefix=True, batch_size=4)
    plain = capture(adapter, samples, [2], position="last_and_question", keep=True, progress=False,
                    share_prefix=False, batch_size=4)
    torch.testing.assert_close(shared.rows(2), plain.rows(2), rtol=1e-4, atol=1e-4)


def _question_bundle(adapter, gate_layers, band, seed=0):
    """Random probe gates over (last, question mean) features standardised on real prompts."""
    g = torch.Generator().manual_seed(seed)
    stats = capture(adapter, [Sample(q) for q in QUESTIONS * 2], list(gate_layers), position="last_and_question",
                    keep=True, progress=False)
    probe = get_plugin_manager().get("gate", "probe")
    gates = {}
    for layer in gate_layers:
        h = stats.rows(layer)
        tensors = {"weight": torch.randn(h.shape[1], generator=g), "bias": torch.zeros(()), "mean": h.mean(0),
                   "std": h.std(0).clamp_min(1e-6)}
        gates[layer] = probe.from_tensors(tensors, {"temperature": 4.0})
    vectors = {layer: torch.nn.functional.normalize(torch.randn(adapter.hidden_size, generator=g), dim=0)
               for layer in band}
    return Bundle.create(adapter=adapter, policy={"name": "q", "subject": "testing"}, vectors=vectors,
                         gate=LayerGates(gates, "last+question"), alpha=3.0)


@pytest.mark.parametrize(("gate_layers", "band"), [((0, 1), (2, 3)), ((1, 2), (0,))])
def test_the_steerer_reads_the_features_the_build_captured(tiny, gate_layers, band, tmp_path):
    """In the same pass and through the pre-pass, inside a caller's own forward: p equals the
    gate on captured features, and steering follows it."""
    model, _, adapter = tiny
    bundle = Bundle.load(_question_bundle(adapter, gate_layers, band).save(tmp_path / "b"))
    assert bundle.manifest.gate.features == "last+question"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["gate"]["features"] == "last+question"
    steerer = steerer_for(adapter, bundle)
    images = _images(adapter, len(QUESTIONS))
    expected = steerer.gate_scores(QUESTIONS, images)["q"]
    assert expected.max() - expected.min() > 0.05, "rows must get different gates"
    batch = adapter.build_prompts(QUESTIONS, images)
    with steerer.apply(), torch.no_grad():
        model(**batch.inputs)
        p, _ = steerer._runtime.gate_buffers()[0]
    torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-4)


def test_a_question_gate_needs_input_ids(tiny_llama):
    model, _, adapter = tiny_llama
    steerer = steerer_for(adapter, _question_bundle(adapter, (0,), (1,)))
    batch = adapter.build_prompts(QUESTIONS[:2])
    embeds = model.get_input_embeddings()(batch.inputs["input_ids"])
    with steerer.apply(), torch.no_grad(), pytest.raises(CrvlmError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=batch.inputs["attention_mask"])


def test_old_manifests_read_the_last_token(tiny_llama, tmp_path):
    from conftest import make_bundle

    _, _, adapter = tiny_llama
    path = make_bundle(adapter).save(tmp_path / "b")
    raw = json.loads((path / "manifest.json").read_text())
    del raw["gate"]["features"]
    raw["format_version"] = "1.3"
    (path / "manifest.json").write_text(json.dumps(raw))
    assert Bundle.load(path).gate().features == "last"


@pytest.mark.parametrize("selection", ["validation", "out-of-fold"])
def test_fit_gate_on_question_features(tiny_llama, small_policy, selection):
    _, _, adapter = tiny_llama
    data = Policy.load(small_policy).load_data()
    options = BuildOptions(gate_features="last+question", gate_selection=selection, gate_options={"l2": 0.1})
    fit = fit_gate(adapter, data, options, plugins=get_plugin_manager(), progress=False)
    assert fit.gate.features == "last+question"
    assert all(rows.shape[1] == 2 * adapter.hidden_size for rows in fit.val_rows.values())
    held = [row for row in fit.table if "held_out_caught" in row]
    assert (len(held) == len(fit.table)) == (selection == "out-of-fold")
    p = fit.gate.score(fit.val_rows)
    assert p.shape == (len(data.val_in) + len(data.val_out),) and bool(((p >= 0) & (p <= 1)).all())


def test_unknown_gate_features_are_refused():
    from crvlm_sdk.build.options import check_options

    with pytest.raises(CrvlmError, match="unknown gate features 'mean'"):
        check_options(BuildOptions(gate_features="mean"))
    with pytest.raises(CrvlmError, match="unknown gate selection"):
        check_options(BuildOptions(gate_selection="test"))
