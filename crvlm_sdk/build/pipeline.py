"""The build pipeline: policy → data → vectors → visual alignment → gate → sweep → bundle.

Every stage is a plugin looked up by name, so a third party can swap any of them. The
pipeline is deterministic given the policy's seed (or ``seed=``): data splits, pairing and
probe fitting are seeded, generation is greedy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from crvlm_sdk.activations.capture import GATE_POSITION
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import GateFit, fit_gate, gate_layers
from crvlm_sdk.build.options import DEFAULT_EXTRACTOR_OPTIONS, BuildOptions, check_options
from crvlm_sdk.build.scoring import CandidateBundles, CandidateScorer, log, residual_norms
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import describe_layers
from crvlm_sdk.components import LayerLocator
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager
from crvlm_sdk.policy import Policy, PolicyData
from crvlm_sdk.types import Candidate


def build_bundle(
    model: torch.nn.Module,
    processor: Any,
    policy: Policy | str | Path,
    *,
    adapter: str | BackboneAdapter | None = None,
    options: BuildOptions | None = None,
    console: Console | None = None,
    progress: bool = True,
    plugins: PluginManager | None = None,
    **overrides: Any,
) -> Bundle:
    """Build a refusal bundle for ``model`` from ``policy`` (see :class:`BuildOptions`).

    ``adapter`` is an adapter's name, an adapter already made for ``model``, or None (found).
    """
    started = time.monotonic()
    opts = _options(options, overrides)
    manager = plugins or get_plugin_manager()
    pol = policy if isinstance(policy, Policy) else Policy.load(policy)
    if opts.seed is not None:
        pol = pol.model_copy(update={"seed": opts.seed})
    backbone = adapter if isinstance(adapter, BackboneAdapter) else \
        adapter_for(model, processor, adapter, plugins=manager)
    data = pol.load_data(max_samples=opts.max_samples)
    log(console, f"policy [bold]{escape(pol.name)}[/]: {len(data.train_in)}+{len(data.train_out)} training, "
                 f"{len(data.val_in)}+{len(data.val_out)} validation questions; model has "
                 f"{backbone.num_layers} layers")
    locator = manager.get("locator", opts.locator)()
    locator_options = _locator_options(opts)
    steer_layers = locator.candidate_layers(backbone.num_layers, **locator_options) or \
        list(range(backbone.num_layers))
    # 1. vectors at every layer the locator may steer (one capture pass per side serves them all)
    vectors, ext_options = extract_vectors(backbone, pol, data, opts, steer_layers, manager, progress)
    # 2. counterfactual visual alignment (no-op without images)
    aligned = align_images(backbone, pol, data, opts, vectors, steer_layers, manager, progress)
    # 3. gate
    gate_fit = fit_gate(backbone, data, opts, extra_rows=aligned or None, plugins=manager, progress=progress)
    log(console, f"gate: {escape(opts.gate)} at {describe_layers(gate_fit.gate.layers)}, validation: "
                 f"{gate_fit.caught:.0%} of out-of-scope caught, {gate_fit.flagged:.0%} of in-scope flagged")
    # 4. steering and response settings, chosen on the whole validation split
    base = Bundle.create(adapter=backbone, policy=pol.summary(len(data.train_in), len(data.train_out)),
                         vectors={steer_layers[0]: vectors[steer_layers[0]]}, gate=gate_fit.gate, alpha=0.0)
    directions = aligned.get("directions", {})
    factory = CandidateBundles(base, vectors, residual_norms(backbone, data.train_out[:32], opts.batch_size,
                                                             steer_layers), directions, opts.threshold)
    scorer = CandidateScorer(backbone, factory.make, data.val_out + data.val_in,
                             [False] * len(data.val_out) + [True] * len(data.val_in), _validation_p(gate_fit, data),
                             _default_candidate(opts, pol, steer_layers), opts, manager, console)
    chosen, chosen_row, table, image_table = _choose(locator, locator_options, scorer, backbone.num_layers,
                                                     gate_fit, bool(directions), opts, pol.seed)
    # 5. the bundle, with what it was built from and how it did on validation
    bundle = factory.make(chosen)
    bundle.manifest.extraction = {
        "extractor": opts.extractor, **ext_options, "refusal_instruction": pol.instruction(),
        "refusal_prefix": pol.refusal_prefix, "compliant_prefix": pol.compliant_prefix, "seed": pol.seed,
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


def _options(options: BuildOptions | None, overrides: dict[str, Any]) -> BuildOptions:
    """A checked copy of ``options`` with keyword ``overrides`` applied (the caller's is untouched)."""
    unknown = sorted(set(overrides) - {f.name for f in fields(BuildOptions)})
    if unknown:
        raise CrvlmError(f"unknown build option(s) {unknown}")
    opts = replace(options or BuildOptions(), **overrides)
    check_options(opts)
    return opts


def _locator_options(opts: BuildOptions) -> dict[str, Any]:
    """What the locator is told: fixed settings, which response fields it may vary, the ceiling."""
    vary_response = tuple(name for name, value in (("stop_sentences", opts.stop_sentences), ("opening", opts.opening),
                                                   ("mode", opts.mode)) if value in ("auto", None) and
                          not (name == "stop_sentences" and value is None))
    return {"operator": opts.operator, "decode_steps": opts.decode_steps, "vary_response": vary_response,
            "brs_ceiling": opts.brs_ceiling, **opts.locator_options}


def extract_vectors(backbone: BackboneAdapter, pol: Policy, data: PolicyData, opts: BuildOptions,
                    layers: Sequence[int], manager: PluginManager,
                    progress: bool) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """The extractor's vectors at ``layers`` from the training split, and the options it ran with."""
    ext_options = {**DEFAULT_EXTRACTOR_OPTIONS, **opts.extractor_options} if opts.extractor == "teacher-forced" \
        else dict(opts.extractor_options)
    extractor = manager.get("extractor", opts.extractor)()
    vectors = extractor.extract(
        backbone, data.train_in, data.train_out, layers, refusal_instruction=pol.instruction(),
        refusal_prefix=pol.refusal_prefix, compliant_prefix=pol.compliant_prefix, batch_size=opts.batch_size,
        progress=progress, **ext_options,
    )
    return vectors, ext_options


def align_images(backbone: BackboneAdapter, pol: Policy, data: PolicyData, opts: BuildOptions,
                 vectors: dict[int, torch.Tensor], steer_layers: Sequence[int], manager: PluginManager,
                 progress: bool) -> dict[str, Any]:
    """The aligner's directions join the vectors; its rows join the gate's data at every gate layer."""
    if not (opts.aligner and data.has_images):
        return {}
    aligner = manager.get("aligner", opts.aligner)()
    layers = sorted(set(steer_layers) | set(gate_layers(backbone.num_layers, opts)))
    return aligner.align(backbone, data.train_in, data.train_out, vectors, refusal_instruction=pol.instruction(),
                         refusal_prefix=pol.refusal_prefix, layers=layers, seed=pol.seed,
                         batch_size=opts.batch_size, progress=progress,
                         gate_position=GATE_POSITION[opts.gate_features])


def _validation_p(gate_fit: GateFit, data: PolicyData) -> list[float]:
    """The kept gate's ``p`` per validation row, out-of-scope rows first (as the scorer takes them)."""
    gate_p = [float(p) for p in gate_fit.val_p]
    return gate_p[len(data.val_in):] + gate_p[: len(data.val_in)]  # fit_gate keeps in-scope rows first


def _choose(locator: LayerLocator, locator_options: dict[str, Any], scorer: CandidateScorer, num_layers: int,
            gate_fit: GateFit, has_directions: bool, opts: BuildOptions,
            seed: int | None) -> tuple[Candidate, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The locator's choice, then the weight of the image-driven component, then (if asked) the
    template answer: (candidate, its validation row, the sweep table, the image-weight table)."""
    defaults = scorer.defaults
    choice = locator.locate(num_layers, scorer, gate_layer=gate_fit.gate.last_layer, seed=seed, **locator_options)
    chosen = choice.candidate or replace(defaults, band=tuple(choice.band),
                                         strength=float(next(r["strength"] for r in choice.table if r.get("chosen"))))
    chosen_row = next(r for r in choice.table if r.get("chosen"))
    image_table: list[dict[str, Any]] = []
    if has_directions and chosen.strength > 0 and chosen.response.get("mode") != "template":
        weights = (0.0, 0.25, 0.5)
        scores = scorer.many([replace(chosen, image_weight=w) for w in weights])
        image_table = [{"image_weight": w, **r} for w, r in zip(weights, scores, strict=True)]
        best = max(range(len(weights)), key=lambda i: (scores[i]["srs"] if scores[i]["brs"] <= opts.brs_ceiling
                                                        else -1.0, -scores[i]["brs"], -i))
        chosen, chosen_row = replace(chosen, image_weight=weights[best]), {**chosen_row, **scores[best]}
    if opts.mode == "template" and chosen.response.get("mode") != "template":
        chosen = replace(chosen, response={**chosen.response, "mode": "template"})
        chosen_row = {**chosen_row, **scorer.many([chosen])[0]}
    return chosen, chosen_row, choice.table, image_table


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
