"""The build pipeline: policy → data → vectors → visual alignment → gate → layers/α → bundle.

Every stage is a plugin looked up by name, so a third party can swap any of them. The
pipeline is deterministic given the policy's seed (or ``seed=``): data splits, pairing and
probe fitting are seeded, generation is greedy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from rich.console import Console

from crvlm_sdk.backbones import adapter_for
from crvlm_sdk.bundle import Bundle, Operator
from crvlm_sdk.capture import capture
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.interfaces import BackboneAdapter, Gate, Sample
from crvlm_sdk.metrics import compute_metrics
from crvlm_sdk.plugins import PluginManager, get_plugin_manager
from crvlm_sdk.policy import Policy, PolicyData
from crvlm_sdk.steerer import Steerer

#: What won on validation across the example policies (examples/policies/RESULTS.md):
#: refusal-vs-compliance contrast averaged over the forced tokens.
DEFAULT_EXTRACTOR_OPTIONS = {"contrast": "compliant", "read": "mean"}


@dataclass
class BuildOptions:
    extractor: str = "teacher-forced"
    extractor_options: dict[str, Any] = field(default_factory=dict)
    gate: str = "probe"
    gate_layers: Sequence[int] | None = None
    target_over_refusal: float = 0.02
    gate_temperature: float = 0.1
    locator: str = "sweep"
    locator_options: dict[str, Any] = field(default_factory=dict)
    aligner: str | None = "counterfactual"
    judge: str = "keyword"
    operator: str = "additive"
    #: steer the prompt and this many generated tokens (None: all; see Manifest.decode_steps)
    decode_steps: int | None = None
    batch_size: int = 8
    max_samples: int | None = None
    seed: int | None = None
    sweep_samples: int = 24
    sweep_new_tokens: int = 20
    validation_new_tokens: int = 40


@dataclass
class GateFit:
    layer: int
    gate: Gate
    caught: float
    flagged: float
    table: list[dict[str, Any]]


def _log(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)


def gate_layers(num_layers: int, options: BuildOptions) -> list[int]:
    """Layers the gate is fitted at (the best one on validation is kept): the given ones, or
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
    """Fit the gate at every candidate layer; keep the one that best separates validation data."""
    layers = gate_layers(adapter.num_layers, options)
    common = {"batch_size": options.batch_size, "progress": progress, "keep": True}
    train = capture(adapter, data.train_in + data.train_out, layers, description="gate features (train)", **common)
    val = capture(adapter, data.val_in + data.val_out, layers, description="gate features (validation)", **common)
    n_in, v_in = len(data.train_in), len(data.val_in)
    gate_cls = plugins.get("gate", options.gate)
    table, best = [], None
    for layer in layers:
        rows, vrows = train.rows(layer), val.rows(layer)
        h_in, h_out = rows[:n_in], rows[n_in:]
        if extra_rows:
            h_in = torch.cat([h_in, extra_rows["gate_in"][layer]])
            h_out = torch.cat([h_out, extra_rows["gate_out"][layer]])
        gate = gate_cls.untrained(adapter.hidden_size)
        torch.manual_seed(options.seed or 0)
        gate.fit(h_in, h_out)
        gate.calibrate(vrows[:v_in], target_over_refusal=options.target_over_refusal)
        p = gate.score(vrows)
        caught = float((p[v_in:] > 0.5).float().mean())
        flagged = float((p[:v_in] > 0.5).float().mean())
        table.append({"layer": layer, "caught": caught, "flagged": flagged})
        if best is None or caught - flagged > best.caught - best.flagged:
            best = GateFit(layer, gate, caught, flagged, table)
    assert best is not None
    best.gate.soften(options.gate_temperature)
    return best


