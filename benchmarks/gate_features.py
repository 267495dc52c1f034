"""Which features and which fitting make the probe gate hold up on questions phrased unlike its
training data (a study for the next default gate, not a default).

Run:  python benchmarks/gate_features.py [--policies personal-finance,cooking,travel,programming,gardening]

The build's gate reads the hidden state of the last prompt token, fits an L2-regularised
logistic probe on the training split and calibrates it on the validation split (40 + 40 rows on
these policies). On ``personal-finance`` validation separated perfectly, yet 8 of 75 in-scope
test questions were refused: the test set asks more trivia-shaped in-scope questions ("What does
the 'Y' in APY stand for?"), and the training set's out-of-scope questions are mostly trivia.
This script compares, on the same SmolLM2-135M-Instruct activations:

- features: ``last`` (the build's), ``mean`` (the mean hidden state over the prompt tokens after
  the header every prompt of the policy shares: the question and the assistant header), and
  ``last+mean`` (both, concatenated);
- fitting: ``train`` (fit on training, calibrate and choose layers on validation, as the build)
  or ``cross-fit`` (fit on training + validation; the threshold (2% target, normal quantile) and
  the layers tied best come from 5-fold out-of-fold logits of all 400 rows, then one refit).

Gate layers are those the build considers; tied layers are averaged in log-odds as in the build.
The "val" columns are what a build could choose by: validation for ``train``, out-of-fold
training + validation for ``cross-fit``. Test figures are for study: a default picked from them
is tuned on these test sets and must be confirmed on a policy written afterwards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from gate_study import rates  # benchmarks/ is the script's directory, so on sys.path

from crvlm_plugins.gates import ProbeGate, normal_threshold
from crvlm_sdk import get_plugin_manager, load_model
from crvlm_sdk.activations.capture import capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import fit_gate, gate_layers
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
FOLDS = 5
#: name -> (features, fitting, l2); the first is the build's gate
VARIANTS = {
    "build": ("last", "train", 1e-2),
    "last, cross-fit": ("last", "cross-fit", 1e-1),
    "mean, cross-fit": ("mean", "cross-fit", 1e-1),
    "last+mean, train": ("last+mean", "train", 1e-1),
    "last+mean, cross-fit": ("last+mean", "cross-fit", 1e-1),
}
Split = dict[str, torch.Tensor]


@torch.no_grad()
def prompt_means(adapter: BackboneAdapter, questions: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Per layer, ``(N, H)`` mean hidden states over each prompt's tokens after the shared header."""
    ids = [adapter.tokenizer(adapter.render_prompt(q, has_image=False, system=None),
                             add_special_tokens=False)["input_ids"] for q in questions]
    shared = 0
    while all(len(row) > shared + 1 and row[shared] == ids[0][shared] for row in ids):
        shared += 1
    means: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for row in ids:
        hidden = adapter.model(torch.tensor([row]), output_hidden_states=True).hidden_states
        for layer in layers:
            means[layer].append(hidden[layer + 1][0, shared:].float().mean(0))
    return {layer: torch.stack(rows) for layer, rows in means.items()}


def fit_probe(h_in: torch.Tensor, h_out: torch.Tensor, l2: float) -> ProbeGate:
    gate = ProbeGate.untrained(h_in.shape[1])
    torch.manual_seed(0)
    gate.fit(h_in, h_out, l2=l2)
    return gate


