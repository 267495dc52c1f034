"""Does the build's held-out check predict over-refusal on the test split? (gate only)

    python benchmarks/gate_held_out.py [--policies cooking,travel,...]

For each text policy, ``build.gate.fit_gate`` with the build's defaults: the kept gate's
decisions on the validation split (what the build chooses on), on the training examples held
out of its fit (5 folds; each fold's gate fitted on the other four at every kept layer and
calibrated on validation as the kept one is, log-odds averaged over the layers), and on the
test split. Had the held-out rate tracked the test rate where validation does not, the build
could have told a policy author that a policy will over-refuse before anyone evaluates it. It
does not (examples/policies/RESULTS.md, session 11), so the build does not compute it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk import get_plugin_manager
from crvlm_sdk.activations.capture import GATE_POSITION, capture
from crvlm_sdk.build.gate import fit_gate, fit_one_gate, out_of_fold_log_odds
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.evaluation.metrics import wilson
from crvlm_sdk.models.loading import load_model
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
TEXT_POLICIES = "cooking,travel,programming,gardening,personal-finance,home-repair,pet-care"


def study(name: str, adapter: Any) -> dict[str, Any]:
    pol = Policy.load(ROOT / "examples" / "policies" / name / "policy.yaml")
    data = pol.load_data()
    options = BuildOptions()
    fit = fit_gate(adapter, data, options, plugins=get_plugin_manager(), progress=False)
    stats = capture(adapter, data.test, fit.gate.layers, keep=True, progress=False,
                    position=GATE_POSITION[options.gate_features], batch_size=options.batch_size)
    p = fit.gate.score({layer: stats.rows(layer) for layer in fit.gate.layers})
    scope = torch.tensor([bool(s.meta["in_scope"]) for s in data.test])
    v_in = len(data.val_in)
    held_in, held_out = held_out_log_odds(adapter, data, fit.gate.layers, fit.val_rows, options)
    flagged = torch.nonzero(held_in > 0).flatten().tolist()
    val_p = fit.val_p
    return {
        "policy": name, "layers": fit.gate.layers,
        "held_out_flagged": [len(flagged), len(held_in)],
        "held_out_missed": [int((held_out <= 0).sum()), len(held_out)],
        "val_flagged": [int((val_p[:v_in] > 0.5).sum()), v_in],
        "val_missed": [int((val_p[v_in:] <= 0.5).sum()), len(val_p) - v_in],
        "test_flagged": [int((p[scope] > 0.5).sum()), int(scope.sum())],
        "test_missed": [int((p[~scope] <= 0.5).sum()), int((~scope).sum())],
        "held_out_flagged_questions": [data.train_in[i].question for i in flagged],
        "test_flagged_questions": [s.question for s, x, i in zip(data.test, p.tolist(), scope.tolist(), strict=True)
                                   if i and x > 0.5],
    }


def held_out_log_odds(adapter: Any, data: Any, layers: list[int], val_rows: dict[int, torch.Tensor],
                      options: BuildOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold log-odds of the training split's in-scope and out-of-scope rows under a gate
    at ``layers`` fitted and calibrated as ``fit_gate`` fits and calibrates each layer's."""
    train = capture(adapter, data.train_in + data.train_out, layers, keep=True, progress=False,
                    position=GATE_POSITION[options.gate_features], batch_size=options.batch_size)
    n_in, v_in = len(data.train_in), len(data.val_in)
    gate_cls = get_plugin_manager().get("gate", options.gate)
    lo_in, lo_out = torch.zeros(n_in), torch.zeros(len(data.train_out))
    for layer in layers:
        def fit(h_in: torch.Tensor, h_out: torch.Tensor, layer: int = layer) -> Any:
            gate = fit_one_gate(gate_cls, h_in, h_out, options)
            gate.calibrate(val_rows[layer][:v_in], target_over_refusal=options.target_over_refusal)
            return gate

        rows = train.rows(layer)
        fold_in, fold_out = out_of_fold_log_odds(fit, rows[:n_in], rows[n_in:])
        lo_in += fold_in
        lo_out += fold_out
    return lo_in, lo_out


def _cell(pair: list[int]) -> str:
    k, n = pair
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.3f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=TEXT_POLICIES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_held_out.json")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    results = []
    lines = ["| policy | in-scope refused: validation | held out of the fit | test | "
             "out-of-scope answered: validation | held out | test |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.policies.split(","):
        r = study(name, adapter)
        results.append(r)
        lines.append(f"| {name} | {_cell(r['val_flagged'])} | {_cell(r['held_out_flagged'])} | "
                     f"{_cell(r['test_flagged'])} | {_cell(r['val_missed'])} | {_cell(r['held_out_missed'])} | "
                     f"{_cell(r['test_missed'])} |")
        print(lines[-1], flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
