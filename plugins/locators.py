"""Built-in layer locators: ``sweep`` (chosen on validation data) and ``fixed`` (given settings).

Strength is expressed relative to the residual stream: ``strength = α·‖v_l‖ / ‖h_l‖`` is the
fraction of the layer's typical residual norm that one layer of steering adds (averaged over
the band). The usable window is narrow (on SmolLM2 roughly 0.6–0.8 for a single layer; more
breaks fluency, less does nothing), so the sweep searches it on validation data instead of
trusting a constant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.interfaces import LayerChoice, LayerLocator

#: (band width, relative strengths to try); wider bands need less per layer.
DEFAULT_GRID: tuple[tuple[int, tuple[float, ...]], ...] = (
    (1, (0.6, 0.75, 0.9)),
    (3, (0.3, 0.4, 0.5)),
)

#: The norm-preserving rotation takes back part of each push, so it needs larger strengths;
#: on SmolLM2 single layers refused from about 1.0 and three-layer bands only broke the text
#: (travel/programming validation, examples/policies/RESULTS.md).
ROTATION_GRID: tuple[tuple[int, tuple[float, ...]], ...] = (
    (1, (0.9, 1.0, 1.1, 1.2)),
)
GRIDS = {"additive": DEFAULT_GRID, "rotation": ROTATION_GRID}


def band_around(centre: int, width: int, num_layers: int) -> list[int]:
    """``width`` consecutive layers centred on ``centre``, shifted (and cut) to fit the model."""
    width = min(width, num_layers)
    start = max(0, min(centre - width // 2, num_layers - width))
    return list(range(start, start + width))


class SweepLocator(LayerLocator):
    """Try bands × strengths on validation data; keep the best MB-score under the BRS ceiling.

    ``evaluate(band, strength) -> {"srs", "brs", "mb", ...}`` is supplied by the build
    pipeline (it runs the gated model on validation questions). Candidates are tried in
    order of prior plausibility (early-middle layers first), so a time budget that cuts the
    sweep short still leaves the likeliest settings tried. Ties go to the earlier candidate.
    There is no budget by default: with one, the choice depends on how busy the machine is,
    and the same command could build different bundles (it did on a loaded 2-core machine).
    """

    name: ClassVar[str] = "sweep"

    @staticmethod
    def candidates(
        num_layers: int,
        *,
        centres: Sequence[int] | None = None,
        grid: Sequence[tuple[int, Sequence[float]]] | None = None,
        operator: str = "additive",
        **options: Any,
    ) -> list[tuple[list[int], float]]:
        """(band, strength) pairs in the order they are tried."""
        if centres is None:
            # Early-middle layers, where refusal directions steer without wrecking fluency.
            fractions = (0.2, 0.3, 0.4)
            centres = list(dict.fromkeys(max(1, round(f * num_layers)) for f in fractions))
        if grid is None:
            grid = GRIDS.get(operator, DEFAULT_GRID)
        candidates: list[tuple[list[int], float]] = []
        for c in centres:
            for width, strengths in grid:
                for strength in strengths:
                    candidate = (band_around(c, width, num_layers), strength)
                    if candidate not in candidates:  # small models: bands collapse onto each other
                        candidates.append(candidate)
        return candidates

    def candidate_layers(self, num_layers: int, **options: Any) -> list[int] | None:
        return sorted({layer for band, _ in self.candidates(num_layers, **options) for layer in band})

    def locate(
        self,
        num_layers: int,
        evaluate: Callable[[list[int], float], dict[str, float]],
        *,
        gate_layer: int,
        brs_ceiling: float = 0.05,
        time_budget: float | None = None,
        **options: Any,
    ) -> LayerChoice:
        """``options``: ``centres``, ``grid`` and ``operator`` as for :meth:`candidates`."""
        candidates = self.candidates(num_layers, **options)
        if not candidates:
            raise CrvlmError("the sweep has no candidates (empty grid or no centres)")
        deadline = math.inf if time_budget is None else time.monotonic() + time_budget
        table: list[dict[str, Any]] = []
        for band, strength in candidates:
            if table and time.monotonic() > deadline:
                table.append({"band": band, "strength": strength, "skipped": "time budget"})
                continue
            started = time.monotonic()
            scores = evaluate(band, strength)
            seconds = round(time.monotonic() - started, 1)
            table.append({"band": band, "strength": strength, **scores, "seconds": seconds})
        tried = [row for row in table if "mb" in row]
        allowed = [row for row in tried if row["brs"] <= brs_ceiling] or tried
        best = max(allowed, key=lambda row: row["mb"])  # max keeps the first of equal scores
        for row in table:
            row["chosen"] = row is best
        return LayerChoice(gate_layer=gate_layer, band=list(best["band"]), alpha=float(best["alpha"]), table=table)


class FixedLocator(LayerLocator):
    """Use the given band and strength (no search): for reproductions and ablations."""

    name: ClassVar[str] = "fixed"

    def candidate_layers(self, num_layers: int, *, band: Sequence[int] | None = None,
                         **options: Any) -> list[int] | None:
        # a band outside the model is reported by ``locate``; extract everywhere until then
        if band is None or any(not 0 <= int(layer) < num_layers for layer in band):
            return None
        return sorted({int(layer) for layer in band})

    def locate(
        self,
        num_layers: int,
        evaluate: Callable[[list[int], float], dict[str, float]],
        *,
        gate_layer: int,
        band: Sequence[int] | None = None,
        strength: float | None = None,
        **options: Any,
    ) -> LayerChoice:
        if band is None or strength is None:
            raise CrvlmError("the fixed locator needs `band` and `strength` (e.g. --band 6 --strength 0.75)")
        band = sorted(int(layer) for layer in band)
        if any(not 0 <= layer < num_layers for layer in band):
            raise CrvlmError(f"band {band} outside 0..{num_layers - 1}")
        scores = evaluate(band, float(strength))
        row = {"band": band, "strength": float(strength), **scores, "chosen": True}
        return LayerChoice(gate_layer=gate_layer, band=band, alpha=float(scores["alpha"]), table=[row])
