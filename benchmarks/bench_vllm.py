"""Throughput of vLLM with crvlm's hooks: no bundle, bundles loaded but unused, every request gated.

Run (in the vLLM environment, scripts/setup_vllm.sh):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/bench_vllm.py [--rounds 4]

One vLLM engine (SmolLM2-135M-Instruct in float32, eager, the settings crvlm requires) serves
the same 32 prompts × 64 new tokens (``ignore_eos``) in four ways, in rotating order each
round so drift on this shared machine spreads over all of them: with crvlm's hooks removed,
with four bundles loaded but no request naming one, with every request naming a bundle whose
gate is read in the same pass (gate layer below its band), with every request naming one
whose gate sits above its band (the unsteered gate pre-pass runs on each prompt step), and
with every request naming that bundle with ``steer_prompt = False`` (generated tokens only, so
the gate is read in the one prompt pass: the flag-less bundles' layout without the pre-pass),
and with every request naming one that answers refused rows with a template (no steering, so no
pre-pass either; refused rows' tokens are forced). Each
way's tokens per second is reported as a ratio to the hook-free run of the same round (median
and range over rounds).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
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
    bundles = [make_bundle(adapter, name="a", layers=(6,), gate_layer=22, alpha=8.0, seed=0, decode_steps=8),
               make_bundle(adapter, name="b", layers=(6,), gate_layer=3, alpha=8.0, seed=1),
               make_bundle(adapter, name="c", layers=(6,), gate_layer=22, alpha=8.0, seed=0,
                           decode_steps=8).replaced(steer_prompt=False),
               make_bundle(adapter, name="d", layers=(6,), gate_layer=22, alpha=8.0, seed=0).replaced(
                   response=ResponseSpec(mode="template", message="I'm sorry, but I can only help with testing."))]
    paths = [str(b.save(root / b.name)) for b in bundles]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(adapter, QUESTIONS)]
    del model
    llm = steered_llm(model_dir, paths, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, seed=0)

    def run(names: list[str]) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                extra_args={EXTRA_ARGS_KEY: names})
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    def unloaded() -> float:
        llm.collective_rpc("crvlm_unload")
        return run([])

    def loaded(names: list[str]) -> float:
        llm.collective_rpc("crvlm_load", args=(paths,))
        return run(names)

    ways = {"no bundle (hooks removed)": unloaded, "bundles loaded, unused": lambda: loaded([]),
            "every request gated (gate in the same pass)": lambda: loaded(["b"]),
            "every request gated (gate pre-pass)": lambda: loaded(["a"]),
            "every request gated (gate above the band, generated tokens only)": lambda: loaded(["c"]),
            "every request gated (gate at layer 22, template answer)": lambda: loaded(["d"])}
    run([])  # warm-up
    names = list(ways)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rates[name].append(ways[name]())
    base = rates[names[0]]
    summary = {}
    for name in names:
        ratios = [x / b for x, b in zip(rates[name], base, strict=True)]
        summary[name] = {"tokens_per_s": [round(x, 1) for x in rates[name]],
                         "ratio_median": round(statistics.median(ratios), 3),
                         "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        print(f"{name:66s} {statistics.median(rates[name]):7.1f} tok/s   ratio {summary[name]['ratio_median']:.3f} "
              f"[{summary[name]['ratio_range'][0]:.3f}, {summary[name]['ratio_range'][1]:.3f}]")
    result = {"vllm": vllm.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "requests": len(QUESTIONS), "new_tokens": NEW_TOKENS, "rounds": args.rounds,
              "results": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
