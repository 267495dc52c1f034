"""A bundle's gate: one gate plugin per layer it reads, combined by averaging log-odds.

On a few dozen validation questions several gate layers often separate in-scope from
out-of-scope equally well, and which in-scope question then crosses the threshold at test
time depends on the layer picked among equals. Averaging the calibrated log-odds of the
tied layers cancels much of that layer-to-layer noise without re-fitting anything; a gate
read at one layer is the special case that behaves exactly as that layer's gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from crvlm_sdk.bundle.manifest import GATE_FEATURES, GateFeatures
from crvlm_sdk.components import Gate
from crvlm_sdk.errors import CrvlmError


@dataclass
class LayerGates:
    """Gates keyed by the decoder layer whose activations each one reads (``features``)."""

    gates: dict[int, Gate]
    features: GateFeatures = "last"

    def __post_init__(self) -> None:
        if not self.gates:
            raise CrvlmError("a gate needs at least one layer")
        if self.features not in GATE_FEATURES:
            raise CrvlmError(f"unknown gate features {self.features!r}; use one of {', '.join(GATE_FEATURES)}")
        names = {gate.name for gate in self.gates.values()}
        if len(names) > 1:
            raise CrvlmError(f"the gates of one bundle must be of one type, got {sorted(names)}")
        self.gates = dict(sorted(self.gates.items()))

    @property
    def name(self) -> str:
        return next(iter(self.gates.values())).name

    @property
    def layers(self) -> list[int]:
        return list(self.gates)

    @property
    def last_layer(self) -> int:
        return self.layers[-1]

    def to(self, device: torch.device | str) -> LayerGates:
        return LayerGates({layer: gate.to(device) for layer, gate in self.gates.items()}, self.features)

    def read(self, layer: int, h: torch.Tensor, total: torch.Tensor) -> torch.Tensor | None:
        """Read the gate at ``layer`` on ``(B, H)`` (or ``(B, 2H)``) features taken there, in layer order.

        ``total`` (``(B,)`` float32, updated in place) carries the log-odds summed over the
        layers read so far; at the last layer the result is ``p``, before it None. A gate
        read at one layer returns its own ``score`` exactly.
        """
        gate = self.gates[layer]
        if len(self.gates) == 1:
            # a plugin's NaN counts as 0 (the row is answered, not steered) and values outside
            # [0, 1] are clamped: tensor ops, no host sync in the forward pass
            return torch.nan_to_num(_rows(gate, gate.score(h), h), nan=0.0).clamp(0.0, 1.0)
        log_odds = torch.nan_to_num(_rows(gate, gate.log_odds(h), h), nan=-_LOG_ODDS_BOUND).clamp(
            -_LOG_ODDS_BOUND, _LOG_ODDS_BOUND)
        if layer == self.layers[0]:
            total.copy_(log_odds)
        else:
            total.add_(log_odds)
        return torch.sigmoid(total / len(self.gates)) if layer == self.last_layer else None

    def score(self, rows: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` float32 ``p`` from activations at each gate layer (``{layer: (B, H)}``)."""
        missing = sorted(set(self.gates) - set(rows))
        if missing:
            raise CrvlmError(f"the gate reads layers {self.layers}; activations for {missing} are missing")
        total = torch.zeros(rows[self.layers[0]].shape[0], dtype=torch.float32, device=rows[self.layers[0]].device)
        for layer in self.layers:
            p = self.read(layer, rows[layer], total)
        return p

#: log-odds are clamped to ±this (p within 1e-13 of 0 or 1) so one layer's inf cannot make NaN
_LOG_ODDS_BOUND = 30.0


def _rows(gate: Gate, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``out`` if it is one value per row of ``h`` (shapes only: no host sync), else a one-line error."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (h.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CrvlmError(f"gate plugin {gate.name!r} returned {shape} for {h.shape[0]} rows; a gate returns "
                         f"one value per row, shape ({h.shape[0]},)")
    return out.float()


def describe_layers(layers: Sequence[int]) -> str:
    """``layer 21`` or ``layers 21, 28`` (for logs and reports)."""
    return f"layer {layers[0]}" if len(layers) == 1 else "layers " + ", ".join(str(layer) for layer in layers)
