"""The build pipeline: policy → data → vectors → visual alignment → gate → layers/α → bundle.

Every stage is a plugin looked up by name, so a third party can swap any of them. The
pipeline is deterministic given the policy's seed (or ``seed=``): data splits, pairing and
probe fitting are seeded, generation is greedy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

import torch
from rich.console import Console
from rich.markup import escape

from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.manifest import Operator, ResponseMode, ResponseSpec
from crvlm_sdk.activations.capture import capture
from crvlm_sdk.build.options import DEFAULT_EXTRACTOR_OPTIONS, BuildOptions, check_options
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.evaluation.evaluate import System, run_systems
from crvlm_sdk.bundle.gates import LayerGates, describe_layers
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.types import Candidate, Sample, Verdict
from crvlm_sdk.components import CandidateEvaluator, Gate
from crvlm_sdk.evaluation.metrics import compute_metrics
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager
from crvlm_sdk.policy import Policy, PolicyData
from crvlm_sdk.steering.steerer import Steerer

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


def _log(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)


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


def residual_norms(adapter: BackboneAdapter, samples: Sequence[Sample], batch_size: int,
                   layers: Sequence[int] | None = None) -> dict[int, float]:
    """Root-mean-square norm of ``h_l`` at the last prompt token, per layer (default: all)."""
    layers = range(adapter.num_layers) if layers is None else layers
    stats = capture(adapter, samples, layers, batch_size=batch_size, progress=False)
    return {layer: math.sqrt(float(stats.sq_sums[layer].sum()) / stats.count) for layer in stats.layers}


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
            _log(self.console, f"  {escape(candidate.label())}: clean SRS {m.srs:.2f} (keyword {m.srs_keyword:.2f}) "
                               f"BRS {m.brs:.2f}")
        return results


def build_bundle(
    model: torch.nn.Module,
    processor: Any,
    policy: Policy | str | Path,
    *,
    adapter: str | None = None,
    options: BuildOptions | None = None,
    console: Console | None = None,
    progress: bool = True,
    plugins: PluginManager | None = None,
    **overrides: Any,
) -> Bundle:
    """Build a refusal bundle for ``model`` from ``policy`` (see :class:`BuildOptions`)."""
    started = time.monotonic()
    opts = replace(options or BuildOptions())
    unknown = sorted(set(overrides) - {f.name for f in fields(BuildOptions)})
    if unknown:
        raise CrvlmError(f"unknown build option(s) {unknown}")
    opts = replace(opts, **overrides)
    check_options(opts)
    manager = plugins or get_plugin_manager()
    pol = policy if isinstance(policy, Policy) else Policy.load(policy)
    if opts.seed is not None:
        pol = pol.model_copy(update={"seed": opts.seed})
    seed = pol.seed
    backbone = adapter_for(model, processor, adapter, plugins=manager)
    data = pol.load_data(max_samples=opts.max_samples)
    instruction = pol.instruction()
    _log(console, f"policy [bold]{escape(pol.name)}[/]: {len(data.train_in)}+{len(data.train_out)} training, "
                  f"{len(data.val_in)}+{len(data.val_out)} validation questions; model has "
                  f"{backbone.num_layers} layers")

    # 1. vectors at every layer the locator may steer (one capture pass per side serves them all)
    ext_options = {**DEFAULT_EXTRACTOR_OPTIONS, **opts.extractor_options} if opts.extractor == "teacher-forced" \
        else dict(opts.extractor_options)
    extractor = manager.get("extractor", opts.extractor)()
    locator = manager.get("locator", opts.locator)()
    vary_response = tuple(name for name, value in (("stop_sentences", opts.stop_sentences), ("opening", opts.opening),
                                                   ("mode", opts.mode)) if value in ("auto", None) and
                          not (name == "stop_sentences" and value is None))
    locator_options = {"operator": opts.operator, "decode_steps": opts.decode_steps, "vary_response": vary_response,
                       "brs_ceiling": opts.brs_ceiling, **opts.locator_options}
    steer_layers = locator.candidate_layers(backbone.num_layers, **locator_options) or \
        list(range(backbone.num_layers))
    vectors = extractor.extract(
        backbone, data.train_in, data.train_out, steer_layers, refusal_instruction=instruction,
        refusal_prefix=pol.refusal_prefix, compliant_prefix=pol.compliant_prefix, batch_size=opts.batch_size,
        progress=progress, **ext_options,
    )
    # 2. counterfactual visual alignment (no-op without images)
    aligned: dict[str, Any] = {}
    if opts.aligner and data.has_images:
        aligner = manager.get("aligner", opts.aligner)()
        # its directions join the vectors; its rows join the gate's training data at every gate layer
        align_layers = sorted(set(steer_layers) | set(gate_layers(backbone.num_layers, opts)))
        aligned = aligner.align(backbone, data.train_in, data.train_out, vectors, refusal_instruction=instruction,
                                refusal_prefix=pol.refusal_prefix, layers=align_layers, seed=seed,
                                batch_size=opts.batch_size, progress=progress)
    # 3. gate
    gate_fit = fit_gate(backbone, data, opts, extra_rows=aligned or None, plugins=manager, progress=progress)
    _log(console, f"gate: {escape(opts.gate)} at {describe_layers(gate_fit.gate.layers)}, validation: "
                  f"{gate_fit.caught:.0%} of "
                  f"out-of-scope caught, {gate_fit.flagged:.0%} of in-scope flagged")
    # 4. steering and response settings, chosen on the whole validation split
    norms = residual_norms(backbone, data.train_out[:32], opts.batch_size, steer_layers)
    directions = aligned.get("directions", {})
    base = Bundle.create(
        adapter=backbone, policy=pol.summary(len(data.train_in), len(data.train_out)),
        vectors={steer_layers[0]: vectors[steer_layers[0]]}, gate=gate_fit.gate, alpha=0.0,
    )

    def make(candidate: Candidate) -> Bundle:
        band = list(candidate.band)
        ratio = sum(norms[layer] / float(vectors[layer].norm().clamp_min(1e-8)) for layer in band) / len(band)
        vecs = {layer: vectors[layer] + candidate.image_weight * _scaled(directions.get(layer), vectors[layer])
                for layer in band}
        response = ResponseSpec(threshold=opts.threshold, **candidate.response)
        return replace(base, vectors=vecs).replaced(
            layers=sorted(vecs), alpha=candidate.strength * ratio, operator=candidate.operator,
            decode_steps=candidate.decode_steps, response=response,
        )

    val_rows = data.val_out + data.val_in
    in_scope = [False] * len(data.val_out) + [True] * len(data.val_in)
    gate_p = [float(p) for p in gate_fit.val_p]
    gate_p = gate_p[len(data.val_in):] + gate_p[: len(data.val_in)]  # fit_gate keeps in-scope rows first
    defaults = _default_candidate(opts, pol, steer_layers)
    scorer = CandidateScorer(backbone, make, val_rows, in_scope, gate_p, defaults, opts, manager, console)
    choice = locator.locate(backbone.num_layers, scorer, gate_layer=gate_fit.gate.last_layer, seed=seed,
                            **locator_options)
    chosen = choice.candidate or replace(defaults, band=tuple(choice.band),
                                         strength=float(next(r["strength"] for r in choice.table if r.get("chosen"))))
    table = choice.table
    chosen_row = next(r for r in table if r.get("chosen"))
    # 5. weight of the image-driven component, chosen on validation
    image_table: list[dict[str, Any]] = []
    if directions and chosen.strength > 0 and chosen.response.get("mode") != "template":
        weights = (0.0, 0.25, 0.5)
        scores = scorer.many([replace(chosen, image_weight=w) for w in weights])
        image_table = [{"image_weight": w, **r} for w, r in zip(weights, scores, strict=True)]
        best = max(range(len(weights)), key=lambda i: (scores[i]["srs"] if scores[i]["brs"] <= opts.brs_ceiling
                                                        else -1.0, -scores[i]["brs"], -i))
        chosen, chosen_row = replace(chosen, image_weight=weights[best]), {**chosen_row, **scores[best]}
    if opts.mode == "template" and chosen.response.get("mode") != "template":
        chosen = replace(chosen, response={**chosen.response, "mode": "template"})
        chosen_row = {**chosen_row, **scorer.many([chosen])[0]}
    bundle = make(chosen)
    bundle.manifest.extraction = {
        "extractor": opts.extractor, **ext_options, "refusal_instruction": instruction,
        "refusal_prefix": pol.refusal_prefix, "compliant_prefix": pol.compliant_prefix, "seed": seed,
        "aligner": opts.aligner if directions else None, "image_weight": chosen.image_weight,
        "image_pairs": len(aligned.get("pairs", [])), "locator": opts.locator, "strength": chosen.strength,
        "judge": opts.judge, "refusal_opening": pol.opening(), "refusal_message": pol.message(),
    }
    bundle.manifest.validation = {
        "srs": chosen_row["srs"], "srs_keyword": chosen_row.get("srs_keyword"), "brs": chosen_row["brs"],
        "mb": chosen_row["mb"], "n_in": len(data.val_in), "n_out": len(data.val_out), "judge": opts.judge,
        "gate_caught": gate_fit.caught, "gate_flagged": gate_fit.flagged, "gate_table": gate_fit.table,
        "sweep": table, "image_weight_table": image_table, "build_seconds": round(time.monotonic() - started, 1),
    }
    return bundle


def _default_candidate(opts: BuildOptions, pol: Policy, steer_layers: Sequence[int]) -> Candidate:
    """The build's own settings: what the sweep starts from and what the fixed locator uses."""
    response: dict[str, Any] = {
        "mode": "steer",
        "opening": pol.opening() if opts.opening is None else opts.opening,
        "stop_sentences": 1 if opts.stop_sentences == "auto" else opts.stop_sentences,
        "message": pol.message(),
    }
    return Candidate(band=(steer_layers[0],), strength=1.0, operator=opts.operator or "rotation",
                     decode_steps=8 if opts.decode_steps == "auto" else opts.decode_steps, response=response)


def _scaled(direction: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``direction`` rescaled to ``like``'s norm (zero if absent), so weights are comparable."""
    if direction is None:
        return torch.zeros_like(like)
    return direction * (like.norm() / direction.norm().clamp_min(1e-8))

