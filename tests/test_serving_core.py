"""The engine-independent steering core against the Steerer, on synthetic flat layouts.

``FlatEngine`` plays a serving engine on a transformers model: every forward of ``generate``
over a left-padded batch is described to the core as one flat batch (row ``b·S + s`` is token
``s`` of request ``b``; a decoding step has one row per request), and each decoder layer's
output goes through :meth:`SteeringCore.layer_output` as ``(tokens, H)``. Whatever the Steerer
does per row, the core must do per request, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import make_bundle
from test_gate_features import _question_bundle
from transformers import LogitsProcessor, LogitsProcessorList

from crvlm_sdk.activations.hooks import HookSpec, hooks_installed, layer_hidden, with_hidden
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.serving.core import RequestResponses, Rows, SteeringCore
from crvlm_sdk.steering.response import RowPlan, end_of_sequence_id, sentence_end_ids
from crvlm_sdk.steering.steerer import Steerer

QUESTIONS = ["What is the capital of France?", "How do I bake bread?", "Name a colour.",
             "Why is the sky blue on a clear day?"]
_CACHE = ("past_key_values", "cache", "cache_position", "use_cache")


class FlatEngine:
    """Drive a :class:`SteeringCore` from ``model.generate`` as a serving engine would."""

    def __init__(self, adapter: Any, core: SteeringCore, responses: RequestResponses | None = None) -> None:
        self.adapter, self.core, self.responses = adapter, core, responses
        self.prepasses = 0

    def generate(self, questions: Sequence[str], selections: Sequence[Sequence[str]], max_new_tokens: int) -> list[str]:
        adapter, core = self.adapter, self.core
        batch = adapter.build_prompts(questions)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        width = ids.shape[1]
        pads = (mask == 0).sum(1).tolist()
        lengths = [width - pad for pad in pads]
        calls = [0]
        in_prepass = [False]

        def pre_forward(module, args, kwargs):
            if in_prepass[0]:
                return
            x = kwargs.get("input_ids", args[0] if args else None)
            rows_, seq = x.shape
            if calls[0] == 0:
                layout = [Rows(i, i * seq + pads[i], lengths[i], 0, lengths[i], tuple(selections[i]), ids[i, pads[i]:])
                          for i in range(rows_)]
            else:
                layout = [Rows(i, i, 1, lengths[i] + calls[0] - 1, lengths[i]) for i in range(rows_)]
            calls[0] += 1
            if core.begin_step(layout, rows_ * seq):
                self.prepasses += 1
                in_prepass[0] = True
                try:
                    with core.prepass(), torch.no_grad():
                        module(*args, **{k: v for k, v in kwargs.items() if k not in _CACHE}, use_cache=False)
                finally:
                    in_prepass[0] = False

        def layer_hook(layer: int):
            def hook(module, args, output):
                h = layer_hidden(output)
                return with_hidden(output, core.layer_output(layer, h.reshape(-1, h.shape[-1])).view_as(h))
            return hook

        layers = adapter.decoder_layers()
        specs = [HookSpec(adapter.model, pre_forward, kind="pre", with_kwargs=True)]
        specs += [HookSpec(layers[layer], layer_hook(layer)) for layer in core.layers]
        processors = LogitsProcessorList([_Forcing(self.responses, width)] if self.responses else [])
        with hooks_installed(specs), torch.inference_mode():
            out = adapter.model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=adapter.pad_token_id, logits_processor=processors)
        for i in range(len(questions)):
            core.finish(i)
            if self.responses:
                self.responses.finish(i)
        return [adapter.decode(row).strip() for row in out[:, width:].tolist()]


class _Forcing(LogitsProcessor):
    def __init__(self, responses: RequestResponses, width: int) -> None:
        self.responses, self.width = responses, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i in range(input_ids.shape[0]):
            token = self.responses.next_token(i, input_ids[i, self.width:].tolist())
            if token is not None:
                scores[i] = float("-inf")
                scores[i, token] = 0.0
        return scores


def _same_as_steerer(adapter, bundles, selections, *, new_tokens=8, responses=False) -> FlatEngine:
    steerer = Steerer(adapter, bundles)
    expected = steerer.generate(QUESTIONS, rows=selections, max_new_tokens=new_tokens)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=new_tokens)
    assert any(e != p for e, p in zip(expected, plain, strict=True)), "steering must change something here"
    core = SteeringCore(bundles, question_opener=adapter.question_opener(),
                        skip_ids=frozenset(adapter.image_token_ids()))
    shaping = None
    if responses:
        eos = end_of_sequence_id(adapter.model, adapter, None)
        plans = [RowPlan.of(b.manifest.response, adapter, eos) for b in bundles]
        vocab = adapter.model.get_output_embeddings().weight.shape[0]
        shaping = RequestResponses(core, plans, sentence_end_ids(adapter, vocab), eos)
    engine = FlatEngine(adapter, core, shaping)
    assert engine.generate(QUESTIONS, selections, new_tokens) == expected
    assert core.active == 0
    return engine


def test_gates_read_in_the_same_pass_per_request_selection_and_step_limits(tiny_llama):
    _, _, adapter = tiny_llama
    a = make_bundle(adapter, name="a", layers=(1, 2), gate_layer=0, alpha=8.0, seed=0)
    b = make_bundle(adapter, name="b", layers=(2,), gate_layer=0, alpha=8.0, seed=1, decode_steps=2)
    engine = _same_as_steerer(adapter, [a, b], [["a"], ["a", "b"], [], ["b"]])
    assert engine.prepasses == 0
    assert engine.core.prepass_shared == -1  # no pre-pass, so no layer to share with it


def test_gates_above_the_band_are_read_in_a_prepass_rotation_included(tiny_llama):
    _, _, adapter = tiny_llama
    last = adapter.num_layers - 1
    a = make_bundle(adapter, name="a", layers=(0, 1), gate_layer=(last - 1, last), alpha=12.0, operator="rotation")
    b = make_bundle(adapter, name="b", layers=(1,), gate_layer=0, alpha=8.0, seed=2, decode_steps=3)
    engine = _same_as_steerer(adapter, [a, b], [["a", "b"], ["a"], ["b"], []])
    assert engine.prepasses == 1  # the prompt step only
    assert engine.core.prepass_shared == 0  # the lowest band layer: its raw output is the same in both passes


def test_bundles_that_leave_the_prompt_alone_need_no_prepass(tiny_llama):
    _, _, adapter = tiny_llama
    last = adapter.num_layers - 1
    a = make_bundle(adapter, name="a", layers=(0, 1), gate_layer=last, alpha=12.0, operator="rotation",
                    decode_steps=3).replaced(steer_prompt=False)
    b = make_bundle(adapter, name="b", layers=(1,), gate_layer=0, alpha=8.0, seed=2).replaced(steer_prompt=False)
    engine = _same_as_steerer(adapter, [a, b], [["a", "b"], ["a"], ["b"], []])
    assert engine.prepasses == 0


def test_the_prepass_runs_only_for_requests_whose_own_bundles_steer_their_prompt_below_the_gate(tiny_llama):
    """Each request attends to its own tokens only, so a template bundle's gate above another
    loaded bundle's band needs the pre-pass only for requests that asked for both."""
    _, _, adapter = tiny_llama
    last = adapter.num_layers - 1
    s = make_bundle(adapter, name="s", layers=(1,), gate_layer=0, alpha=8.0, seed=2)
    t = make_bundle(adapter, name="t", layers=(1,), gate_layer=last, seed=5).replaced(
        response=ResponseSpec(mode="template", message="No.", threshold=0.3))
    assert Steerer(adapter, [t]).gate_scores(QUESTIONS)["t"].ge(0.3).any(), "some row must be refused"
    alone = _same_as_steerer(adapter, [s, t], [["t"], ["s"], [], ["t"]], responses=True)
    assert alone.prepasses == 0
    both = _same_as_steerer(adapter, [s, t], [["t"], ["s", "t"], [], ["t"]], responses=True)
    assert both.prepasses == 1


