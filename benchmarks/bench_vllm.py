"""Throughput of vLLM with crvlm's hooks: no bundle, bundles loaded but unused, every request gated.

Run (in the vLLM environment, scripts/setup_vllm.sh):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/bench_vllm.py [--rounds 8] [--new-tokens 64]

One vLLM engine (SmolLM2-135M-Instruct in float32, eager, the settings crvlm requires) serves
the same 32 prompts × 64 new tokens (``ignore_eos``) in seven ways, in rotating order each
round so drift on this shared machine spreads over all of them:

- with crvlm's hooks removed (the baseline);
- with four bundles loaded but no request naming one;
- every request naming a bundle whose gate is read in the same pass (gate layer below its band);
- every request naming one whose gate sits above its band, the default bundles' layout: the
  unsteered gate pre-pass runs on each prompt step, and the steered pass reuses its layers up
  to the band;
- the same with those layers computed twice (as before that reuse);
- that bundle with ``steer_prompt = False`` (generated tokens only, so the gate is read in the
  one prompt pass);
- one that answers refused rows with a template (no steering, so no pre-pass either; refused
  rows' tokens are forced).

Each way's tokens per second is reported as a ratio to the hook-free run of the same round
(median and range over rounds). A hook-free run that stops after one token gives the share of the time
spent on prompts, and from it the most an exact pre-pass can reach: the gate's layers above the
band must run over each prompt twice, unsteered for the gate and steered for the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest.make_bundle

QUESTIONS = ["What is the capital of France?", "How do I boil an egg?", "Explain photosynthesis briefly.",
             "Write a short poem about the sea.", "What are three tips for learning a language?",
             "How does a bicycle gear work?", "Name five fruits that are red.", "Why is the sky blue?"] * 4
NEW_TOKENS = 64
#: the layout of the default bundles: gate read above a one-layer band, so the gate pre-pass runs
PREPASS_BAND, PREPASS_GATE = 6, 22


def _set_replay(worker: object, on: bool) -> None:
    """Run in the vLLM worker: whether the steered pass reuses the pre-pass's layers below the band."""
    worker._crvlm.replay_shared = on  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="tokens per answer: longer answers shrink the prompts' share of the time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_vllm.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from conftest import make_bundle
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from crvlm_sdk.bundle.manifest import ResponseSpec
    from crvlm_sdk.models.loading import load_model, save_checkpoint
    from crvlm_sdk.plugins.adapters import adapter_for
    from crvlm_sdk.serving.vllm import EXTRA_ARGS_KEY, prompt_token_ids, steered_llm

    root = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model, tokenizer = load_model("smollm2")
    model_dir = save_checkpoint(model, tokenizer, root / "smollm2")
    adapter = adapter_for(model, tokenizer)
    model_layers = adapter.num_layers
    bundles = [make_bundle(adapter, name="a", layers=(PREPASS_BAND,), gate_layer=PREPASS_GATE, alpha=8.0, seed=0,
                           decode_steps=8),
               make_bundle(adapter, name="b", layers=(6,), gate_layer=3, alpha=8.0, seed=1),
               make_bundle(adapter, name="c", layers=(6,), gate_layer=22, alpha=8.0, seed=0,
                           decode_steps=8).replaced(steer_prompt=False),
               make_bundle(adapter, name="d", layers=(6,), gate_layer=22, alpha=8.0, seed=0).replaced(
                   response=ResponseSpec(mode="template", message="I'm sorry, but I can only help with testing."))]
    paths = [str(b.save(root / b.name)) for b in bundles]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(adapter, QUESTIONS)]
    del model
    llm = steered_llm(model_dir, paths, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, seed=0)

    def timed(names: list[str], new_tokens: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                extra_args={EXTRA_ARGS_KEY: names})
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)

    def run(names: list[str]) -> float:
        elapsed, tokens = timed(names, args.new_tokens)
        return tokens / elapsed

    def unloaded() -> float:
        llm.collective_rpc("crvlm_unload")
        return run([])

    def loaded(names: list[str], replay_shared: bool = True) -> float:
        llm.collective_rpc("crvlm_load", args=(paths,))
        llm.collective_rpc(_set_replay, args=(replay_shared,))
        return run(names)

    ways = {"no bundle (hooks removed)": unloaded, "bundles loaded, unused": lambda: loaded([]),
            "every request gated (gate in the same pass)": lambda: loaded(["b"]),
            "every request gated (gate pre-pass)": lambda: loaded(["a"]),
            "every request gated (gate pre-pass, layers below the band computed twice)":
                lambda: loaded(["a"], replay_shared=False),
            "every request gated (gate above the band, generated tokens only)": lambda: loaded(["c"]),
            "every request gated (gate at layer 22, template answer)": lambda: loaded(["d"])}
    run([])  # warm-up
    names = list(ways)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rates[name].append(ways[name]())
    # the share of a hook-free run spent on the prompts (a run that stops after one token)
    llm.collective_rpc("crvlm_unload")
    shares = [timed([], 1)[0] / (args.new_tokens * len(QUESTIONS) / rate) for rate in rates[names[0]]]
    prefill_share = statistics.median(shares)
    base = rates[names[0]]
    summary = {}
    for name in names:
        ratios = [x / b for x, b in zip(rates[name], base, strict=True)]
        summary[name] = {"tokens_per_s": [round(x, 1) for x in rates[name]],
                         "ratio_median": round(statistics.median(ratios), 3),
                         "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        print(f"{name:66s} {statistics.median(rates[name]):7.1f} tok/s   ratio {summary[name]['ratio_median']:.3f} "
              f"[{summary[name]['ratio_range'][0]:.3f}, {summary[name]['ratio_range'][1]:.3f}]")
    # no exact pre-pass can avoid running the gate's layers above the band twice over each prompt
    # (unsteered for the gate, steered for the answer): layers 7..22 of 30 here
    twice = (PREPASS_GATE - PREPASS_BAND) / model_layers
    bound = 1 / (1 + prefill_share * twice)
    print(f"prompt share of a hook-free run: {prefill_share:.3f}; an exact pre-pass can reach at most ≈ {bound:.3f} "
          f"(layers {PREPASS_BAND + 1}..{PREPASS_GATE} of {model_layers} run twice over each prompt)")
    result = {"vllm": vllm.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "requests": len(QUESTIONS), "new_tokens": args.new_tokens, "rounds": args.rounds,
              "prompt_share": round(prefill_share, 3), "prompt_shares": [round(x, 3) for x in shares],
              "prepass_bound": round(bound, 3), "results": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
