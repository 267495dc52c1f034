"""Where the probe gate over-refuses on test, and whether another way of choosing it would not.

Run:  python benchmarks/gate_study.py [--policies cooking,travel,programming,gardening]

For each text policy on SmolLM2-135M-Instruct this fits the build's probe gate (same data
split, same calibration to 2% over-refusal on validation) at every candidate gate layer and
prints, per way of choosing the gate, the rates on validation (what a build can see) and on the
test split (what a user gets):

- ``first-best``: the first layer with the largest caught − flagged on validation (what the
  build kept before it read the gate at several layers; ``gate_ensemble=False``);
- ``best-margin``: among the layers with the largest caught − flagged, the one whose validation
  classes are furthest apart (lowest validation log-loss of the uncalibrated probe);
- ``ensemble``: the mean of the calibrated logits of every layer with the largest caught −
  flagged, thresholded at 0 (the build's default gate, as ``fit_gate`` returns it);
- ``oracle``: the layer best on *test* (not choosable; an upper bound for per-layer choice).

Only the gate runs (no generation), so a policy takes well under a minute. The output feeds the
gate discussion in examples/policies/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk import get_plugin_manager, load_model
from crvlm_sdk.activations.capture import capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import fit_gate, gate_layers
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[1]


def rates(logits: torch.Tensor, in_scope: torch.Tensor) -> tuple[float, float]:
    """(caught: out-of-scope rows above 0, flagged: in-scope rows above 0)."""
    above = logits > 0
    return float(above[~in_scope].float().mean()), float(above[in_scope].float().mean())


def study(policy_path: Path, adapter: BackboneAdapter) -> dict[str, Any]:
    pol = Policy.load(policy_path)
    data = pol.load_data()
    opts = BuildOptions()
    layers = gate_layers(adapter.num_layers, opts)
    fit = fit_gate(adapter, data, opts, plugins=get_plugin_manager(), progress=False)
    test_rows = capture(adapter, data.test, layers, keep=True, progress=False, batch_size=opts.batch_size)
    val_in = torch.tensor([True] * len(data.val_in) + [False] * len(data.val_out))
    test_in = torch.tensor([bool(s.meta["in_scope"]) for s in data.test])
    per_layer = {}
    for layer, gate in fit.per_layer.items():
        raw_val = gate.logits(fit.val_rows[layer])
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(raw_val, (~val_in).float()))
        val_logits = raw_val - gate.threshold
        test_logits = gate.logits(test_rows.rows(layer)) - gate.threshold
        per_layer[layer] = {"val": rates(val_logits, val_in), "test": rates(test_logits, test_in), "loss": loss,
                            "val_logits": val_logits, "test_logits": test_logits}
    top = fit.gate.layers
    first = top[0]
    margin = min(top, key=lambda layer: per_layer[layer]["loss"])
    oracle = max(layers, key=lambda layer: per_layer[layer]["test"][0] - per_layer[layer]["test"][1])
    ens_val = torch.stack([per_layer[layer]["val_logits"] for layer in top]).mean(0)
    ens_test = torch.stack([per_layer[layer]["test_logits"] for layer in top]).mean(0)
    flagged_questions = {
        name: [s.question for s, v, i in zip(data.test, logits, test_in.tolist(), strict=True) if i and v > 0]
        for name, logits in (("first-best", per_layer[first]["test_logits"]),
                             ("best-margin", per_layer[margin]["test_logits"]), ("ensemble", ens_test))
    }
    return {
        "policy": pol.name, "tied_layers": top,
        "choices": {
            "first-best": {"layer": first, "val": per_layer[first]["val"], "test": per_layer[first]["test"]},
            "best-margin": {"layer": margin, "val": per_layer[margin]["val"], "test": per_layer[margin]["test"]},
            "ensemble": {"layers": top, "val": rates(ens_val, val_in), "test": rates(ens_test, test_in)},
            "oracle": {"layer": oracle, "val": per_layer[oracle]["val"], "test": per_layer[oracle]["test"]},
        },
        "per_layer": {layer: {"val": r["val"], "test": r["test"], "loss": round(r["loss"], 4)}
                      for layer, r in per_layer.items()},
        "test_in_scope_flagged": flagged_questions,
        "n_test_in": int(test_in.sum()), "n_test_out": int((~test_in).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="cooking,travel,programming,gardening")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_study.json")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    results = []
    lines = ["| policy | choice | layer(s) | val caught | val flagged | test caught | test flagged |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.policies.split(","):
        r = study(ROOT / "examples" / "policies" / name / "policy.yaml", adapter)
        results.append(r)
        for choice, c in r["choices"].items():
            where = c.get("layer", c.get("layers"))
            lines.append(f"| {name} | {choice} | {where} | {c['val'][0]:.3f} | {c['val'][1]:.3f} | "
                         f"{c['test'][0]:.3f} | {c['test'][1]:.3f} |")
        print("\n".join(lines[-4:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