def test_question_features_are_read_from_the_prompt_ids(tiny_llama):
    _, _, adapter = tiny_llama
    bundle = _question_bundle(adapter, (0, 1), (2, 3))
    _same_as_steerer(adapter, [bundle], [["q"]] * 4)


def test_forced_openings_template_answers_and_stops_match_the_steerer(tiny_llama):
    _, _, adapter = tiny_llama
    a = make_bundle(adapter, name="a", layers=(1,), gate_layer=0, alpha=4.0, seed=3)
    a.manifest.response = ResponseSpec(mode="steer", opening="Sorry.", stop_sentences=1)
    b = make_bundle(adapter, name="b", layers=(2,), gate_layer=0, alpha=4.0, seed=4)
    b.manifest.response = ResponseSpec(mode="template", message="No.")
    steerer = Steerer(adapter, [a, b])
    scores = steerer.gate_scores(QUESTIONS)
    assert (scores["a"] >= 0.5).any() and (scores["a"] < 0.5).any(), "some rows refused, some not"
    engine = _same_as_steerer(adapter, [a, b], [["a"], ["a", "b"], ["b"], ["a", "b"]], new_tokens=12,
                              responses=True)
    assert engine.responses is not None


def test_a_prompt_split_across_steps_is_refused(tiny_llama):
    _, _, adapter = tiny_llama
    core = SteeringCore([make_bundle(adapter, name="a")])
    with pytest.raises(CrvlmError, match="split across steps"):
        core.begin_step([Rows("r", 0, 4, 0, 10, ("a",))], 4)
    with pytest.raises(CrvlmError, match="split across steps"):
        core.begin_step([Rows("s", 0, 6, 4, 10, ("a",))], 6)
    core.begin_step([Rows("t", 0, 4, 0, 10, ())], 4)  # a request that asked for nothing is left alone


