"""What each component of a refusal bundle contributes: the CR-VLM paper's ablations on the
example policies (test split).

    python benchmarks/ablate_components.py                    # the five example policies
    python benchmarks/ablate_components.py --policies cooking --bundles bundles
    python benchmarks/ablate_components.py --table-only       # rewrite tables and plot from the JSON,
                                                              # its answers judged again

For each policy the flag-less bundle (``crvlm build-bundle --policy P``; reused from
``--bundles`` if it is there, built otherwise) is taken apart one component at a time. Every
variant keeps the bundle's chosen steering settings (band, strength relative to the residual
norm, operator, steered tokens) and changes one thing, as the paper's ablations do:

- ``mean-diff``: the steering vector is the plain difference of means of out-of-scope and
  in-scope questions (no teacher forcing; the ``mean-diff`` extractor);
- ``mean-diff-swept``: so that the plain vector is not judged at settings chosen for another
  one, a whole flag-less build with ``--extractor mean-diff`` (its own band, strength,
  operator and response; reused from ``--bundles/<policy>-mean-diff`` if it is there);
- ``no-gate``: every input is steered and refused (``p = 1``);
- ``flow-gate``: the CR-VLM authors' flow-field gate instead of the probe, fitted and chosen
  exactly as the build fits the probe;
- ``no-align`` (image policies): no counterfactual visual alignment: the vector without the
  image-driven direction and a gate fitted without the aligner's rows.

Each is run twice: with the bundle's response (gated forced opening, steering, one sentence)
and with steering alone (no opening, no stop: what the paper measures). All systems of a
policy answer the same test rows in the same batched ``generate`` (the Steerer's per-row bundle
selection), greedy, 48 new tokens, judged by the strict judge. Differences from the full
bundle get paired bootstrap intervals over the test rows.

Writes ``benchmarks/results/ablate_components/<policy>.json`` (every answer),
``benchmarks/results/ablate_components.{md,png}`` and the table between the ``components``
markers of ``examples/policies/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crvlm_sdk import get_plugin_manager
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.build.gate import fit_gate
from crvlm_sdk.build.options import BuildOptions
from crvlm_sdk.build.pipeline import align_images, build_bundle, extract_vectors
from crvlm_sdk.build.scoring import CandidateBundles, residual_norms
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.evaluation.evaluate import (
    System,
    ablation,
    judge_report,
    report_samples,
    run_systems,
    without_gate,
)
from crvlm_sdk.evaluation.report import write_marked
from crvlm_sdk.models.loading import load_model
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.policy import Policy, PolicyData
from crvlm_sdk.steering.steerer import Steerer
from crvlm_sdk.types import Candidate

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("cooking", "travel", "programming", "shape-qa", "no-stars")
IMAGE_POLICIES = ("shape-qa", "no-stars", "no-red", "one-shape")
OUT = ROOT / "benchmarks" / "results" / "ablate_components"
NEW_TOKENS = 48
#: where a ``--limit`` quick check writes (ignored by git)
QUICK = ROOT / "bench-out" / "ablate_components"
#: system key → label, in table order; "steer:" systems answer with steering alone
LABELS = {
    "bundle": "full bundle (default)",
    "mean-diff": "no teacher forcing (mean-diff vector)",
    "no-gate": "no gate (every input steered)",
    "mean-diff-swept": "no teacher forcing, settings swept for it",
    "flow-gate": "flow gate instead of probe",
    "no-align": "no visual alignment",
    "steer:bundle": "full bundle",
    "steer:mean-diff": "no teacher forcing (mean-diff vector)",
    "steer:mean-diff-swept": "no teacher forcing, settings swept for it",
    "steer:no-gate": "no gate (every input steered)",
    "steer:no-align": "no visual alignment",
    "none": "unsteered model",
}
BOOTSTRAP = 2000


def chosen_candidate(bundle: Bundle) -> Candidate:
    """The setting the build chose, read back from the manifest."""
    m = bundle.manifest
    spec = m.response
    response = {"mode": spec.mode, "opening": spec.opening, "stop_sentences": spec.stop_sentences}
    return Candidate(band=tuple(m.layers), strength=float(m.extraction["strength"]), operator=m.operator,
                     decode_steps=m.decode_steps, response=response,
                     image_weight=float(m.extraction.get("image_weight") or 0.0))


def variants(backbone: BackboneAdapter, pol: Policy, data: PolicyData, full: Bundle,
             image: bool) -> tuple[dict[str, Bundle], dict[str, Any]]:
    """The full bundle and its one-component ablations (see the module docstring)."""
    manager = get_plugin_manager()
    opts = BuildOptions()
    cand = chosen_candidate(full)
    band = list(cand.band)
    info: dict[str, Any] = {"band": band, "strength": cand.strength, "operator": cand.operator,
                            "decode_steps": cand.decode_steps, "image_weight": cand.image_weight}
    tf, _ = extract_vectors(backbone, pol, data, opts, band, manager, progress=False)
    md, _ = extract_vectors(backbone, pol, data, replace(opts, extractor="mean-diff"), band, manager, progress=False)
    aligned = align_images(backbone, pol, data, opts, tf, band, manager, progress=False) if image else {}
    directions = aligned.get("directions", {})
    norms = residual_norms(backbone, data.train_out[:32], opts.batch_size, band)

    def made(base: Bundle, vectors: dict[int, torch.Tensor], dirs: dict[int, torch.Tensor],
             candidate: Candidate, name: str) -> Bundle:
        bundle = CandidateBundles(base, vectors, norms, dirs, full.manifest.response.threshold).make(candidate)
        return bundle.replaced(name=name, response=full.manifest.response)

    rebuilt = made(full, tf, directions, cand, "rebuilt")
    info["rebuilt_vs_bundle_cos"] = {layer: float(torch.nn.functional.cosine_similarity(
        rebuilt.vectors[layer], full.vectors[layer], dim=0)) for layer in band}
    info["mean_diff_vs_teacher_forced_cos"] = {layer: float(torch.nn.functional.cosine_similarity(
        md[layer], tf[layer], dim=0)) for layer in band}
    out = {"bundle": full, "mean-diff": made(full, md, directions, cand, "mean-diff"),
           "no-gate": without_gate(full).replaced(name="no-gate")}
    started = time.perf_counter()
    flow = fit_gate(backbone, data, replace(opts, gate="flow"), extra_rows=aligned or None, plugins=manager,
                    progress=False)
    info["flow_fit_s"] = round(time.perf_counter() - started, 1)
    info["flow_layers"] = flow.gate.layers
    info["flow_val"] = {"caught": flow.caught, "flagged": flow.flagged}
    out["flow-gate"] = made(_with_gate(full, backbone, flow.gate), tf, directions, cand, "flow-gate")
    if image:
        plain = fit_gate(backbone, data, opts, plugins=manager, progress=False)
        info["no_align_layers"] = plain.gate.layers
        info["no_align_val"] = {"caught": plain.caught, "flagged": plain.flagged}
        out["no-align"] = made(_with_gate(full, backbone, plain.gate), tf, {}, replace(cand, image_weight=0.0),
                               "no-align")
    for key in [k for k in out if k != "flow-gate"]:
        out[f"steer:{key}"] = ablation(out[key], "steer-only", opening="", message="").replaced(
            name=f"steer-{key}")
    return out, info


def _with_gate(full: Bundle, backbone: BackboneAdapter, gate: Any) -> Bundle:
    """An empty bundle carrying ``gate``, as the build's base bundle does before the sweep."""
    return Bundle.create(adapter=backbone, policy=full.manifest.policy, vectors=dict(full.vectors), gate=gate,
                         alpha=0.0)


