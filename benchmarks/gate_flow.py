"""The CR-VLM authors' flow-field gate (``--gate flow``) beside the default probe gate, as the
build fits them (gate only, test split).

Run:  python benchmarks/gate_flow.py [--policies cooking,travel,programming,gardening,personal-finance,...]

Each variant is ``build.gate.fit_gate`` with ``BuildOptions(gate=...)``: a gate fitted and
calibrated at every candidate layer on the training split, the layers tied best on validation
kept. "fit s" is the wall time of that call; it includes reading the activations, which is the
same for both gates, so the difference between the rows is the fitting itself. Test figures:
out-of-scope questions caught and in-scope ones flagged at the kept gate's threshold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from gate_study import rates  # benchmarks/ is the script's directory, so on sys.path
from gate_variants import run_table

from crvlm_sdk import get_plugin_manager
from crvlm_sdk.activations.capture import GATE_POSITION, capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import fit_gate, gate_layers
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"probe (build)": "probe", "flow": "flow"}


def study(policy_path: Path, adapter: BackboneAdapter, variants: dict[str, str]) -> dict[str, Any]:
    pol = Policy.load(policy_path)
    data = pol.load_data()
    test_scope = torch.tensor([bool(s.meta["in_scope"]) for s in data.test])
    val_scope = torch.tensor([True] * len(data.val_in) + [False] * len(data.val_out))
    options = BuildOptions()
    stats = capture(adapter, data.test, gate_layers(adapter.num_layers, options), keep=True, progress=False,
                    position=GATE_POSITION[options.gate_features], batch_size=options.batch_size)
    out: dict[str, Any] = {"policy": pol.name, "n_test_in": int(test_scope.sum()),
                           "n_test_out": int((~test_scope).sum())}
    for name, gate in variants.items():
        start = time.perf_counter()
        fit = fit_gate(adapter, data, BuildOptions(gate=gate), plugins=get_plugin_manager(), progress=False)
        seconds = time.perf_counter() - start
        log_odds = torch.logit(fit.gate.score({layer: stats.rows(layer) for layer in fit.gate.layers}), eps=1e-7)
        out[name] = {"layers": fit.gate.layers, "fit_s": seconds,
                     "val": rates(torch.logit(fit.val_p, eps=1e-7), val_scope), "test": rates(log_odds, test_scope),
                     "flagged_in_scope": [s.question for s, lo, i in zip(data.test, log_odds.tolist(),
                                                                         test_scope.tolist(), strict=True)
                                          if i and lo > 0]}
        print(f"{pol.name} {name}: fit {seconds:.1f} s", flush=True)
    return out


def main() -> None:
    run_table(__doc__.splitlines()[0], study, VARIANTS,
              "cooking,travel,programming,gardening,personal-finance,home-repair,pet-care",
              ROOT / "benchmarks" / "results" / "gate_flow.json")


if __name__ == "__main__":
    main()