def test_requests_are_checked_and_their_slots_reused(tiny_llama):
    _, _, adapter = tiny_llama
    core = SteeringCore([make_bundle(adapter, name="a")], capacity=2)
    with pytest.raises(CrvlmError, match="unknown bundles"):
        core.begin_step([Rows("x", 0, 3, 0, 3, ("zzz",))], 3)
    with pytest.raises(CrvlmError, match="outside"):
        core.begin_step([Rows("y", 2, 3, 0, 3, ("a",))], 3)
    core.finish("y")
    core.begin_step([Rows(1, 0, 3, 0, 3, ("a",)), Rows(2, 3, 3, 0, 3, ("a",))], 6)
    with pytest.raises(CrvlmError, match="more than 2"):
        core.begin_step([Rows(3, 0, 3, 0, 3, ("a",))], 3)
    core.finish(1)
    core.begin_step([Rows(3, 0, 3, 0, 3, ("a",))], 3)
    assert core.active == 2


def _engine_config(**changes):
    from types import SimpleNamespace

    settings = {"enforce_eager": True, "chunked": False, "prefix": False, "tp": 1, "pp": 1, "spec": None} | changes
    return SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=settings["enforce_eager"]),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=settings["chunked"]),
        cache_config=SimpleNamespace(enable_prefix_caching=settings["prefix"]),
        parallel_config=SimpleNamespace(tensor_parallel_size=settings["tp"], pipeline_parallel_size=settings["pp"]),
        speculative_config=settings["spec"])


@pytest.mark.parametrize(("change", "message"), [
    ({"enforce_eager": False}, "enforce_eager"),
    ({"chunked": True}, "chunked prefill"),
    ({"prefix": True}, "prefix caching"),
    ({"tp": 2}, "tensor and pipeline"),
    ({"pp": 2}, "tensor and pipeline"),
    ({"spec": object()}, "speculative decoding"),
])
def test_vllm_settings_that_would_steer_wrongly_are_refused(tiny_llama, change, message):
    """Checked without vLLM: the engine settings crvlm's vLLM worker refuses at load for a bundle
    that steers the prompt (as the flag-less ones do)."""
    from crvlm_sdk.serving.vllm import check_engine_config

    bundles = [make_bundle(tiny_llama[2], name="on")]
    check_engine_config(_engine_config(), bundles)
    with pytest.raises(CrvlmError, match=message):
        check_engine_config(_engine_config(**change), bundles)


def test_chunked_prefill_and_prefix_caching_stay_on_for_bundles_that_leave_prompts_alone(tiny_llama):
    from crvlm_sdk.serving.vllm import check_engine_config

    _, _, adapter = tiny_llama
    both = {"chunked": True, "prefix": True}
    off = make_bundle(adapter, name="off").replaced(steer_prompt=False)
    template = make_bundle(adapter, name="tpl").replaced(response=ResponseSpec(mode="template", message="No."))
    check_engine_config(_engine_config(**both), [off, template])
    for change in ({"chunked": True}, {"prefix": True}):
        with pytest.raises(CrvlmError, match=r"bundle\(s\) \['on'\] steer the prompt"):
            check_engine_config(_engine_config(**change), [off, make_bundle(adapter, name="on")])
    question = _question_bundle(adapter, (0, 1), (2, 3)).replaced(steer_prompt=False)
    with pytest.raises(CrvlmError, match=r"\['q'\] steer the prompt or read the question"):
        check_engine_config(_engine_config(**both), [question])


