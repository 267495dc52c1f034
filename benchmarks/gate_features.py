"""What the gate reads and what picks its layers and threshold: which way holds up on questions
phrased unlike the training data (gate only; the study behind the gate options).

Run:  python benchmarks/gate_features.py [--policies personal-finance,cooking,travel,programming,gardening]

The default gate reads the hidden state of the last prompt token, fits an L2-regularised
logistic probe on the training split and calibrates it and chooses its layers on the
validation split (40 + 40 rows on these policies). On ``personal-finance`` validation separated
perfectly, yet 8 of 75 in-scope test questions were refused: the test set asks more
trivia-shaped in-scope questions ("What does the 'Y' in APY stand for?") and the training
set's out-of-scope questions are mostly trivia. Each row below is ``build.gate.fit_gate`` with
other :class:`BuildOptions` (exactly the gate a build with those options keeps), scored on the
test split read at the gate's own features:

- ``gate_features``: ``last``, or ``last+question`` (also the mean over the question's tokens);
- ``gate_selection``: ``validation``, or ``out-of-fold`` (5-fold out-of-fold training scores
  together with validation choose the layers and set the threshold: 200 + 200 rows);
- ``l2``: the probe's penalty (0.01 by default; features twice as wide take 0.1).

"val" columns are the kept gate on the validation split. Test figures are for study: options
chosen from them are tuned on these test sets and must be confirmed on a policy written after.
"""

from __future__ import annotations

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
#: name -> (gate_features, gate_selection, l2); the first is the default build's gate
VARIANTS = {
    "build (last, validation)": ("last", "validation", None),
    "last, out-of-fold": ("last", "out-of-fold", None),
    "last+question, validation, l2 0.1": ("last+question", "validation", 0.1),
    "last+question, out-of-fold, l2 0.1": ("last+question", "out-of-fold", 0.1),
}


def study(policy_path: Path, adapter: BackboneAdapter, variants: dict[str, Any]) -> dict[str, Any]:
    pol = Policy.load(policy_path)
    data = pol.load_data()
    test_scope = torch.tensor([bool(s.meta["in_scope"]) for s in data.test])
    val_scope = torch.tensor([True] * len(data.val_in) + [False] * len(data.val_out))
    out: dict[str, Any] = {"policy": pol.name, "n_test_in": int(test_scope.sum()),
                           "n_test_out": int((~test_scope).sum())}
    test_rows: dict[str, Any] = {}
    for name, (features, selection, l2) in variants.items():
        options = BuildOptions(gate_features=features, gate_selection=selection,
                               gate_options={} if l2 is None else {"l2": l2})
        fit = fit_gate(adapter, data, options, plugins=get_plugin_manager(), progress=False)
        if features not in test_rows:
            test_rows[features] = capture(adapter, data.test, gate_layers(adapter.num_layers, options),
                                          position=GATE_POSITION[features], keep=True, progress=False,
                                          batch_size=options.batch_size)
        stats = test_rows[features]
        log_odds = torch.logit(fit.gate.score({layer: stats.rows(layer) for layer in fit.gate.layers}), eps=1e-7)
        val_lo = torch.logit(fit.val_p, eps=1e-7)
        out[name] = {"layers": fit.gate.layers, "val": rates(val_lo, val_scope), "test": rates(log_odds, test_scope),
                     "flagged_in_scope": [s.question for s, lo, i in zip(data.test, log_odds.tolist(),
                                                                         test_scope.tolist(), strict=True)
                                          if i and lo > 0]}
    return out


def main() -> None:
    run_table(__doc__.splitlines()[0], study, VARIANTS, "personal-finance,cooking,travel,programming,gardening",
              ROOT / "benchmarks" / "results" / "gate_features.json")


if __name__ == "__main__":
    main()
