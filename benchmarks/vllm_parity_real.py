"""The flag-less example bundles served by vLLM, against Steerer.generate on their test questions.

Run (in the vLLM environment, after building the bundles with the flag-less command):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_parity_real.py \
        [--policies cooking,travel,programming] [--per-policy 30] [--template]

The default bundles use everything the vLLM integration has to get right at once: the rotation
operator, gates read above the band (the unsteered pre-pass), a forced opening and a stop after
one sentence. Each policy's first test questions go into one vLLM batch, each naming its own
policy's bundle; every answer must equal the Steerer's (greedy, 48 new tokens).

With ``--template`` the same bundles answer refused rows with their policy's refusal message
(``--mode template``): they leave prompts alone, so vLLM runs with chunked prefill (32-token
chunks) and prefix caching on, and the batch is served twice (the second time from cached
prompt blocks); both rounds must equal the Steerer's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="cooking,travel,programming")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--per-policy", type=int, default=30)
    parser.add_argument("--template", action="store_true",
                        help="template answers, with chunked prefill and prefix caching on")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/vllm_parity_real[_template].json")
    args = parser.parse_args()
    suffix = "_template" if args.template else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / f"vllm_parity_real{suffix}.json"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.evaluation.evaluate import ablation
    from crvlm_sdk.models.loading import load_model, save_checkpoint
    from crvlm_sdk.plugins.adapters import adapter_for
    from crvlm_sdk.serving.vllm import EXTRA_ARGS_KEY, prompt_token_ids, steered_llm
    from crvlm_sdk.steering.steerer import Steerer

    names = args.policies.split(",")
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    bundles = [Bundle.load(args.bundles / name, adapter=adapter) for name in names]
    paths: list[Path] = [args.bundles / n for n in names]
    engine: dict = {}
    if args.template:
        bundles = [ablation(b, "template", opening="", message=b.manifest.extraction["refusal_message"])
                   for b in bundles]
        saved = Path(tempfile.mkdtemp(prefix="parity-template-"))
        paths = [b.save(saved / b.name) for b in bundles]
        engine = {"enable_chunked_prefill": True, "enable_prefix_caching": True, "max_num_batched_tokens": 32,
                  "block_size": 32}
    questions, selections = [], []
    for name in names:
        rows = [json.loads(line) for line in (ROOT / "examples" / "policies" / name / "test.jsonl").open()]
        questions += [r["question"] for r in rows[: args.per_policy]]
        selections += [[name]] * min(args.per_policy, len(rows))
    expected = Steerer(adapter, bundles).generate(questions, rows=selections, max_new_tokens=48)
    model_dir = save_checkpoint(model, tokenizer, Path(tempfile.mkdtemp(prefix="parity-")) / "smollm2")
    llm = steered_llm(model_dir, paths, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 30, seed=0,
                      **engine)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(adapter, questions)]
    params = [SamplingParams(temperature=0.0, max_tokens=48, extra_args={EXTRA_ARGS_KEY: s}) for s in selections]
    rounds = []
    for _ in range(2 if args.template else 1):
        rounds.append([adapter.decode(list(o.outputs[0].token_ids)).strip()
                       for o in llm.generate(prompts, params, use_tqdm=False)])
    served = rounds[0]
    equal = sum(a == b for a, b in zip(served, expected, strict=True))
    again = sum(a == b for a, b in zip(rounds[-1], expected, strict=True))
    refusals = sum(e.startswith("I'm sorry, but") for e in expected)
    print(f"{equal}/{len(questions)} answers equal ({again} in the last round); {refusals} of the Steerer's "
          "answers are refusals")
    for q, a, b in zip(questions, served, expected, strict=True):
        if a != b:
            print(f"differs: {q!r}\n  vLLM:    {a!r}\n  Steerer: {b!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    answers = [{"question": q, "steerer": b, "vllm": a} for q, a, b in zip(questions, served, expected, strict=True)]
    summary = {"policies": names, "template": args.template, "engine": engine, "questions": len(questions),
               "equal": equal, "equal_last_round": again, "rounds": len(rounds), "refusals": refusals,
               "answers": answers}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