def test_prompts_in_chunks_or_after_a_cached_prefix_match_the_steerer(tiny_llama):
    """A request whose bundles steer generated tokens only may arrive in pieces: each chunk runs
    unsteered and the gate is read on the step that holds the last prompt token."""
    _, _, adapter = tiny_llama
    last = adapter.num_layers - 1
    a = make_bundle(adapter, name="a", layers=(1,), gate_layer=last, alpha=12.0, decode_steps=3,
                    operator="rotation").replaced(steer_prompt=False)
    steerer = Steerer(adapter, [a])
    question = QUESTIONS[3]
    expected = steerer.generate([question], max_new_tokens=6)
    assert expected != steerer.generate([question], steer=False, max_new_tokens=6)
    batch = adapter.build_prompts([question])
    ids = batch.inputs["input_ids"][0]
    n = ids.shape[0]
    core = SteeringCore([a])
    eos = end_of_sequence_id(adapter.model, adapter, None)
    plan = RowPlan.of(ResponseSpec(mode="template", message="No.", threshold=0.01), adapter, eos)
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    responses = RequestResponses(core, [plan], sentence_end_ids(adapter, vocab), eos)
    layers = adapter.decoder_layers()

    def layer_hook(layer: int):
        def hook(module, args, output):
            h = layer_hidden(output)
            return with_hidden(output, core.layer_output(layer, h.reshape(-1, h.shape[-1])).view_as(h))
        return hook

    # the prompt in two chunks through a KV cache, then greedy decoding one token per step
    from transformers import DynamicCache

    cache = DynamicCache()
    generated: list[int] = []
    split = n // 2
    steps = [(0, ids[:split]), (split, ids[split:])]
    with hooks_installed([HookSpec(layers[layer], layer_hook(layer)) for layer in core.layers]), \
            torch.inference_mode():
        while len(generated) < 6:
            if not steps:
                steps = [(n + len(generated) - 1, torch.tensor([generated[-1]]))]
            position, chunk = steps.pop(0)
            assert not core.begin_step([Rows("r", 0, chunk.shape[0], position, n, ("a",))], chunk.shape[0])
            out = adapter.model(input_ids=chunk.view(1, -1), past_key_values=cache, use_cache=True)
            # an engine samples (and drops) a token after each chunk: no response is decided before the gate
            assert core.gated("r") == (position + chunk.shape[0] >= n)
            if not core.gated("r"):
                assert responses.next_token("r", []) is None
            if position + chunk.shape[0] >= n:
                generated.append(int(out.logits[0, -1].argmax()))
    core.finish("r")
    assert adapter.decode(generated).strip() == expected[0]


def test_crvlm_serve_starts_vllm_with_the_settings_steering_needs(tiny_llama, tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from crvlm_sdk.cli.app import app

    _, _, adapter = tiny_llama
    make_bundle(adapter, name="a").save(tmp_path / "a")
    runner = CliRunner()
    dry = runner.invoke(app, ["serve", "--model", "m", "--bundle", str(tmp_path / "a"), "--dry-run",
                              "--max-model-len", "512"])
    assert dry.exit_code == 0, dry.output
    for flag in ("--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
                 "--logits-processors crvlm_sdk.serving.vllm:CrvlmLogitsProcessor", "--max-model-len 512",
                 f"CRVLM_BUNDLES={tmp_path / 'a'}"):
        assert flag in dry.stdout
    make_bundle(adapter, name="b").replaced(steer_prompt=False).save(tmp_path / "b")
    keeps = runner.invoke(app, ["serve", "--model", "m", "--bundle", str(tmp_path / "b"), "--dry-run"])
    assert keeps.exit_code == 0 and "--enforce-eager" in keeps.stdout
    assert "chunked" not in keeps.stdout and "prefix" not in keeps.stdout  # vLLM's defaults stay
    assert runner.invoke(app, ["serve", "--model", "m", "--bundle", str(tmp_path / "nope")]).exit_code == 3
    twice = runner.invoke(app, ["serve", "--model", "m", "--bundle", str(tmp_path / "a"), "--bundle",
                                str(tmp_path / "a"), "--dry-run"])
    assert twice.exit_code == 1 and "share a policy name" in twice.stderr
    if importlib.util.find_spec("vllm") is None:
        missing = runner.invoke(app, ["serve", "--model", "m", "--bundle", str(tmp_path / "a")])
        assert missing.exit_code == 1 and "vLLM is not installed" in missing.stderr


def test_save_model_writes_a_checkpoint_that_loads_with_the_same_weights(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from crvlm_sdk.cli.app import app
    from crvlm_sdk.models.loading import load_model

    model, _, adapter = tiny_llama
    runner = CliRunner()
    done = runner.invoke(app, ["save-model", "--model", str(adapter.model.name_or_path), "--out", str(tmp_path / "c")])
    assert done.exit_code == 0, done.output
    again, _ = load_model(tmp_path / "c")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert runner.invoke(app, ["save-model", "--model", str(adapter.model.name_or_path), "--out",
                               str(tmp_path / "c")]).exit_code == 1  # exists: --overwrite needed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["save-model", "--model", str(adapter.model.name_or_path), "--out",
                                  str(tmp_path / "mine"), "--overwrite"])
    assert refused.exit_code == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
