"""Whether taking the question's *shape* out of the gate's features stops it refusing trivia-shaped
in-scope questions (gate only; a study, no default changed).

Run:  python benchmarks/gate_shape.py [--policies personal-finance,pet-care,gardening,cooking,travel,...]

On three text policies the probe gate refuses in-scope test questions that are phrased as
trivia ("What does the 'Y' in APY stand for?") because their training splits ask mostly trivia
out of scope and mostly how-to in scope. ``benchmarks/data/question_shapes.jsonl`` holds 240
pairs of questions on the same topic, one trivia-shaped and one how-to-shaped, over 65 topics
unrelated to any one policy. From them, at each gate layer:

- ``erase mean``: the direction between the two shapes' mean activations is projected out of
  every feature row (train, validation, test) before the probe is fitted, so no probe can use
  it (the class means of the two shapes become equal);
- ``erase 4 pair directions``: the top 4 right singular vectors of the paired differences;
- ``erase mean, out-of-fold``: as ``erase mean`` with ``gate_selection="out-of-fold"`` rules;
- ``pair penalty 0.1``: the probe keeps every feature but pays ``0.1·wᵀ M w`` with ``M`` the
  second moment of the standardised paired differences (a soft version of erasing them).

``build`` is the build's gate rule on the same features (per-layer probe, calibrated to 2%
over-refusal on validation, every layer tied best on validation averaged). Test figures are for
study; a default chosen from them would be tuned on these test sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from gate_study import rates  # benchmarks/ is the script's directory, so on sys.path
from gate_variants import kept_gate, run_table, split_rows

from crvlm_sdk import get_plugin_manager
from crvlm_sdk.activations.capture import capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import fit_gate, out_of_fold_log_odds
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.components import Gate
from crvlm_sdk.types import Sample

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "benchmarks" / "data" / "question_shapes.jsonl"
#: name -> (erased directions: None, "mean" or k pair directions; out-of-fold rules; pair penalty)
VARIANTS: dict[str, tuple[str | int | None, bool, float]] = {
    "build": (None, False, 0.0),
    "erase mean": ("mean", False, 0.0),
    "erase 4 pair directions": (4, False, 0.0),
    "erase mean, out-of-fold": ("mean", True, 0.0),
    "pair penalty 0.1": (None, False, 0.1),
}
_shape_rows: dict[str, torch.Tensor] = {}


def shape_rows(adapter: BackboneAdapter, layers: list[int]) -> dict[str, torch.Tensor]:
    """(layers, pairs, H) activations of the trivia and how-to questions, read once per run."""
    if not _shape_rows:
        pairs = [json.loads(line) for line in SHAPES.read_text().splitlines() if line.strip()]
        for kind in ("fact", "howto"):
            stats = capture(adapter, [Sample(question=p[kind]) for p in pairs], layers, keep=True, progress=False)
            _shape_rows[kind] = torch.stack([stats.rows(layer) for layer in layers])
    return _shape_rows


def directions(fact: torch.Tensor, howto: torch.Tensor, erased: str | int) -> torch.Tensor:
    """Orthonormal (H, k) basis of the shape directions to erase."""
    if erased == "mean":
        u = fact.double().mean(0) - howto.double().mean(0)
        return (u / u.norm())[:, None].float()
    _, _, v = torch.linalg.svd((fact - howto).double(), full_matrices=False)
    return v[: int(erased)].T.float()


def fit_penalised(h_in: torch.Tensor, h_out: torch.Tensor, diffs: torch.Tensor, penalty: float, gate: Gate) -> None:
    """The probe's own objective plus ``penalty·wᵀ M w`` (M: second moment of standardised pair
    differences), written into ``gate``'s tensors."""
    x = torch.cat([h_in, h_out]).double()
    y = torch.cat([torch.zeros(len(h_in)), torch.ones(len(h_out))]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, dz = (x - mean) / std, diffs.double() / std
    m = dz.T @ dz / len(dz)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=torch.tensor(
            len(h_in) / len(h_out), dtype=torch.float64)) + 1e-2 * (w * w).sum() + penalty * (w @ m @ w))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    gate.weight, gate.bias, gate.mean, gate.std = w.detach().float(), b.detach().float(), mean.float(), std.float()


def study(policy_path: Path, adapter: BackboneAdapter, variants: dict[str, Any]) -> dict[str, Any]:
    split = split_rows(policy_path, adapter)
    data, layers, train, val, test = split.data, split.layers, split.train, split.val, split.test
    opts = BuildOptions()
    shapes = shape_rows(adapter, layers)
    n_in, v_in = len(data.train_in), len(data.val_in)
    val_scope, test_scope = split.val_scope, split.test_scope
    probe = get_plugin_manager().get("gate", "probe")
    out: dict[str, Any] = {"policy": split.policy, "n_test_in": int(test_scope.sum()),
                           "n_test_out": int((~test_scope).sum())}

    def fitted(h_in: torch.Tensor, h_out: torch.Tensor) -> Gate:
        gate = probe.untrained(h_in.shape[1])
        torch.manual_seed(0)
        gate.fit(h_in, h_out)
        return gate

    for name, (erased, oof, penalty) in variants.items():
        per_layer: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for i, layer in enumerate(layers):
            rows, vrows, trows = train.rows(layer), val.rows(layer), test.rows(layer)
            if erased is not None:
                basis = directions(shapes["fact"][i], shapes["howto"][i], erased)
                rows, vrows, trows = (r - (r @ basis) @ basis.T for r in (rows, vrows, trows))
            if penalty:
                gate = probe.untrained(rows.shape[1])
                fit_penalised(rows[:n_in], rows[n_in:], shapes["fact"][i] - shapes["howto"][i], penalty, gate)
            else:
                gate = fitted(rows[:n_in], rows[n_in:])
            if oof:
                oof_in, oof_out = out_of_fold_log_odds(fitted, rows[:n_in], rows[n_in:])
                raw = gate.log_odds(vrows)
                threshold = gate.calibrate_log_odds(torch.cat([oof_in, raw[:v_in]]),
                                                    target_over_refusal=opts.target_over_refusal)
                held_in = torch.cat([oof_in - threshold, gate.log_odds(vrows)[:v_in]])
                held_out = torch.cat([oof_out - threshold, gate.log_odds(vrows)[v_in:]])
                margin = float((held_out > 0).float().mean() - (held_in > 0).float().mean())
            else:
                gate.calibrate(vrows[:v_in], target_over_refusal=opts.target_over_refusal)
                caught, flagged = rates(gate.log_odds(vrows), val_scope)
                margin = caught - flagged
            per_layer[layer] = (gate.log_odds(vrows), gate.log_odds(trows), margin)
        best = max(m for _, _, m in per_layer.values())
        kept = [layer for layer in layers if per_layer[layer][2] > best - 1e-9]
        out[name] = kept_gate(kept, per_layer, split)
    if "build" in variants:
        expected = fit_gate(adapter, data, opts, plugins=get_plugin_manager(), progress=False).gate.layers
        if out["build"]["layers"] != expected:
            raise SystemExit(f"{split.policy}: this script's build rule kept {out['build']['layers']}, "
                             f"fit_gate {expected}")
    return out


def main() -> None:
    run_table(__doc__.splitlines()[0], study, VARIANTS,
              "personal-finance,pet-care,gardening,cooking,travel,programming,home-repair",
              ROOT / "benchmarks" / "results" / "gate_shape.json")


if __name__ == "__main__":
    main()
