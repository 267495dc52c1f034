"""How other ways of fitting the probe gate would do on the text policies (a lead, not a default).

Run:  python benchmarks/gate_variants.py [--policies cooking,travel,programming,gardening,personal-finance]

The build's gate (``build.gate.fit_gate``) fits an L2-regularised logistic probe per layer on
the training split, calibrates each to 2% over-refusal on the validation split, and reads every
layer tied best on validation (log-odds averaged). On a policy written after that default was
frozen (``personal-finance``) it flagged 1 in 10 in-scope test questions although validation
separated perfectly. This script fits variants on the same cached activations and prints, per
policy, what validation shows (what a build could choose by) and what the test split gets:

- ``build``: the build's rule (checked against ``fit_gate``'s own layers);
- ``l2=0.1`` / ``l2=1``: stronger regularisation, same layer rule;
- ``all-layers``: every candidate layer averaged, no choice on validation;
- ``target=1%``: calibrated to 1% over-refusal instead of 2%.

Only the gate runs (no generation). Test figures are reported for study; a default chosen from
them would be tuned on test, so any change must be confirmed on a policy written afterwards.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gate_study import rates  # benchmarks/ is the script's directory, so on sys.path

from crvlm_sdk import get_plugin_manager, load_model
from crvlm_sdk.activations.capture import ActivationStats, capture
from crvlm_sdk.build.gate import fit_gate, gate_layers
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy, PolicyData

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"build": (1e-2, 0.02, "tied"), "l2=0.1": (1e-1, 0.02, "tied"), "l2=1": (1.0, 0.02, "tied"),
            "all-layers": (1e-2, 0.02, "all"), "target=1%": (1e-2, 0.01, "tied")}


@dataclass
class SplitRows:
    """A policy's gate features (last prompt token) on its three splits, at every gate layer."""

    policy: str
    data: PolicyData
    layers: list[int]
    train: ActivationStats  # in-scope rows first
    val: ActivationStats  # in-scope rows first
    test: ActivationStats
    val_scope: torch.Tensor
    test_scope: torch.Tensor


def split_rows(policy_path: Path, adapter: Any) -> SplitRows:
    pol = Policy.load(policy_path)
    data = pol.load_data()
    opts = BuildOptions()
    layers = gate_layers(adapter.num_layers, opts)
    common = {"keep": True, "progress": False, "batch_size": opts.batch_size}
    return SplitRows(pol.name, data, layers, capture(adapter, data.train_in + data.train_out, layers, **common),
                     capture(adapter, data.val_in + data.val_out, layers, **common),
                     capture(adapter, data.test, layers, **common),
                     torch.tensor([True] * len(data.val_in) + [False] * len(data.val_out)),
                     torch.tensor([bool(s.meta["in_scope"]) for s in data.test]))


def kept_gate(kept: list[int], per_layer: dict[int, tuple[torch.Tensor, ...]], split: SplitRows) -> dict[str, Any]:
    """The mean log-odds of the kept layers ((validation, test, ...) per layer): rates on both
    splits and the in-scope test questions it flags."""
    val_lo = torch.stack([per_layer[layer][0] for layer in kept]).mean(0)
    test_lo = torch.stack([per_layer[layer][1] for layer in kept]).mean(0)
    return {"layers": kept, "val": rates(val_lo, split.val_scope), "test": rates(test_lo, split.test_scope),
            "flagged_in_scope": [s.question for s, lo, i in zip(split.data.test, test_lo.tolist(),
                                                                split.test_scope.tolist(), strict=True)
                                 if i and lo > 0]}


def study(policy_path: Path, adapter: Any, variants: dict[str, Any]) -> dict[str, Any]:
    split = split_rows(policy_path, adapter)
    pol, data, layers, train, val, test = split.policy, split.data, split.layers, split.train, split.val, split.test
    n_in, v_in = len(data.train_in), len(data.val_in)
    val_scope, test_scope = split.val_scope, split.test_scope
    opts = BuildOptions()
    probe = get_plugin_manager().get("gate", "probe")
    out: dict[str, Any] = {"policy": pol, "n_test_in": int(test_scope.sum()),
                           "n_test_out": int((~test_scope).sum())}
    fitted: dict[tuple[float, float], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, (l2, target, rule) in variants.items():
        per_layer = fitted.setdefault((l2, target), {})
        for layer in layers:
            if layer in per_layer:
                continue
            rows = train.rows(layer)
            gate = probe.untrained(adapter.hidden_size)
            torch.manual_seed(0)
            gate.fit(rows[:n_in], rows[n_in:], l2=l2)
            gate.calibrate(val.rows(layer)[:v_in], target_over_refusal=target)
            per_layer[layer] = (gate.log_odds(val.rows(layer)), gate.log_odds(test.rows(layer)))
        margin = {layer: (lambda c, f: c - f)(*rates(per_layer[layer][0], val_scope)) for layer in layers}
        kept = layers if rule == "all" else [layer for layer in layers if margin[layer] > max(margin.values()) - 1e-9]
        out[name] = kept_gate(kept, per_layer, split)
    expected = fit_gate(adapter, data, opts, plugins=get_plugin_manager(), progress=False).gate.layers
    if out["build"]["layers"] != expected:
        raise SystemExit(f"{pol}: this script's build rule kept {out['build']['layers']}, fit_gate {expected}")
    return out


def run_table(description: str, study_fn: Any, variants: Any, default_policies: str, default_out: Path) -> None:
    """The command line both gate scripts share: study each policy, print and save a table of
    every variant's validation and test rates (rewritten after each policy, so a long run keeps
    what it has)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--policies", default=default_policies)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--variants", default="", help="variant names separated by semicolons (default: all)")
    args = parser.parse_args()
    wanted = args.variants.split(";") if args.variants else list(variants)
    unknown = sorted(set(wanted) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(variants)}")
    variants = {name: variants[name] for name in wanted}
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    results, lines = [], ["| policy | variant | layers | val caught | val flagged | test caught | test flagged |",
                          "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.policies.split(","):
        r = study_fn(ROOT / "examples" / "policies" / name / "policy.yaml", adapter, variants)
        results.append(r)
        for variant in variants:
            v = r[variant]
            shown = v["layers"] if len(v["layers"]) < 8 else f"{len(v['layers'])} layers"
            flagged = round(v["test"][1] * r["n_test_in"])
            lines.append(f"| {name} | {variant} | {shown} | {v['val'][0]:.3f} | {v['val'][1]:.3f} | "
                         f"{v['test'][0]:.3f} | {v['test'][1]:.3f} ({flagged}/{r['n_test_in']}) |")
        print("\n".join(lines[-len(variants):]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    run_table(__doc__.splitlines()[0], study, VARIANTS, "cooking,travel,programming,gardening,personal-finance",
              ROOT / "benchmarks" / "results" / "gate_variants.json")


if __name__ == "__main__":
    main()
