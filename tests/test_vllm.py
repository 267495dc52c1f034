"""crvlm inside vLLM (runs where vLLM is installed: the separate vLLM environment of .ci/run).

Several requests in one vLLM batch, each with its own bundles (or none), must get exactly the
tokens :meth:`Steerer.generate` gives the same prompts with the same per-row selection.
"""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (the vLLM environment of .ci/run has it)")

from conftest import make_bundle, needs_smollm2  # noqa: E402

from crvlm_sdk.errors import CrvlmError  # noqa: E402
from crvlm_sdk.serving.vllm import (  # noqa: E402
    EXTRA_ARGS_KEY,
    load_bundles,
    prompt_token_ids,
    requested_bundles,
    steered_llm,
)
from crvlm_sdk.steering.steerer import Steerer  # noqa: E402

pytestmark = [needs_smollm2, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "How do I boil an egg?", "Name a famous painter.",
             "Why is the sea salty?", "What is 2 + 2?"]
SELECTIONS = [["b"], ["a", "b"], [], ["b"], ["a"]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """SmolLM2 in float32 for both engines, two bundles (one gate read in the same pass, one in
    a pre-pass), and one vLLM engine with both loaded."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from crvlm_sdk.models.loading import load_model, save_checkpoint
    from crvlm_sdk.plugins.adapters import adapter_for

    root = tmp_path_factory.mktemp("vllm")
    model, tokenizer = load_model("smollm2")
    model_dir = save_checkpoint(model, tokenizer, root / "smollm2")
    adapter = adapter_for(model, tokenizer)
    a = make_bundle(adapter, name="a", layers=(6,), gate_layer=3, alpha=40.0, seed=0, decode_steps=6)
    b = make_bundle(adapter, name="b", layers=(8,), gate_layer=(20, 25), alpha=100.0, seed=1)
    paths = [a.save(root / "a"), b.save(root / "b")]
    llm = steered_llm(model_dir, paths, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 30, seed=0)
    yield adapter, Steerer(adapter, [a, b]), llm, root
    load_bundles(llm, paths)


def _vllm_texts(adapter, llm, questions, selections, new_tokens=NEW_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(adapter, questions)]
    params = [SamplingParams(temperature=0.0, max_tokens=new_tokens, extra_args={EXTRA_ARGS_KEY: list(sel)})
              for sel in selections]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [adapter.decode(list(o.outputs[0].token_ids)).strip() for o in outputs]


def test_each_request_gets_the_steerers_tokens_in_one_batch(served):
    adapter, steerer, llm, root = served
    expected = steerer.generate(QUESTIONS, rows=SELECTIONS, max_new_tokens=NEW_TOKENS)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=NEW_TOKENS)
    changed = [e != p for e, p in zip(expected, plain, strict=True)]
    # a (gate in the same pass) changes the last answer, b (gate in a pre-pass) the first and fourth
    assert changed == [True, True, False, True, True], "the bundles must change opted-in answers, and only those"
    replayed = llm.collective_rpc("crvlm_replayed")[0]
    assert _vllm_texts(adapter, llm, QUESTIONS, SELECTIONS) == expected
    # b's pre-pass ran, and the steered pass took layers 0..6 (a's gate at 3, a's band at 6) from it
    assert llm.collective_rpc("crvlm_replayed")[0] > replayed
    assert llm.collective_rpc(_wrapped_layers) == [list(range(7))]
    llm.collective_rpc("crvlm_unload")
    assert llm.collective_rpc(_wrapped_layers) == [[]], "unloading must give the layers their own forward back"
    assert _vllm_texts(adapter, llm, QUESTIONS[:2], [[]] * 2) == steerer.generate(QUESTIONS[:2], steer=False,
                                                                                   max_new_tokens=NEW_TOKENS)
    llm.collective_rpc("crvlm_load", args=([str(root / "a"), str(root / "b")],))


def _wrapped_layers(worker) -> list[int]:
    """Run in the vLLM worker: the decoder layers whose forward is replaced on the instance."""
    layers = worker.model_runner.get_model().model.layers
    return [i for i, layer in enumerate(layers) if "forward" in vars(layer)]


def test_unsteered_requests_are_vllms_own_answers(served):
    adapter, steerer, llm, _ = served
    assert _vllm_texts(adapter, llm, QUESTIONS[:3], [[]] * 3) == steerer.generate(QUESTIONS[:3], steer=False,
                                                                                   max_new_tokens=NEW_TOKENS)


def test_refused_requests_get_the_steerers_opening_stop_and_template(served):
    """Response shaping per request through crvlm's logits processor: one batch with a forced
    opening ended after a sentence, template answers, a soft-steered pass and an opted-out row."""
    from crvlm_sdk.bundle.manifest import ResponseSpec

    adapter, _, llm, root = served
    c = make_bundle(adapter, name="c", layers=(6,), gate_layer=3, alpha=40.0, seed=0, decode_steps=6)
    c.manifest.response = ResponseSpec(mode="steer", opening="I'm sorry, but", stop_sentences=1)
    d = make_bundle(adapter, name="d", layers=(8,), gate_layer=(20, 25), alpha=100.0, seed=1)
    d.manifest.response = ResponseSpec(mode="template", message="I can only help with testing.")
    paths = [str(c.save(root / "c")), str(d.save(root / "d"))]
    load_bundles(llm, paths)
    selections = [["d"], ["c", "d"], [], ["c"], ["c", "d"]]
    expected = Steerer(adapter, [c, d]).generate(QUESTIONS, rows=selections, max_new_tokens=NEW_TOKENS)
    assert expected[0] == expected[4] == "I can only help with testing."
    assert expected[3].startswith("I'm sorry, but") and expected[1] != expected[3]
    assert _vllm_texts(adapter, llm, QUESTIONS, selections) == expected


def test_gates_that_read_the_question_find_it_in_vllms_prompt_ids(served):
    from test_gate_features import _question_bundle

    adapter, _, llm, root = served
    q = _question_bundle(adapter, (20, 25), (6,))
    q.manifest.alpha = 60.0
    a = make_bundle(adapter, name="a", layers=(6,), gate_layer=3, alpha=40.0, seed=0, decode_steps=6)
    load_bundles(llm, [q.save(root / "q"), a.save(root / "a-again")])
    selections = [["q"], ["q", "a"], [], ["q"], ["a"]]
    steerer = Steerer(adapter, [q, a])
    expected = steerer.generate(QUESTIONS, rows=selections, max_new_tokens=NEW_TOKENS)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=NEW_TOKENS)
    assert any(e != p for e, p, s in zip(expected, plain, selections, strict=True) if "q" in s), \
        "the question gate must steer some row, or the comparison proves nothing"
    llm.collective_rpc("crvlm_record_gates")
    assert _vllm_texts(adapter, llm, QUESTIONS, selections) == expected
    recorded = llm.collective_rpc("crvlm_record_gates")[0]
    scores = steerer.gate_scores(QUESTIONS)
    for i, ids in enumerate(prompt_token_ids(adapter, QUESTIONS)):
        if not selections[i]:
            continue
        gates = recorded[tuple(ids)]
        for name in selections[i]:  # the gate values themselves, question span included
            assert gates[name] == pytest.approx(float(scores[name][i]), abs=1e-4)


def test_a_bundle_for_other_weights_is_refused_and_what_was_served_stays(served, tmp_path):
    """The fingerprint is checked against the checkpoint vLLM serves (its first layer, read as
    transformers names it); a refused load leaves the loaded bundles in place."""
    from crvlm_sdk.bundle.artifact import Bundle

    adapter, _, llm, root = served
    load_bundles(llm, [root / "a"])
    other = make_bundle(adapter, name="other")
    backbone = other.manifest.backbone
    backbone.first_layer_sha256 = "0" * 64
    backbone.first_layer_sketch = {k: [v * 1.5 for v in vals] for k, vals in backbone.first_layer_sketch.items()}
    with pytest.raises(Exception, match="built for another model"):
        load_bundles(llm, [other.save(tmp_path / "other")])
    expected = Steerer(adapter, [Bundle.load(root / "a")]).generate(QUESTIONS, max_new_tokens=NEW_TOKENS)
    assert _vllm_texts(adapter, llm, QUESTIONS, [["a"]] * len(QUESTIONS)) == expected


def test_a_request_naming_an_unknown_bundle_fails_alone(served):
    adapter, _, llm, root = served
    load_bundles(llm, [root / "a"])
    with pytest.raises(Exception, match="unknown crvlm bundles"):
        _vllm_texts(adapter, llm, QUESTIONS[:1], [["nope"]])
    assert _vllm_texts(adapter, llm, QUESTIONS[:1], [[]]) == Steerer(adapter, [make_bundle(adapter)]).generate(
        QUESTIONS[:1], steer=False, max_new_tokens=NEW_TOKENS), "the engine keeps serving"


def test_requests_name_bundles_as_a_list_of_strings():
    assert requested_bundles(None) == () == requested_bundles({})
    assert requested_bundles({EXTRA_ARGS_KEY: "a"}) == ("a",)
    with pytest.raises(CrvlmError, match="list of bundle names"):
        requested_bundles({EXTRA_ARGS_KEY: [1]})


def test_the_openai_server_steers_each_request_by_its_vllm_xargs(served, tmp_path):
    """`crvlm serve`: vLLM's OpenAI server with the crvlm plugin; concurrent requests, each naming
    its bundles in `vllm_xargs` (or none), get Steerer.generate's text."""
    import json
    import shutil
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from crvlm_sdk.bundle.manifest import ResponseSpec

    adapter, _, _, root = served
    a = make_bundle(adapter, name="a", layers=(6,), gate_layer=3, alpha=40.0, seed=0, decode_steps=6)
    c = make_bundle(adapter, name="c", layers=(8,), gate_layer=(20, 25), alpha=100.0, seed=1)
    c.manifest.response = ResponseSpec(mode="steer", opening="I'm sorry, but", stop_sentences=1)
    paths = [str(a.save(tmp_path / "a")), str(c.save(tmp_path / "c"))]
    selections = [["c"], ["a", "c"], [], ["c"], ["a"]]
    expected = Steerer(adapter, [a, c]).generate(QUESTIONS, rows=selections, max_new_tokens=NEW_TOKENS)
    assert expected[0].startswith("I'm sorry, but"), "the gate must refuse a row, or shaping goes untested"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_dir = str(root / "smollm2")
    crvlm = shutil.which("crvlm")
    assert crvlm, "the crvlm command is installed in this environment"
    log = (tmp_path / "server.log").open("w")
    command = [crvlm, "serve", "--model", model_dir, "--port", str(port)]
    for path in paths:
        command += ["--bundle", path]
    command += ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--seed", "0"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            time.sleep(1)
        prompts = prompt_token_ids(adapter, QUESTIONS)

        def complete(i: int) -> str:
            body = {"model": model_dir, "prompt": prompts[i], "max_tokens": NEW_TOKENS, "temperature": 0,
                    "vllm_xargs": {EXTRA_ARGS_KEY: selections[i]}}
            request = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["choices"][0]["text"].strip()

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            assert list(pool.map(complete, range(len(QUESTIONS)))) == expected
        body = {"model": model_dir, "prompt": prompts[0], "max_tokens": 4, "vllm_xargs": {EXTRA_ARGS_KEY: ["nope"]}}
        bad = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400 and b"unknown crvlm bundles" in refused.value.read()
        assert complete(2) == expected[2], "the server keeps serving"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_preempted_requests_are_gated_again_and_answer_as_the_steerer(served, tmp_path, monkeypatch):
    """A KV cache of four 128-token blocks for prompts that grow past one block: vLLM preempts
    running requests and recomputes them from their prompts; each recomputed prompt reads its
    gate again and the answers stay the Steerer's."""
    from crvlm_sdk.serving import core

    adapter, _, llm, root = served
    del llm
    prompt_runs: dict = {}
    begin = core.SteeringCore.begin_step

    def counting(self, rows, num_tokens):
        for r in rows:
            if r.position == 0 and r.bundles:
                prompt_runs[r.key] = prompt_runs.get(r.key, 0) + 1
        return begin(self, rows, num_tokens)

    monkeypatch.setattr(core.SteeringCore, "begin_step", counting)  # the engine runs in this process
    a = make_bundle(adapter, name="a", layers=(6,), gate_layer=3, alpha=40.0, seed=0, decode_steps=6)
    b = make_bundle(adapter, name="b", layers=(8,), gate_layer=(20, 25), alpha=100.0, seed=1)
    questions, selections = QUESTIONS * 2, SELECTIONS * 2
    expected = Steerer(adapter, [a, b]).generate(questions, rows=selections, max_new_tokens=100)
    small = steered_llm(root / "smollm2", [a.save(tmp_path / "a"), b.save(tmp_path / "b")], dtype="float32",
                        max_model_len=256, kv_cache_memory_bytes=24 << 20, seed=0)
    try:
        served_texts = _vllm_texts(adapter, small, questions, selections, new_tokens=100)
        assert max(prompt_runs.values()) > 1, "no request was preempted: the test proves nothing"
        assert served_texts == expected
    finally:
        del small


def test_bundles_that_leave_prompts_alone_keep_chunked_prefill_and_prefix_caching(served, tmp_path, monkeypatch):
    """A template bundle and one that steers generated tokens only: vLLM runs prompts in
    16-token chunks and, the second time round, from cached prompt blocks; every answer is
    still the Steerer's."""
    from crvlm_sdk.bundle.manifest import ResponseSpec
    from crvlm_sdk.serving import core

    adapter, _, llm, root = served
    del llm
    first_position: dict = {}  # each request's position on its first step (> 0: a cached prefix)
    split: list = []
    begin = core.SteeringCore.begin_step

    def watching(self, rows, num_tokens):
        for r in rows:
            if r.bundles:
                first_position.setdefault(r.key, r.position)
                if r.position < r.prompt_length and (r.position > 0 or r.position + r.count < r.prompt_length):
                    split.append(r.key)
        return begin(self, rows, num_tokens)

    monkeypatch.setattr(core.SteeringCore, "begin_step", watching)  # the engine runs in this process
    e = make_bundle(adapter, name="e", layers=(6,), gate_layer=3, alpha=40.0, seed=0,
                    decode_steps=6).replaced(steer_prompt=False)
    f = make_bundle(adapter, name="f", layers=(8,), gate_layer=(20, 25), alpha=100.0, seed=1).replaced(
        response=ResponseSpec(mode="template", message="I can only help with testing."))
    selections = [["f"], ["e", "f"], [], ["e"], ["f", "e"]]
    steerer = Steerer(adapter, [e, f])
    expected = steerer.generate(QUESTIONS, rows=selections, max_new_tokens=NEW_TOKENS)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=NEW_TOKENS)
    assert sum(x != y for x, y in zip(expected, plain, strict=True)) >= 3 and expected[2] == plain[2]
    assert "I can only help with testing." in expected, "the template bundle must refuse some row"
    chunked = steered_llm(root / "smollm2", [e.save(tmp_path / "e"), f.save(tmp_path / "f")], dtype="float32",
                          max_model_len=512, kv_cache_memory_bytes=1 << 30, seed=0, enable_chunked_prefill=True,
                          enable_prefix_caching=True, max_num_batched_tokens=16, max_num_seqs=8, block_size=32)
    try:
        assert _vllm_texts(adapter, chunked, QUESTIONS, selections) == expected
        assert split, "no prompt was split into chunks: the test proves nothing"
        first_position.clear()
        assert _vllm_texts(adapter, chunked, QUESTIONS, selections) == expected
        assert all(position > 0 for position in first_position.values()), "prompts were not served from the cache"
    finally:
        del chunked


