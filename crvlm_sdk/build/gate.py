"""Build stage 3: the gate, fitted and calibrated at every candidate layer, kept where
validation data is separated best."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crvlm_sdk.activations.capture import capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.components import Gate
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
    validation data (out-of-scope caught minus in-scope flagged).

    Validation sets of a few dozen questions often tie several layers; which in-scope test
    questions a gate flags then depends on the arbitrary pick among them, so by default the
    gate reads all tied layers and averages their log-odds (:class:`LayerGates`).
    """
    layers = gate_layers(adapter.num_layers, options)
    common = {"batch_size": options.batch_size, "progress": progress, "keep": True}
    train = capture(adapter, data.train_in + data.train_out, layers, description="gate features (train)", **common)
    val = capture(adapter, data.val_in + data.val_out, layers, description="gate features (validation)", **common)
    n_in, v_in = len(data.train_in), len(data.val_in)
    gate_cls = plugins.get("gate", options.gate)
    table: list[dict[str, Any]] = []
    gates: dict[int, Gate] = {}
    val_rows = {layer: val.rows(layer) for layer in layers}

    def rates(p: torch.Tensor) -> tuple[float, float]:
        return float((p[v_in:] > 0.5).float().mean()), float((p[:v_in] > 0.5).float().mean())

    for layer in layers:
        rows, vrows = train.rows(layer), val_rows[layer]
        h_in, h_out = rows[:n_in], rows[n_in:]
        if extra_rows:
            h_in = torch.cat([h_in, extra_rows["gate_in"][layer]])
            h_out = torch.cat([h_out, extra_rows["gate_out"][layer]])
        gate = gate_cls.untrained(adapter.hidden_size)
        torch.manual_seed(options.seed or 0)
        gate.fit(h_in, h_out)
        gate.calibrate(vrows[:v_in], target_over_refusal=options.target_over_refusal)
        caught, flagged = rates(gate.score(vrows))
        table.append({"layer": layer, "caught": caught, "flagged": flagged})
        gates[layer] = gate
    best = max(row["caught"] - row["flagged"] for row in table)
    tied = [row["layer"] for row in table if row["caught"] - row["flagged"] > best - 1e-9]
    kept = LayerGates({layer: gates[layer] for layer in (tied if options.gate_ensemble else tied[:1])})
    for gate in kept.gates.values():
        gate.soften(options.gate_temperature)
    caught, flagged = rates(kept.score(val_rows))
    for row in table:
        row["kept"] = row["layer"] in kept.gates
    return GateFit(kept, caught, flagged, table, gates, val_rows)
