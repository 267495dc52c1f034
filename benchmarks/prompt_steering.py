"""Steering the prompt or only the generated tokens: what it changes in what users read, and
what it saves.

    python benchmarks/prompt_steering.py                        # the five example policies
    python benchmarks/prompt_steering.py --policies cooking --bundles bundles

A flag-less bundle steers the prompt and its first generated tokens. Its gate sits above the
steered band (layers 21-29 against 6 on the text policies), so each prompt first runs through
an unsteered pre-pass up to the gate, in ``transformers`` and in vLLM alike. With
``steer_prompt = False`` the prompt runs unsteered, the gate is read in that same pass and only
generated tokens are steered; a refused row's first tokens are forced by its opening anyway.

For each policy the flag-less bundle (reused from ``--bundles/<policy>``, built otherwise) is
compared with the same bundle with ``steer_prompt = False``, both with the bundle's response and
with steering alone (no opening, no stop: the paper's setting), on the test split, in one
batched ``generate`` (per-row bundle selection), greedy, 48 new tokens, strict judge. Deltas get
paired bootstrap intervals over the test rows. Then each bundle alone and the unsteered model
answer the same rows in turns (rotated order, ``--rounds``), and the wall times are given as
ratios to the prompt-steered bundle of the same round.

Writes ``benchmarks/results/prompt_steering/<policy>.json`` (every answer) and
``benchmarks/results/prompt_steering.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ablate_components import (  # benchmarks/ is on sys.path
    IMAGE_POLICIES,
    NEW_TOKENS,
    POLICIES,
    _rate,
    built,
    compare_systems,
    rejudged,
)

from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.evaluation.evaluate import ablation
from crvlm_sdk.models.loading import load_model
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy
from crvlm_sdk.steering.steerer import Steerer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "prompt_steering"
LABELS = {
    "bundle": "prompt + 8 generated tokens (as built)",
    "generated-only": "generated tokens only",
    "steer:bundle": "steering alone: prompt + 8 generated tokens",
    "steer:generated-only": "steering alone: generated tokens only",
    "none": "unsteered",
}


def systems_of(full: Bundle) -> dict[str, Bundle]:
    alone = ablation(full, "steer-only", opening="", message="")
    return {
        "bundle": full,
        "generated-only": full.replaced(name="generated-only", steer_prompt=False),
        "steer:bundle": alone.replaced(name="steer-bundle"),
        "steer:generated-only": alone.replaced(name="steer-generated-only", steer_prompt=False),
    }


def timings(backbone: Any, bundles: dict[str, Bundle], rows: list[Any], images: list[Any] | None,
            rounds: int) -> dict[str, Any]:
    """Wall time of each bundle alone (and of the unsteered model) on the same rows, one batch,
    as ratios to the prompt-steered bundle of the same round."""
    steerers = {key: Steerer(backbone, [b]) for key, b in bundles.items()}
    keys = [*bundles, "none"]
    questions = [s.question for s in rows]
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            steerer = steerers.get(key, steerers["bundle"])
            started = time.perf_counter()
            steerer.generate(questions, images, steer=key != "none", max_new_tokens=NEW_TOKENS)
            seconds[key].append(time.perf_counter() - started)
    ratios = {k: [seconds[k][i] / seconds["bundle"][i] for i in range(rounds)] for k in keys}
    return {"rows": len(rows), "rounds": rounds, "seconds": seconds,
            "time_ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
            "time_ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()}}


def run_policy(name: str, bundles: Path, model_dir: Path, batch_size: int, rounds: int) -> dict[str, Any]:
    image = name in IMAGE_POLICIES
    net, processor = load_model(model_dir if image else "smollm2")
    backbone = adapter_for(net, processor)
    pol = Policy.load(ROOT / "examples" / "policies" / name / "policy.yaml")
    data = pol.load_data()
    full = built(bundles / name, net, processor, backbone, pol, BuildOptions())
    variants = systems_of(full)
    rows = list(data.test)
    settings = {"policy": name, "max_new_tokens": NEW_TOKENS, "response": full.manifest.response.model_dump(),
                "layers": full.manifest.layers, "gate_layers": full.manifest.gate.layers,
                "decode_steps": full.manifest.decode_steps}
    report = compare_systems(backbone, rows, image, variants, batch_size, settings)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    timed = [s for s in rows if s.meta["in_scope"]][:32] + [s for s in rows if not s.meta["in_scope"]][:32]
    report["timing"] = timings(backbone, {k: variants[k] for k in ("bundle", "generated-only")}, timed,
                               [s.image for s in timed] if image else None, rounds)
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _metrics(report: dict[str, Any], key: str) -> dict[str, Any]:
    return report["bundle"] if key == "bundle" else report["baselines"][key]


def table(reports: list[dict[str, Any]]) -> str:
    lines = ["| policy | system | clean SRS ↑ | Δ clean SRS | BRS ↓ | accuracy | in-scope changed | degraded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        name = report["settings"]["policy"]
        for key, label in LABELS.items():
            m = _metrics(report, key)
            d = report["deltas"].get(key)
            delta = "" if d is None else f"{d['srs']:+.3f} [{d['srs_ci'][0]:+.2f}, {d['srs_ci'][1]:+.2f}]"
            lines.append(f"| {name} | {label} | {_rate(m, 'srs')} | {delta} | {_rate(m, 'brs')} | "
                         f"{m['answer_accuracy']:.3f} | {m.get('in_changed', 0)}/{m['n_in']} | "
                         f"{m.get('in_degraded', 0)}/{m['n_in']} |")
    lines += ["", "| policy | rows × rounds | time, generated tokens only / as built | unsteered / as built |",
              "| --- | --- | --- | --- |"]
    for report in reports:
        t = report["timing"]
        med, rng = t["time_ratio_median"], t["time_ratio_range"]
        lines.append(f"| {report['settings']['policy']} | {t['rows']} × {t['rounds']} | "
                     f"{med['generated-only']:.3f} [{rng['generated-only'][0]:.3f}, {rng['generated-only'][1]:.3f}] | "
                     f"{med['none']:.3f} [{rng['none'][0]:.3f}, {rng['none'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--model", type=Path, default=ROOT / "demo-vlm", help="the demo VLM, for image policies")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table from the JSON files (their answers judged again)")
    args = parser.parse_args()
    names = args.policies.split(",")
    if args.table_only:
        reports = [rejudged(OUT / f"{n}.json") for n in names]
    else:
        reports = [run_policy(n, args.bundles, args.model, args.batch_size, args.rounds) for n in names]
    text = ("# Steering the prompt or only generated tokens (test split, strict judge)\n\n"
            "    python benchmarks/prompt_steering.py\n\n" + table(reports))
    (ROOT / "benchmarks" / "results" / "prompt_steering.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
