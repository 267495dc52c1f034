"""Refusal rate of a built no-stars bundle on fresh star pictures, over strengths and decode steps.

    python examples/policies/strength_grid.py --model demo-vlm --bundle bundles/no-stars \
        1.0:8 1.1:8 1.1:4 1.0:16

Each ``STRENGTH:STEPS`` re-scales the bundle's α to that strength (relative to the strength it
was built with) and steers the prompt plus ``STEPS`` generated tokens (-1: every token). The
pictures are drawn from ``--seed`` (default 777; the policy's own splits use 4200), so the
choice does not touch the test split and is not limited to the 24 + 24 validation rows the
sweep scored each candidate on before session 6. This is how no-stars' strength (1.0) was
chosen in session 5 (examples/policies/RESULTS.md); the bundle's response settings apply.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from star_pictures import write_star_pictures

from crvlm_sdk import Sample, Steerer, load_model
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.evaluation.evaluate import System, run_systems
from crvlm_sdk.plugins.manager import get_plugin_manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="demo VLM directory (crvlm demo-model --out DIR)")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--n", type=int, default=80, help="star pictures to draw")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--judge", default="strict", help="strict (clean refusals) or keyword")
    parser.add_argument("grid", nargs="+", help="STRENGTH:STEPS pairs")
    args = parser.parse_args()
    model, processor = load_model(args.model)
    bundle = Bundle.load(args.bundle)
    built_strength = bundle.manifest.extraction["strength"]
    judge = get_plugin_manager().get("judge", args.judge)()
    with tempfile.TemporaryDirectory() as tmp:
        samples = [Sample(r["question"], r["image"]) for r in write_star_pictures(tmp, args.n, seed=args.seed)]
        for item in args.grid:
            strength, steps = float(item.split(":")[0]), int(item.split(":")[1])
            variant = bundle.replaced(decode_steps=None if steps < 0 else steps)
            steerer = Steerer.from_bundle(model, variant, processor)
            started = time.monotonic()
            answers = run_systems(steerer, samples, [System("bundle", bundle.name)], max_new_tokens=args.max_new_tokens,
                                  alpha_scale=strength / built_strength)["bundle"]
            refused = judge.judge(answers.texts, ended=answers.ended)
            print(f"strength {strength:.2f}, steps {steps}: refused {sum(refused)}/{len(refused)} "
                  f"({sum(refused) / len(refused):.3f}) in {time.monotonic() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