def out_of_fold(h_in: torch.Tensor, h_out: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits of every row from a probe fitted without its fold (stratified, fixed seed)."""
    logits_in, logits_out = torch.empty(len(h_in)), torch.empty(len(h_out))
    perm_in = torch.randperm(len(h_in), generator=torch.Generator().manual_seed(0))
    perm_out = torch.randperm(len(h_out), generator=torch.Generator().manual_seed(1))
    for k in range(FOLDS):
        fold_in, fold_out = perm_in[k::FOLDS], perm_out[k::FOLDS]
        keep_in = torch.ones(len(h_in), dtype=torch.bool)
        keep_out = torch.ones(len(h_out), dtype=torch.bool)
        keep_in[fold_in], keep_out[fold_out] = False, False
        gate = fit_probe(h_in[keep_in], h_out[keep_out], l2)
        logits_in[fold_in], logits_out[fold_out] = gate.logits(h_in[fold_in]), gate.logits(h_out[fold_out])
    return logits_in, logits_out


def score_variant(split: dict[str, Split], layers: list[int], fitting: str, l2: float, target: float,
                  ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layers kept, held-out logits the choice was made on, their in-scope mask, test logits)."""
    held: dict[int, torch.Tensor] = {}
    test: dict[int, torch.Tensor] = {}
    for layer in layers:
        tr_in, tr_out = split["train_in"][layer], split["train_out"][layer]
        va_in, va_out = split["val_in"][layer], split["val_out"][layer]
        if fitting == "train":
            gate = fit_probe(tr_in, tr_out, l2)
            threshold = normal_threshold(gate.logits(va_in), target)
            held[layer] = torch.cat([gate.logits(va_in), gate.logits(va_out)]) - threshold
        else:
            all_in, all_out = torch.cat([tr_in, va_in]), torch.cat([tr_out, va_out])
            oof_in, oof_out = out_of_fold(all_in, all_out, l2)
            threshold = normal_threshold(oof_in, target)
            held[layer] = torch.cat([oof_in, oof_out]) - threshold
            gate = fit_probe(all_in, all_out, l2)
        test[layer] = gate.logits(split["test"][layer]) - threshold
    n_in = len(split["val_in"][layers[0]]) + (len(split["train_in"][layers[0]]) if fitting != "train" else 0)
    scope = torch.arange(len(held[layers[0]])) < n_in
    margin = {layer: (lambda c, f: c - f)(*rates(held[layer], scope)) for layer in layers}
    kept = [layer for layer in layers if margin[layer] > max(margin.values()) - 1e-9]
    held_kept = torch.stack([held[layer] for layer in kept]).mean(0)
    return kept, held_kept, scope, torch.stack([test[layer] for layer in kept]).mean(0)


def study(policy_path: Path, adapter: BackboneAdapter) -> dict[str, Any]:
    pol = Policy.load(policy_path)
    data = pol.load_data()
    opts = BuildOptions()
    layers = gate_layers(adapter.num_layers, opts)
    parts = {"train_in": data.train_in, "train_out": data.train_out, "val_in": data.val_in,
             "val_out": data.val_out, "test": data.test}
    features: dict[str, dict[str, Split]] = {"last": {}, "mean": {}, "last+mean": {}}
    for part, samples in parts.items():
        last = capture(adapter, samples, layers, keep=True, progress=False, batch_size=opts.batch_size)
        mean = prompt_means(adapter, [s.question for s in samples], layers)
        features["last"][part] = {layer: last.rows(layer) for layer in layers}
        features["mean"][part] = mean
        features["last+mean"][part] = {layer: torch.cat([last.rows(layer), mean[layer]], 1) for layer in layers}
    test_scope = torch.tensor([bool(s.meta["in_scope"]) for s in data.test])
    out: dict[str, Any] = {"policy": pol.name, "n_test_in": int(test_scope.sum()),
                           "n_test_out": int((~test_scope).sum())}
    for name, (kind, fitting, l2) in VARIANTS.items():
        kept, held, held_scope, test = score_variant(features[kind], layers, fitting, l2, opts.target_over_refusal)
        out[name] = {"layers": kept, "val": rates(held, held_scope), "test": rates(test, test_scope),
                     "flagged_in_scope": [s.question for s, lo, i in zip(data.test, test.tolist(),
                                                                         test_scope.tolist(), strict=True)
                                          if i and lo > 0]}
    expected = fit_gate(adapter, data, opts, plugins=get_plugin_manager(), progress=False).gate.layers
    if out["build"]["layers"] != expected:
        raise SystemExit(f"{pol.name}: this script's build rule kept {out['build']['layers']}, fit_gate {expected}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="personal-finance,cooking,travel,programming,gardening")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_features.json")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    results: list[dict[str, Any]] = []
    lines = ["| policy | gate | layers | val caught | val flagged | test caught | test flagged (of in-scope) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.policies.split(","):
        r = study(ROOT / "examples" / "policies" / name / "policy.yaml", adapter)
        results.append(r)
        for variant in VARIANTS:
            v = r[variant]
            shown = v["layers"] if len(v["layers"]) < 8 else f"{len(v['layers'])} layers"
            flagged = round(v["test"][1] * r["n_test_in"])
            lines.append(f"| {name} | {variant} | {shown} | {v['val'][0]:.3f} | {v['val'][1]:.3f} | "
                         f"{v['test'][0]:.3f} | {v['test'][1]:.3f} ({flagged}/{r['n_test_in']}) |")
        print("\n".join(lines[-len(VARIANTS):]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after each policy: a long run keeps what it has
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
