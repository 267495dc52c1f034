"""Evaluation of a bundle against baselines on labelled questions, and the written report.

Systems compared on the same rows, prompts and decoding settings:

- ``bundle``: the bundle as shipped (gated steering);
- ``none``: the unsteered model;
- ``no-gate``: the bundle's vectors applied to every input (``p = 1``);
- ``system-prompt``: the unsteered model with the policy's refusal instruction as system message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.bundle import Bundle, GateSpec
from crvlm_sdk.capture import progress_bar
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.interfaces import Sample
from crvlm_sdk.metrics import answer_matches, compute_metrics
from crvlm_sdk.plugins import PluginManager, get_plugin_manager
from crvlm_sdk.steerer import Steerer

BASELINES = ("none", "no-gate", "system-prompt")


def without_gate(bundle: Bundle) -> Bundle:
    """The same vectors with the ``always`` gate: steering on every input."""
    manifest = bundle.manifest.model_copy(
        update={"gate": GateSpec(type="always", layer=bundle.manifest.gate.layer, params=[], config={})}
    )
    return replace(bundle, manifest=manifest, gate_tensors={})


def run_system(
    steerer: Steerer,
    rows: Sequence[Sample],
    *,
    steer: bool,
    system: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Greedy answers and first-token logits for ``rows``, in batches."""
    texts: list[str] = []
    logits: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [s.image for s in chunk]
        gen = steerer.generate_detailed(
            [s.question for s in chunk], images if any(i is not None for i in images) else None,
            system=system, steer=steer, max_new_tokens=max_new_tokens,
        )
        texts.extend(gen.texts)
        logits.append(gen.first_logits)
        if on_batch is not None:
            on_batch(len(chunk))
    return texts, torch.cat(logits)


def evaluate(
    steerer: Steerer,
    rows: Sequence[Sample],
    *,
    baselines: Sequence[str] = BASELINES,
    system_prompt: str | None = None,
    judge: str = "keyword",
    batch_size: int = 16,
    max_new_tokens: int = 48,
    progress: bool = True,
    plugins: PluginManager | None = None,
) -> dict[str, Any]:
    """Run the bundle and ``baselines`` on labelled ``rows``; returns the report as a dict."""
    if len(steerer.bundle_names) != 1:
        raise CrvlmError("evaluate one bundle at a time")
    if not rows:
        raise CrvlmError("no evaluation rows")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise CrvlmError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    for s in rows:
        if "in_scope" not in s.meta:
            raise CrvlmError(f"evaluation row {s.question!r} has no `in_scope` label")
    manager = plugins or get_plugin_manager()
    judge_impl = manager.get("judge", judge)()
    bundle = steerer._loaded[0].bundle
    instruction = system_prompt or bundle.manifest.extraction.get("refusal_instruction")
    if "system-prompt" in baselines and not instruction:
        raise CrvlmError("the system-prompt baseline needs the refusal instruction",
                         hint="pass --policy, or a bundle built by crvlm build-bundle")
    no_gate = Steerer(steerer.adapter, [without_gate(bundle)], plugins=manager)
    plan: list[tuple[str, Steerer, bool, str | None]] = [("bundle", steerer, True, None)]
    for name in baselines:
        if name == "none":
            plan.append((name, steerer, False, None))
        elif name == "no-gate":
            plan.append((name, no_gate, True, None))
        else:
            plan.append((name, steerer, False, instruction))

    in_scope = [bool(s.meta["in_scope"]) for s in rows]
    scores = steerer.gate_scores([s.question for s in rows], _images(rows), batch_size=batch_size)[bundle.name]
    answers: dict[str, list[str]] = {}
    verdicts: dict[str, list[bool]] = {}
    with progress_bar(progress) as bar:
        for name, runner, steer, system in plan:
            task = bar.add_task(f"eval {name}", total=len(rows))
            texts, first = run_system(runner, rows, steer=steer, system=system, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, on_batch=lambda n, t=task: bar.advance(t, n))
            answers[name] = texts
            verdicts[name] = judge_impl.judge(texts, first_logits=first, tokenizer=steerer.adapter.tokenizer)
    results: dict[str, Any] = {}
    for name in answers:
        correct = [answer_matches(a, s.answer) if s.answer is not None else None
                   for a, s in zip(answers[name], rows, strict=True)]
        results[name] = compute_metrics(verdicts[name], in_scope, correct).as_dict()
    samples = []
    for i, s in enumerate(rows):
        samples.append({
            "question": s.question,
            "image": None if s.image is None else str(s.image),
            "in_scope": in_scope[i],
            "reference_answer": s.answer,
            "gate_score": float(scores[i]),
            "answers": {name: answers[name][i] for name in answers},
            "refused": {name: verdicts[name][i] for name in answers},
        })
    return {
        "bundle": results["bundle"],
        "baselines": {name: results[name] for name in baselines},
        "samples": samples,
        "settings": {"judge": judge, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "policy": bundle.manifest.policy.name, "system_prompt": instruction,
                     "bundle_layers": bundle.manifest.layers, "bundle_alpha": bundle.manifest.alpha,
                     "gate": f"{bundle.manifest.gate.type}@{bundle.manifest.gate.layer}"},
    }


