"""Build stage 4's tools: turning a candidate setting into a bundle, and scoring many candidates
on the validation split in one batched ``generate``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from crvlm_sdk.activations.capture import capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.components import CandidateEvaluator
from crvlm_sdk.evaluation.evaluate import System, run_systems
from crvlm_sdk.evaluation.metrics import compute_metrics
from crvlm_sdk.plugins.manager import PluginManager
from crvlm_sdk.steering.steerer import Steerer
from crvlm_sdk.types import Candidate, Sample, Verdict


def log(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)



def residual_norms(adapter: BackboneAdapter, samples: Sequence[Sample], batch_size: int,
                   layers: Sequence[int] | None = None) -> dict[int, float]:
    """Root-mean-square norm of ``h_l`` at the last prompt token, per layer (default: all)."""
    layers = range(adapter.num_layers) if layers is None else layers
    stats = capture(adapter, samples, layers, batch_size=batch_size, progress=False)
    return {layer: math.sqrt(float(stats.sq_sums[layer].sum()) / stats.count) for layer in stats.layers}


class CandidateBundles:
    """Makes the bundle a candidate setting describes: the extracted vectors on its band (plus
    the image-driven directions at its weight), scaled to its strength relative to the
    residual norm, with its operator, steered tokens and response settings."""

    def __init__(self, base: Bundle, vectors: Mapping[int, torch.Tensor], norms: Mapping[int, float],
                 directions: Mapping[int, torch.Tensor], threshold: float) -> None:
        self.base, self.vectors, self.norms, self.directions = base, vectors, norms, directions
        self.threshold = threshold

    def make(self, candidate: Candidate) -> Bundle:
        band = list(candidate.band)
        vectors, norms = self.vectors, self.norms
        ratio = sum(norms[layer] / float(vectors[layer].norm().clamp_min(1e-8)) for layer in band) / len(band)
        vecs = {layer: vectors[layer] + candidate.image_weight * _scaled(self.directions.get(layer), vectors[layer])
                for layer in band}
        response = ResponseSpec(threshold=self.threshold, **candidate.response)
        return replace(self.base, vectors=vecs).replaced(
            layers=sorted(vecs), alpha=candidate.strength * ratio, operator=candidate.operator,
            decode_steps=candidate.decode_steps, response=response,
        )


#: In-scope rows scoring below this gate value get at most 1% of the push and no response
#: shaping, so every candidate answers them alike: the sweep generates them once.
INVARIANT_P = 0.01


class CandidateScorer(CandidateEvaluator):
    """Scores candidate settings on the validation rows, all candidates of a stage in one
    batched ``generate`` through the Steerer's per-row bundle selection.

    Rows the gate scores below :data:`INVARIANT_P` are answered alike by every candidate and
    are generated once (under the first candidate scored); the rest run for every candidate,
    highest gate score first so that refused rows, which end early, share batches.
    """

    def __init__(self, backbone: BackboneAdapter, make: Callable[[Candidate], Bundle], rows: Sequence[Sample],
                 in_scope: Sequence[bool], gate_p: Sequence[float], defaults: Candidate, options: BuildOptions,
                 plugins: PluginManager, console: Console | None) -> None:
        self.backbone, self.make, self.rows, self.in_scope = backbone, make, list(rows), list(in_scope)
        self.defaults, self.options, self.plugins, self.console = defaults, options, plugins, console
        self.judge = plugins.get("judge", options.judge)()
        self.keyword = plugins.get("judge", "keyword")()
        self.varying = sorted((i for i, p in enumerate(gate_p) if p >= INVARIANT_P or not in_scope[i]),
                              key=lambda i: -gate_p[i])
        varying = set(self.varying)
        self.fixed = [i for i in range(len(rows)) if i not in varying]
        self._fixed: tuple[list[Verdict], list[bool]] | None = None
        self._scores: dict[str, dict[str, Any]] = {}

    def _new_tokens(self, candidate: Candidate) -> int:
        spec = candidate.response
        ends = spec.get("mode") == "template" or spec.get("stop_sentences")
        return self.options.sweep_new_tokens if ends else self.options.validation_new_tokens

    def _judge(self, texts: list[str], ended: list[bool]) -> tuple[list[Verdict], list[bool]]:
        return self.judge.assess(texts, ended=ended), self.keyword.judge(texts)

    def many(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        # Generation is greedy, so a candidate scored in an earlier stage (the image-weight stage
        # starts from the chosen one) keeps its score instead of being generated again.
        todo = list(dict.fromkeys(repr(c) for c in candidates if repr(c) not in self._scores))
        if todo:
            fresh = {repr(c): c for c in candidates}
            self._scores.update(zip(todo, self._score([fresh[k] for k in todo]), strict=True))
        return [dict(self._scores[repr(c)]) for c in candidates]

    def _score(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        bundles = [self.make(c).replaced(name=f"candidate-{k}") for k, c in enumerate(candidates)]
        steerer = Steerer(self.backbone, bundles, plugins=self.plugins)
        systems = [System(b.name, b.name) for b in bundles]
        varying = [self.rows[i] for i in self.varying]
        verdicts: dict[str, tuple[list[Verdict], list[bool]]] = {}
        for limit in sorted({self._new_tokens(c) for c in candidates}):
            group = [s for s, c in zip(systems, candidates, strict=True) if self._new_tokens(c) == limit]
            out = run_systems(steerer, varying, group, batch_size=self.options.generate_batch_size,
                              max_new_tokens=limit)
            for name, got in out.items():
                verdicts[name] = self._judge(got.texts, got.ended)
        if self._fixed is None:
            fixed_rows = [self.rows[i] for i in self.fixed]
            if fixed_rows:
                got = run_systems(steerer, fixed_rows, systems[:1], batch_size=self.options.generate_batch_size,
                                  max_new_tokens=self.options.validation_new_tokens)[systems[0].name]
                self._fixed = self._judge(got.texts, got.ended)
            else:
                self._fixed = ([], [])
        results = []
        for candidate, bundle in zip(candidates, bundles, strict=True):
            v, kw = verdicts[bundle.name]
            all_v = v + self._fixed[0]
            all_kw = kw + self._fixed[1]
            scope = [self.in_scope[i] for i in self.varying + self.fixed]
            m = compute_metrics([x.clean for x in all_v], scope, declined=[x.declines for x in all_v], keyword=all_kw)
            results.append({"alpha": bundle.manifest.alpha, "srs": m.srs, "srs_keyword": m.srs_keyword,
                            "brs": m.brs, "mb": m.mb, "clean_out": m.refused_out, "n_out": m.n_out,
                            "declined_in": m.refused_in, "n_in": m.n_in})
            log(self.console, f"  {escape(candidate.label())}: clean SRS {m.srs:.2f} (keyword {m.srs_keyword:.2f}) "
                               f"BRS {m.brs:.2f}")
        return results


def _scaled(direction: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``direction`` rescaled to ``like``'s norm (zero if absent), so weights are comparable."""
    if direction is None:
        return torch.zeros_like(like)
    return direction * (like.norm() / direction.norm().clamp_min(1e-8))