def test_a_tiny_random_llama_with_head_dim_64_matches_too(served, tmp_path):
    """The smallest model vLLM's CPU attention takes (head_dim 64), random weights: steering by
    the same vectors gives the same tokens as the Steerer (gates in the same pass and above the band)."""
    from crvlm_sdk import testing
    from crvlm_sdk.models.loading import load_model
    from crvlm_sdk.plugins.adapters import adapter_for

    _, _, llm, root = served
    del llm  # one engine at a time: the tiny model gets its own
    model_dir = testing.build_tiny_causal_lm(tmp_path / "tiny", root / "smollm2", layers=4, hidden=256)
    model, tokenizer = load_model(model_dir)
    adapter = adapter_for(model, tokenizer)
    a = make_bundle(adapter, name="a", layers=(1, 2), gate_layer=0, alpha=4.0, seed=0, decode_steps=4)
    b = make_bundle(adapter, name="b", layers=(1,), gate_layer=3, alpha=4.0, seed=1)
    selections = [["a"], ["a", "b"], [], ["b"], ["b"]]
    steerer = Steerer(adapter, [a, b])
    expected = steerer.generate(QUESTIONS, rows=selections, max_new_tokens=NEW_TOKENS)
    plain = steerer.generate(QUESTIONS, steer=False, max_new_tokens=NEW_TOKENS)
    assert sum(e != p for e, p in zip(expected, plain, strict=True)) >= 2 and expected[2] == plain[2]
    tiny = steered_llm(model_dir, [a.save(tmp_path / "a"), b.save(tmp_path / "b")], dtype="float32",
                       max_model_len=512, kv_cache_memory_bytes=256 << 20, seed=0)
    try:
        assert _vllm_texts(adapter, tiny, QUESTIONS, selections) == expected
    finally:
        del tiny
