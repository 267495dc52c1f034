"""Built-in layer locators: ``sweep`` (chosen on validation data) and ``fixed`` (given settings).

Strength is expressed relative to the residual stream: ``strength = α·‖v_l‖ / ‖h_l‖`` is the
fraction of the layer's typical residual norm that one layer of steering adds (averaged over
the band). The usable window is narrow (more breaks fluency, less does nothing), so the sweep
searches it on validation data instead of trusting a constant; the measurements behind the
grids are in ``examples/policies/RESULTS.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from crvlm_sdk.components import CandidateEvaluator, LayerLocator
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.types import Candidate, LayerChoice

#: (band width, relative strengths to try) per operator; wider bands need less per layer.
DEFAULT_GRID: tuple[tuple[int, tuple[float, ...]], ...] = (
    (1, (0.6, 0.75, 0.9)),
    (3, (0.3, 0.4, 0.5)),
)

#: The norm-preserving rotation takes back part of each push, so it needs larger strengths
#: (and single layers: wider rotated bands broke the text in every measurement so far).
ROTATION_GRID: tuple[tuple[int, tuple[float, ...]], ...] = (
    (1, (0.8, 0.9, 1.0, 1.1, 1.2)),
)
GRIDS = {"additive": DEFAULT_GRID, "rotation": ROTATION_GRID}

#: The default steering grid when the operator is left to the sweep:
#: (operator, depth fraction of the layer, band width, strengths).
AUTO_GRID: tuple[tuple[str, float, int, tuple[float, ...]], ...] = (
    ("rotation", 0.2, 1, (0.8, 0.9, 1.0, 1.1, 1.2)),
    ("rotation", 0.3, 1, (0.9, 1.0, 1.1)),
    ("additive", 0.2, 1, (0.6, 0.75, 0.9)),
)
#: steered generated tokens tried around the default (8) once the steering is chosen
DECODE_STEPS = (6, 12)
#: response fields the sweep may vary unless the user fixed them
RESPONSE_FIELDS = ("stop_sentences", "opening", "mode")


def band_around(centre: int, width: int, num_layers: int) -> list[int]:
    """``width`` consecutive layers centred on ``centre``, shifted (and cut) to fit the model."""
    width = min(width, num_layers)
    start = max(0, min(centre - width // 2, num_layers - width))
    return list(range(start, start + width))


def _centre(fraction: float, num_layers: int) -> int:
    return min(num_layers - 1, max(1, round(fraction * num_layers)))


def rank_key(row: dict[str, Any]) -> tuple:
    """Most clean refusals first; then least over-refusal; then the model's own words over a
    template; then the earlier candidate (simpler settings come first)."""
    return (row["srs"], -row["brs"], row.get("response", {}).get("mode") != "template", -row["order"])


class SweepLocator(LayerLocator):
    """Try steering settings and response settings on validation data; keep the one with the
    most clean refusals under the over-refusal ceiling.

    Stages, each evaluated as one batch of candidates (``evaluate.many``):

    1. steering: operator × layer × strength (``AUTO_GRID``, or the operator's grid at the
       early-middle layers when the operator is given), plus no steering at all when the
       response forces an opening (so steering must earn its place);
    2. steered tokens around the default, for the best steering;
    3. response: one more sentence, no forced opening, the template answer — each only if
       the user left that setting to the sweep.

    Ties go to the earlier candidate. There is no time budget by default: with one, the
    choice would depend on how busy the machine is.
    """

    name: ClassVar[str] = "sweep"

    @staticmethod
    def steering_candidates(
        num_layers: int,
        *,
        operator: str | None = None,
        centres: Sequence[int] | None = None,
        grid: Sequence[tuple[int, Sequence[float]]] | None = None,
        **options: Any,
    ) -> list[tuple[str, list[int], float]]:
        """(operator, band, strength) triples of stage 1, in the order they are tried."""
        triples: list[tuple[str, list[int], float]] = []
        if operator is None and centres is None and grid is None:
            for op, fraction, width, strengths in AUTO_GRID:
                band = band_around(_centre(fraction, num_layers), width, num_layers)
                triples += [(op, band, s) for s in strengths]
        else:
            op = operator or "rotation"
            centres = centres if centres is not None else list(dict.fromkeys(
                _centre(f, num_layers) for f in (0.2, 0.3)))
            for c in centres:
                for width, strengths in (grid if grid is not None else GRIDS.get(op, DEFAULT_GRID)):
                    triples += [(op, band_around(c, width, num_layers), s) for s in strengths]
        unique: list[tuple[str, list[int], float]] = []
        for triple in triples:
            if triple not in unique:  # small models: bands collapse onto each other
                unique.append(triple)
        return unique

    def candidate_layers(self, num_layers: int, **options: Any) -> list[int] | None:
        return sorted({layer for _, band, _ in self.steering_candidates(num_layers, **options) for layer in band})

    def locate(
        self,
        num_layers: int,
        evaluate: CandidateEvaluator,
        *,
        gate_layer: int,
        brs_ceiling: float = 0.05,
        time_budget: float | None = None,
        operator: str | None = None,
        decode_steps: int | str | None = "auto",
        vary_response: Sequence[str] = RESPONSE_FIELDS,
        **options: Any,
    ) -> LayerChoice:
        """``options``: ``centres`` and ``grid`` as for :meth:`steering_candidates`."""
        base = evaluate.defaults
        steps = base.decode_steps if decode_steps == "auto" else decode_steps
        triples = self.steering_candidates(num_layers, operator=operator, **options)
        if not triples:
            raise CrvlmError("the sweep has no candidates (empty grid or no centres)")
        stage1 = [replace(base, band=tuple(band), strength=s, operator=op, decode_steps=steps)
                  for op, band, s in triples]
        if base.response.get("opening") or base.response.get("mode") == "template":
            stage1.insert(0, replace(stage1[0], strength=0.0))
        deadline = math.inf if time_budget is None else time.monotonic() + time_budget
        table: list[dict[str, Any]] = []

        def run(stage: str, candidates: list[Candidate]) -> None:
            known = [row["candidate"] for row in table]
            fresh = [c for c in candidates if c not in known]
            if not fresh:
                return
            if table and time.monotonic() > deadline:
                table.extend(_row(c, stage, len(table) + i) | {"skipped": "time budget"} for i, c in enumerate(fresh))
                return
            started = time.monotonic()
            scores = evaluate.many(fresh)
            seconds = round(time.monotonic() - started, 1)
            for c, score in zip(fresh, scores, strict=True):
                table.append(_row(c, stage, len(table)) | score | {"stage_seconds": seconds})

        def best() -> dict[str, Any]:
            tried = [row for row in table if "srs" in row]
            allowed = [row for row in tried if row["brs"] <= brs_ceiling] or tried
            return max(allowed, key=rank_key)

        run("steering", stage1)
        top = best()["candidate"]
        if decode_steps == "auto" and top.strength > 0 and top.decode_steps is not None:
            run("steered tokens", [replace(top, decode_steps=k) for k in DECODE_STEPS])
            top = best()["candidate"]
        variants = []
        if "stop_sentences" in vary_response and top.response.get("stop_sentences"):
            more = top.response["stop_sentences"] + 1
            variants.append(replace(top, response={**top.response, "stop_sentences": more}))
        if "opening" in vary_response and top.response.get("opening") and top.strength > 0:
            variants.append(replace(top, response={**top.response, "opening": ""}))
        if "mode" in vary_response and top.response.get("mode") != "template":
            variants.append(replace(top, strength=0.0, response={**top.response, "mode": "template"}))
        run("response", variants)
        chosen = best()
        for row in table:
            row["chosen"] = row is chosen
        clean_table = [{k: v for k, v in row.items() if k != "candidate"} for row in table]
        return LayerChoice(gate_layer=gate_layer, band=list(chosen["candidate"].band), alpha=float(chosen["alpha"]),
                           table=clean_table, candidate=chosen["candidate"])


def _row(candidate: Candidate, stage: str, order: int) -> dict[str, Any]:
    return {"candidate": candidate, "stage": stage, "order": order, "label": candidate.label(),
            "band": list(candidate.band), "strength": candidate.strength, "operator": candidate.operator,
            "decode_steps": candidate.decode_steps, "response": dict(candidate.response)}


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