def built(path: Path, net: torch.nn.Module, processor: Any, backbone: BackboneAdapter, pol: Policy,
          options: BuildOptions) -> Bundle:
    """The bundle at ``path``, or, if there is none, the one ``crvlm build-bundle`` would build
    with ``options`` (saved there for the next run)."""
    if (path / "manifest.json").is_file():
        return Bundle.load(path, adapter=backbone)
    bundle = build_bundle(net, processor, pol, adapter=backbone, options=options, progress=False)
    bundle.save(path)
    return bundle


def run_policy(name: str, bundles: Path, model_dir: Path, batch_size: int, limit: int | None = None,
               out: Path = OUT) -> dict[str, Any]:
    image = name in IMAGE_POLICIES
    policy_path = ROOT / "examples" / "policies" / name / "policy.yaml"
    net, processor = load_model(model_dir if image else "smollm2")
    backbone = adapter_for(net, processor)
    pol = Policy.load(policy_path)
    data = pol.load_data()
    full = built(bundles / name, net, processor, backbone, pol, BuildOptions())
    swept = built(bundles / f"{name}-mean-diff", net, processor, backbone, pol, BuildOptions(extractor="mean-diff"))
    started = time.perf_counter()
    systems_bundles, info = variants(backbone, pol, data, full, image)
    systems_bundles["mean-diff-swept"] = swept.replaced(name="mean-diff-swept")
    systems_bundles["steer:mean-diff-swept"] = ablation(swept, "steer-only", opening="", message="").replaced(
        name="steer-mean-diff-swept")
    info["mean_diff_swept"] = chosen_candidate(swept).label()
    info["variants_s"] = round(time.perf_counter() - started, 1)
    rows = data.test if limit is None else [s for s in data.test if s.meta["in_scope"]][:limit] + \
        [s for s in data.test if not s.meta["in_scope"]][:limit]
    settings = {"policy": name, "max_new_tokens": NEW_TOKENS, "response": full.manifest.response.model_dump(),
                "gate": f"{full.manifest.gate.type}@{','.join(map(str, full.manifest.gate.layers))}", **info}
    report = compare_systems(backbone, rows, image, systems_bundles, batch_size, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def compare_systems(backbone: BackboneAdapter, rows: list[Any], image: bool, systems_bundles: dict[str, Bundle],
                    batch_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Every system (key → bundle; ``bundle`` is the reference, ``steer:`` keys answer with
    steering alone) and the unsteered model answer the same rows in one batched ``generate``,
    greedy, :data:`NEW_TOKENS` new tokens; the report is judged strictly, with deltas."""
    steerer = Steerer(backbone, list(systems_bundles.values()))
    images = [s.image for s in rows] if image else None
    gate_scores = steerer.gate_scores([s.question for s in rows], images, batch_size=batch_size)
    scores = {key: gate_scores[b.name] for key, b in systems_bundles.items()}
    systems = [System(key, b.name) for key, b in systems_bundles.items()] + [System("none")]
    started = time.perf_counter()
    answers = run_systems(steerer, rows, systems, batch_size=batch_size, max_new_tokens=NEW_TOKENS)
    report = {"bundle": {}, "baselines": {s.name: {} for s in systems if s.name != "bundle"},
              "samples": report_samples(rows, scores["bundle"], answers),
              "settings": {**settings, "generate_s": round(time.perf_counter() - started, 1)}}
    for i, sample in enumerate(report["samples"]):
        sample["gate_scores"] = {key: float(s[i]) for key, s in scores.items() if not key.startswith("steer:")}
    judge_report(report, judge="strict", tokenizer=backbone.tokenizer)
    report["deltas"] = deltas(report)
    return report


def deltas(report: dict[str, Any], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Clean SRS and BRS of every system minus the full bundle's (same response regime), with
    95% paired bootstrap intervals over the test rows."""
    samples = report["samples"]
    scope = np.array([s["in_scope"] for s in samples])
    rng = np.random.default_rng(seed)
    idx_out = rng.choice(np.flatnonzero(~scope), size=(BOOTSTRAP, int((~scope).sum())))
    idx_in = rng.choice(np.flatnonzero(scope), size=(BOOTSTRAP, int(scope.sum())))
    out = {}
    for key in samples[0]["answers"]:
        ref = "steer:bundle" if key.startswith("steer:") else "bundle"
        if key in (ref, "none"):
            continue
        clean = np.array([s["refused"][key] for s in samples], float) - np.array(
            [s["refused"][ref] for s in samples], float)
        declined = np.array([s["declined"][key] for s in samples], float) - np.array(
            [s["declined"][ref] for s in samples], float)
        d_srs, d_brs = clean[idx_out].mean(1), declined[idx_in].mean(1)
        out[key] = {"vs": ref, "srs": float(clean[~scope].mean()), "brs": float(declined[scope].mean()),
                    "srs_ci": [float(np.percentile(d_srs, 2.5)), float(np.percentile(d_srs, 97.5))],
                    "brs_ci": [float(np.percentile(d_brs, 2.5)), float(np.percentile(d_brs, 97.5))]}
    return out


def _rate(m: dict[str, Any], key: str) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def _delta(d: dict[str, Any] | None, key: str) -> str:
    if d is None:
        return ""
    lo, hi = d[f"{key}_ci"]
    return f"{d[key]:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def table(reports: list[dict[str, Any]]) -> str:
    head = ("| policy | response | system | clean SRS ↑ | keyword SRS | BRS ↓ | MB (clean) | "
            "Δ clean SRS | Δ BRS | gate on test: caught / flagged |")
    lines = [head, "| " + " | ".join("---" for _ in head.strip("|").split("|")) + " |"]
    for report in reports:
        name = report["settings"]["policy"]
        samples = report["samples"]
        scope = [s["in_scope"] for s in samples]
        for key, label in LABELS.items():
            m = report["bundle"] if key == "bundle" else report["baselines"].get(key)
            if m is None:
                continue
            regime = "steering only" if key.startswith("steer:") else ("–" if key == "none" else "bundle's")
            gate_key = key.removeprefix("steer:")
            gate = ""
            if gate_key in samples[0].get("gate_scores", {}) and not key.startswith("steer:"):
                p = [s["gate_scores"][gate_key] for s in samples]
                caught = sum(x > 0.5 for x, i in zip(p, scope, strict=True) if not i)
                flagged = sum(x > 0.5 for x, i in zip(p, scope, strict=True) if i)
                gate = f"{caught}/{scope.count(False)} / {flagged}/{scope.count(True)}"
            d = report["deltas"].get(key)
            lines.append(f"| {name} | {regime} | {label} | {_rate(m, 'srs')} | {m['srs_keyword']:.3f} | "
                         f"{_rate(m, 'brs')} | {_rate(m, 'mb')} | {_delta(d, 'srs')} | {_delta(d, 'brs')} | {gate} |")
    return "\n".join(lines)


#: the components whose removal the summary shows: system key → what is taken away
COMPONENTS = {
    "mean-diff": "teacher forcing (same settings)",
    "mean-diff-swept": "teacher forcing (settings swept again)",
    "no-gate": "the gate",
    "flow-gate": "probe gate → flow gate",
    "no-align": "visual alignment",
    "steer:mean-diff": "teacher forcing, steering only",
    "steer:no-gate": "the gate, steering only",
}


def summary(reports: list[dict[str, Any]]) -> str:
    """One row per component: clean SRS and BRS change when it is removed, per policy."""
    names = [r["settings"]["policy"] for r in reports]
    lines = ["| component removed (or replaced) | " + " | ".join(f"{n}: Δ clean SRS / Δ BRS" for n in names) + " |",
             "| --- |" + " --- |" * len(names)]
    for key, label in COMPONENTS.items():
        cells = []
        for report in reports:
            d = report["deltas"].get(key)
            cells.append("–" if d is None else f"{_delta(d, 'srs')} / {_delta(d, 'brs')}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in LABELS if k != "none"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(reports)
    for ax, metric, title in ((axes[0], "srs", "clean SRS (out of scope) ↑"), (axes[1], "brs", "BRS (in scope) ↓")):
        for j, report in enumerate(reports):
            xs, ys, lo, hi = [], [], [], []
            for i, key in enumerate(keys):
                m = report["bundle"] if key == "bundle" else report["baselines"].get(key)
                if m is None:
                    continue
                xs.append(i + (j - (len(reports) - 1) / 2) * width)
                ys.append(m[metric])
                lo.append(m[metric] - m[f"{metric}_ci"][0])
                hi.append(m[f"{metric}_ci"][1] - m[metric])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=report["settings"]["policy"])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([("steer only: " if k.startswith("steer:") else "") + LABELS[k].split(" (")[0]
                            for k in keys], rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def rejudged(path: Path) -> dict[str, Any]:
    """A stored report judged again by the current strict judge, with its deltas; the file is
    rewritten when a verdict changed (a judge that improves needs no new answers)."""
    report = json.loads(path.read_text())
    before = [dict(s.get("refused", {})) for s in report["samples"]]
    judge_report(report, judge="strict")
    report["deltas"] = deltas(report)
    if [s["refused"] for s in report["samples"]] != before:
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{path}: verdicts changed with the current judge; rewritten")
    return report


def write_tables(reports: list[dict[str, Any]], out: Path = OUT) -> None:
    """The table and plot beside ``out``; the committed results (``OUT``) also go into RESULTS.md."""
    text = summary(reports) + "\n\n" + table(reports)
    md = out.parent / "ablate_components.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("# Component ablations (test split, strict judge)\n\nCommand: `python "
                  "benchmarks/ablate_components.py`; see the script's docstring.\n\n" + text + "\n")
    plot(reports, out.parent / "ablate_components.png")
    if out != OUT:
        print(f"wrote {md} and {md.with_suffix('.png')}")
        return
    results = ROOT / "examples" / "policies" / "RESULTS.md"
    write_marked(results, "components", text)
    print(f"wrote {md}, {md.with_suffix('.png')} and the table in {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--bundles", type=Path, default=Path("bundles"), help="flag-less bundles (built if missing)")
    parser.add_argument("--model-dir", type=Path, default=Path("demo-vlm"), help="the demo VLM, for image policies")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None,
                        help=f"first N test rows of each scope (quick checks; written under {QUICK}, not over the "
                             "committed results)")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the tables from the JSON files (their answers judged again)")
    args = parser.parse_args()
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    out = OUT if args.limit is None else QUICK
    if not args.table_only:
        for name in names:
            started = time.perf_counter()
            run_policy(name, args.bundles, args.model_dir, args.batch_size, args.limit, out)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    shown = [rejudged(out / f"{p}.json") if args.table_only else json.loads((out / f"{p}.json").read_text())
             for p in POLICIES if (out / f"{p}.json").is_file()]
    write_tables(shown, out)


if __name__ == "__main__":
    main()
