"""A report on disk: ``report.json``, a Markdown summary a person reads, and two plots."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.files import REPORT, atomic_directory


def _fmt(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


TABLE_COLUMNS = ("system", "clean SRS ↑", "keyword SRS", "BRS ↓", "MB ↑", "answer accuracy",
                 "in-scope changed", "degraded")


def systems_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of :data:`TABLE_COLUMNS` with intervals, bundle first."""
    rows = []
    for name, m in [("bundle", report["bundle"]), *report["baselines"].items()]:
        rows.append([
            name, _fmt(m["srs"], m["srs_ci"]), _fmt(m.get("srs_keyword"), None), _fmt(m["brs"], m["brs_ci"]),
            _fmt(m["mb"], m["mb_ci"]), _fmt(m["answer_accuracy"], m["answer_accuracy_ci"]),
            f"{m['in_changed']}/{m['n_in']}", f"{m['in_degraded']}/{m['n_in']}",
        ])
    return rows


def write_report(report: dict[str, Any], out: Path, *, overwrite: bool = False,
                 bundle_manifest: str | None = None) -> list[Path]:
    """``report.json``, ``report.md``, PNG plots and (given) the evaluated bundle's
    ``bundle-manifest.json``, written together: an existing report at ``out`` is replaced only
    with ``overwrite``, and an interrupted write leaves it as it was."""
    target = Path(out)
    with atomic_directory(target, REPORT, overwrite=overwrite) as tmp:
        names = _write_files(report, tmp, bundle_manifest)
    return [target / name for name in names]


def _write_files(report: dict[str, Any], out: Path, bundle_manifest: str | None) -> list[str]:
    written = [out / "report.json", out / "report.md"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if bundle_manifest is not None:
        (out / "bundle-manifest.json").write_text(bundle_manifest)
        written.append(out / "bundle-manifest.json")
    m = report["bundle"]
    settings = report["settings"]
    response = ResponseSpec.model_validate(settings["response"])
    lines = [
        f"# crvlm evaluation: {settings['policy']}",
        "",
        f"{m['n_out']} out-of-scope and {m['n_in']} in-scope questions; judge `{settings['judge']}`; greedy, "
        f"{settings['max_new_tokens']} new tokens. Bundle response: {response.describe()}. Intervals are 95%.",
        "",
        "Clean SRS counts only refusals a user can be shown (they decline, do not loop, are made of words, "
        "stay a refusal and end); keyword SRS counts any declining opening; BRS counts every in-scope answer "
        "that declines. *In-scope changed*: answers that differ from the unsteered model's; *degraded*: "
        "in-scope answers that loop or are not words where the unsteered one was fine.",
        "",
        f"Of the {m['passed_n']} in-scope questions the gate passed, {m['passed_same']} were answered exactly as "
        "by the unsteered model.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |",
        *[f"| {' | '.join(r)} |" for r in systems_table(report)],
        "",
        "![gate scores](gate_scores.png) ![refusal rates](rates.png)",
        "",
        "## What refused users read (bundle, out-of-scope questions)",
        "",
    ]
    outs = [s for s in report["samples"] if not s["in_scope"]]
    for s in outs[:15]:
        verdict = "clean" if s["refused"]["bundle"] else f"not clean: {s['reason']['bundle']}"
        lines.append(f"- {s['question']} → {s['answers']['bundle'][:160]!r} ({verdict})")
    lines += ["", "## Where the bundle missed", ""]
    for s in report["samples"]:
        if s["in_scope"] and s["declined"]["bundle"]:
            label = "in-scope refused"
        elif not s["in_scope"] and not s["refused"]["bundle"]:
            label = f"out-of-scope not cleanly refused ({s['reason']['bundle']})"
        else:
            continue
        lines.append(f"- **{label}** (gate {s['gate_score']:.2f}): {s['question']} → {s['answers']['bundle'][:120]!r}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written += _plots(report, out)
    return [path.name for path in written]


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
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(systems)), 3.8))
    x = range(len(systems))
    width = 0.27
    ax.bar([i - width for i in x], [m.get("srs_keyword") or 0 for _, m in systems], width,
           label="keyword SRS (any declining opening)", color="tab:orange")
    ax.bar(list(x), [m["srs"] for _, m in systems], width, label="clean SRS (refuse out-of-scope)", color="tab:red")
    ax.bar([i + width for i in x], [m["brs"] for _, m in systems], width, label="BRS (refuse in-scope)",
           color="tab:green")
    ax.set_xticks(list(x), [name for name, _ in systems], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate")
    ax.set_title("Refusal rates per system")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=110)
    plt.close(fig)
    return [out / "gate_scores.png", out / "rates.png"]


def write_marked(path: Path, marker: str, block: str) -> None:
    """Put ``block`` between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in the
    Markdown file ``path`` (appended with its markers if absent), so a results document can be
    regenerated table by table while the prose around the tables stays as written."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    marked = f"{start}\n{block}\n{end}"
    text = path.read_text()
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: marked, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + marked + "\n"
    path.write_text(text)