def _images(rows: Sequence[Sample]) -> list[Any] | None:
    images = [s.image for s in rows]
    return images if any(i is not None for i in images) else None


def _fmt(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def systems_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of (system, SRS, BRS, MB, accuracy) with intervals, bundle first."""
    rows = []
    for name, m in [("bundle", report["bundle"]), *report["baselines"].items()]:
        rows.append([name, _fmt(m["srs"], m["srs_ci"]), _fmt(m["brs"], m["brs_ci"]), _fmt(m["mb"], m["mb_ci"]),
                     _fmt(m["answer_accuracy"], m["answer_accuracy_ci"])])
    return rows


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``report.json``, ``report.md`` and PNG plots into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["bundle"]
    lines = [
        f"# crvlm evaluation: {report['settings']['policy']}",
        "",
        f"{m['n_out']} out-of-scope and {m['n_in']} in-scope questions; judge `{report['settings']['judge']}`; "
        f"greedy, {report['settings']['max_new_tokens']} new tokens. Intervals are 95%.",
        "",
        "| system | SRS ↑ | BRS ↓ | MB ↑ | answer accuracy |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {' | '.join(r)} |" for r in systems_table(report)],
        "",
        "![gate scores](gate_scores.png) ![refusal rates](rates.png)",
        "",
        "## Disagreements between the bundle and the unsteered model",
        "",
    ]
    for s in report["samples"]:
        if s["refused"]["bundle"] != (not s["in_scope"]):
            label = "in-scope answered as refusal" if s["in_scope"] else "out-of-scope not refused"
            lines.append(f"- **{label}** (gate {s['gate_score']:.2f}): {s['question']} → "
                         f"{s['answers']['bundle'][:120]!r}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written += _plots(report, out)
    return written


def _plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores_in = [s["gate_score"] for s in report["samples"] if s["in_scope"]]
    scores_out = [s["gate_score"] for s in report["samples"] if not s["in_scope"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i / 20 for i in range(21)]
    ax.hist(scores_in, bins=bins, alpha=0.6, label=f"in scope (n={len(scores_in)})", color="tab:green")
    ax.hist(scores_out, bins=bins, alpha=0.6, label=f"out of scope (n={len(scores_out)})", color="tab:red")
    ax.set_xlabel("gate score p(x)")
    ax.set_ylabel("questions")
    ax.set_title("Gate scores on the evaluation set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gate_scores.png", dpi=110)
    plt.close(fig)

    systems = [("bundle", report["bundle"]), *report["baselines"].items()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(systems))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [m["srs"] for _, m in systems], width, label="SRS (refuse out-of-scope)",
           color="tab:red")
    ax.bar([i + width / 2 for i in x], [m["brs"] for _, m in systems], width, label="BRS (refuse in-scope)",
           color="tab:green")
    ax.set_xticks(list(x), [name for name, _ in systems])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate")
    ax.set_title("Refusal rates per system")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=110)
    plt.close(fig)
    return [out / "gate_scores.png", out / "rates.png"]