def residual_norms(adapter: BackboneAdapter, samples: Sequence[Sample], batch_size: int,
                   layers: Sequence[int] | None = None) -> dict[int, float]:
    """Root-mean-square norm of ``h_l`` at the last prompt token, per layer (default: all)."""
    layers = range(adapter.num_layers) if layers is None else layers
    stats = capture(adapter, samples, layers, batch_size=batch_size, progress=False)
    return {layer: math.sqrt(float(stats.sq_sums[layer].sum()) / stats.count) for layer in stats.layers}


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
    opts = options or BuildOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise CrvlmError(f"unknown build option {key!r}")
        setattr(opts, key, value)
    operators = get_args(Operator)
    if opts.operator not in operators:
        raise CrvlmError(f"unknown operator {opts.operator!r}", hint=f"use one of {', '.join(operators)}")
    if opts.decode_steps is not None and opts.decode_steps < 0:
        raise CrvlmError(f"decode_steps must be >= 0 or None, got {opts.decode_steps}")
    manager = plugins or get_plugin_manager()
    pol = policy if isinstance(policy, Policy) else Policy.load(policy)
    if opts.seed is not None:
        pol = pol.model_copy(update={"seed": opts.seed})
    seed = pol.seed
    backbone = adapter_for(model, processor, adapter, plugins=manager)
    data = pol.load_data(max_samples=opts.max_samples)
    instruction = pol.instruction()
    _log(console, f"policy [bold]{pol.name}[/]: {len(data.train_in)}+{len(data.train_out)} training, "
                  f"{len(data.val_in)}+{len(data.val_out)} validation questions; model has "
                  f"{backbone.num_layers} layers")

    # 1. vectors at every layer the locator may steer (one capture pass per side serves them all)
    ext_options = {**DEFAULT_EXTRACTOR_OPTIONS, **opts.extractor_options} if opts.extractor == "teacher-forced" \
        else dict(opts.extractor_options)
    extractor = manager.get("extractor", opts.extractor)()
    locator = manager.get("locator", opts.locator)()
    locator_options = {"operator": opts.operator, **opts.locator_options}
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
    _log(console, f"gate: {opts.gate} at layer {gate_fit.layer}, validation: {gate_fit.caught:.0%} of "
                  f"out-of-scope caught, {gate_fit.flagged:.0%} of in-scope flagged")
    # 4. layers and strength on validation data
    norms = residual_norms(backbone, data.train_out[:32], opts.batch_size, steer_layers)
    k = opts.sweep_samples
    sweep_rows = data.val_in[:k] + data.val_out[:k]
    sweep_labels = [True] * len(data.val_in[:k]) + [False] * len(data.val_out[:k])
    judge = manager.get("judge", opts.judge)()
    directions = aligned.get("directions", {})

    def alpha_for(band: list[int], strength: float) -> float:
        ratio = sum(norms[layer] / float(vectors[layer].norm().clamp_min(1e-8)) for layer in band) / len(band)
        return strength * ratio

    def make(band: list[int], alpha: float, image_weight: float = 0.0) -> Bundle:
        vecs = {layer: vectors[layer] + image_weight * _scaled(directions.get(layer), vectors[layer])
                for layer in band}
        return Bundle.create(
            adapter=backbone, policy=pol.summary(len(data.train_in), len(data.train_out)), vectors=vecs,
            gate=gate_fit.gate, gate_layer=gate_fit.layer, alpha=alpha, operator=opts.operator,
            decode_steps=opts.decode_steps,
        )

    def score(bundle: Bundle, rows: Sequence[Sample], labels: Sequence[bool], new_tokens: int) -> dict[str, float]:
        steerer = Steerer(backbone, [bundle], plugins=manager)
        texts: list[str] = []
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            images = [s.image for s in chunk]
            texts += steerer.generate([s.question for s in chunk], images if any(images) else None,
                                      max_new_tokens=new_tokens)
        m = compute_metrics(judge.judge(texts), labels)
        return {"srs": m.srs, "brs": m.brs, "mb": m.mb}

    def evaluate(band: list[int], strength: float) -> dict[str, float]:
        alpha = alpha_for(band, strength)
        result = {"alpha": alpha, **score(make(band, alpha), sweep_rows, sweep_labels, opts.sweep_new_tokens)}
        _log(console, f"  sweep: layers {band} strength {strength:.2f} (α={alpha:.3g}): SRS {result['srs']:.2f} "
                      f"BRS {result['brs']:.2f} MB {result['mb']:.3f}")
        return result

    choice = locator.locate(backbone.num_layers, evaluate, gate_layer=gate_fit.layer, seed=seed, **locator_options)
    # 5. weight of the image-driven component, chosen on validation
    image_weight, image_table = 0.0, []
    val_rows = data.val_in + data.val_out
    val_labels = [True] * len(data.val_in) + [False] * len(data.val_out)
    if directions:
        best_mb = -1.0
        for weight in (0.0, 0.25, 0.5):
            result = score(make(choice.band, choice.alpha, weight), val_rows, val_labels, opts.sweep_new_tokens)
            image_table.append({"image_weight": weight, **result})
            if result["mb"] > best_mb + 1e-9:
                best_mb, image_weight = result["mb"], weight
    bundle = make(choice.band, choice.alpha, image_weight)
    final = score(bundle, val_rows, val_labels, opts.validation_new_tokens)
    strength = next((r["strength"] for r in choice.table if r.get("chosen")), None)
    bundle.manifest.extraction = {
        "extractor": opts.extractor, **ext_options, "refusal_instruction": instruction,
        "refusal_prefix": pol.refusal_prefix, "compliant_prefix": pol.compliant_prefix, "seed": seed,
        "aligner": opts.aligner if directions else None, "image_weight": image_weight,
        "image_pairs": len(aligned.get("pairs", [])), "locator": opts.locator, "strength": strength,
        "judge": opts.judge,
    }
    bundle.manifest.validation = {
        "srs": final["srs"], "brs": final["brs"], "mb": final["mb"], "n_in": len(data.val_in),
        "n_out": len(data.val_out), "gate_caught": gate_fit.caught, "gate_flagged": gate_fit.flagged,
        "gate_table": gate_fit.table, "sweep": choice.table, "image_weight_table": image_table,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    return bundle


def _scaled(direction: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``direction`` rescaled to ``like``'s norm (zero if absent), so weights are comparable."""
    if direction is None:
        return torch.zeros_like(like)
    return direction * (like.norm() / direction.norm().clamp_min(1e-8))

