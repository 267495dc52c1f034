"""Build stage 3: the gate, fitted and calibrated at every candidate layer, kept where
validation data is separated best."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from crvlm_sdk.activations.capture import GATE_POSITION, capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.components import Gate
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.plugins.manager import PluginManager
from crvlm_sdk.policy import PolicyData


@dataclass
class GateFit:
    #: the gate the bundle keeps: every layer tied best on validation, or the first of them
    gate: LayerGates
    #: the kept gate on validation (out-of-scope caught, in-scope flagged at p > 0.5)
    caught: float
    flagged: float
    #: caught and flagged of each layer's own gate
    table: list[dict[str, Any]]
    #: every fitted layer's calibrated gate (for studies of the choice)
    per_layer: dict[int, Gate]
    #: validation activations at every fitted layer, in-scope rows first
    val_rows: dict[int, torch.Tensor]

    @property
    def val_p(self) -> torch.Tensor:
        """The kept gate's ``p`` on the validation rows (in-scope first)."""
        return self.gate.score(self.val_rows)


def gate_layers(num_layers: int, options: BuildOptions) -> list[int]:
    """Layers the gate is fitted at (the best on validation are kept): the given ones, or
    every layer from a quarter of the depth up."""
    return list(options.gate_layers) if options.gate_layers else list(range(max(1, num_layers // 4), num_layers))


#: folds for out-of-fold gate scores (``BuildOptions.gate_selection = "out-of-fold"``)
FOLDS = 5


def fit_gate(
    adapter: BackboneAdapter,
    data: PolicyData,
    options: BuildOptions,
    *,
    extra_rows: dict[str, dict[int, torch.Tensor]] | None = None,
    plugins: PluginManager,
    progress: bool,
) -> GateFit:
    """Fit and calibrate a gate at every candidate layer; keep the layers that best separate
    held-out data (out-of-scope caught minus in-scope flagged).

    Held-out data is the validation split, or with ``gate_selection="out-of-fold"`` the
    validation split plus out-of-fold scores of the training split (each fold scored by a gate
    fitted without it), which also sets the threshold: on 40 + 40 validation rows the layers tie
    and one odd question moves the threshold. Tied layers are all read and their log-odds
    averaged (:class:`LayerGates`) unless ``gate_ensemble`` is off.
    """
    layers = gate_layers(adapter.num_layers, options)
    common = {"batch_size": options.batch_size, "progress": progress, "keep": True,
              "position": GATE_POSITION[options.gate_features]}
    train = capture(adapter, data.train_in + data.train_out, layers, description="gate features (train)", **common)
    val = capture(adapter, data.val_in + data.val_out, layers, description="gate features (validation)", **common)
    n_in, v_in = len(data.train_in), len(data.val_in)
    gate_cls = plugins.get("gate", options.gate)
    table: list[dict[str, Any]] = []
    gates: dict[int, Gate] = {}
    val_rows = {layer: val.rows(layer) for layer in layers}

    def rates(p: torch.Tensor) -> tuple[float, float]:
        return float((p[v_in:] > 0.5).float().mean()), float((p[:v_in] > 0.5).float().mean())

    def fitted(h_in: torch.Tensor, h_out: torch.Tensor) -> Gate:
        return fit_one_gate(gate_cls, h_in, h_out, options)

    for layer in layers:
        rows, vrows = train.rows(layer), val_rows[layer]
        h_in, h_out = rows[:n_in], rows[n_in:]
        if extra_rows:
            width = extra_rows["gate_in"][layer].shape[1]
            if width != h_in.shape[1]:
                raise CrvlmError(f"the aligner's gate rows have {width} features at layer {layer}; the gate "
                                 f"({options.gate_features!r}) reads {h_in.shape[1]}",
                                 hint="the aligner must read its gate rows at the gate_position it is given")
            h_in = torch.cat([h_in, extra_rows["gate_in"][layer]])
            h_out = torch.cat([h_out, extra_rows["gate_out"][layer]])
        gate = fitted(h_in, h_out)
        held = None
        if options.gate_selection == "out-of-fold":
            oof_in, oof_out = out_of_fold_log_odds(fitted, h_in, h_out)
            val_lo = gate.log_odds(vrows)
            held_in, held_out = torch.cat([oof_in, val_lo[:v_in]]), torch.cat([oof_out, val_lo[v_in:]])
            threshold = gate.calibrate_log_odds(held_in, target_over_refusal=options.target_over_refusal)
            if threshold is not None:
                held = (float((held_out > threshold).float().mean()), float((held_in > threshold).float().mean()))
        if held is None:
            gate.calibrate(vrows[:v_in], target_over_refusal=options.target_over_refusal)
        caught, flagged = rates(gate.score(vrows))
        row = {"layer": layer, "caught": caught, "flagged": flagged}
        if held is not None:
            row["held_out_caught"], row["held_out_flagged"] = held
        table.append(row)
        gates[layer] = gate

    def margin(row: dict[str, Any]) -> float:
        return row.get("held_out_caught", row["caught"]) - row.get("held_out_flagged", row["flagged"])

    best = max(margin(row) for row in table)
    tied = [row["layer"] for row in table if margin(row) > best - 1e-9]
    kept = LayerGates({layer: gates[layer] for layer in (tied if options.gate_ensemble else tied[:1])},
                      options.gate_features)  # type: ignore[arg-type]
    for gate in kept.gates.values():
        gate.soften(options.gate_temperature)
    caught, flagged = rates(kept.score(val_rows))
    for row in table:
        row["kept"] = row["layer"] in kept.gates
    return GateFit(kept, caught, flagged, table, gates, val_rows)


def fit_one_gate(gate_cls: type[Gate], h_in: torch.Tensor, h_out: torch.Tensor, options: BuildOptions) -> Gate:
    """A fresh gate of ``gate_cls`` fitted on one layer's rows as the build fits it (seeded, with
    the build's gate options); uncalibrated."""
    gate = gate_cls.untrained(h_in.shape[1])
    torch.manual_seed(options.seed or 0)
    gate.fit(h_in, h_out, **options.gate_options)
    return gate


def out_of_fold_log_odds(fitted: Callable[[torch.Tensor, torch.Tensor], Gate], h_in: torch.Tensor,
                         h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh log-odds of every row from a gate fitted without its fold (stratified folds, fixed
    permutation), in-scope rows then out-of-scope rows."""
    lo_in, lo_out = torch.empty(len(h_in)), torch.empty(len(h_out))
    perm_in = torch.randperm(len(h_in), generator=torch.Generator().manual_seed(0))
    perm_out = torch.randperm(len(h_out), generator=torch.Generator().manual_seed(1))
    for k in range(FOLDS):
        fold_in, fold_out = perm_in[k::FOLDS], perm_out[k::FOLDS]
        keep_in = torch.ones(len(h_in), dtype=torch.bool)
        keep_out = torch.ones(len(h_out), dtype=torch.bool)
        keep_in[fold_in], keep_out[fold_out] = False, False
        gate = fitted(h_in[keep_in], h_out[keep_out])
        lo_in[fold_in], lo_out[fold_out] = gate.log_odds(h_in[fold_in]), gate.log_odds(h_out[fold_out])
    return lo_in, lo_out
