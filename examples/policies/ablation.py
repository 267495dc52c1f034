"""Regenerate the response ablation table of examples/policies/RESULTS.md (test splits).

    python examples/policies/ablation.py                 # the five example policies
    python examples/policies/ablation.py --policies cooking,travel
    python examples/policies/ablation.py --policies gardening,no-red --marker unseen

For each policy it runs exactly what a user would run, through the ``crvlm`` command:

1. ``crvlm build-bundle --policy P --out bundles/P`` with no other flag (image policies add
   ``--model demo-vlm``; the demo VLM is assembled first if missing);
2. ``crvlm eval --bundle bundles/P --policy P --out examples/policies/P/report --baseline all``:
   the bundle, the unsteered model, no gate, the system prompt and every response ablation;
3. a bundle built for pure steering (``--mode steer --opening '' --stop never``, so the sweep
   ranks steering alone by clean refusals) and its evaluation (``report-steer-only/``);

then writes the table between the ``--marker`` markers of RESULTS.md (default ``ablation``)
from the reports.
Bundles already in ``--bundles`` are reused unless ``--rebuild`` is given. About 15 minutes
per policy on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from crvlm_sdk.evaluation.report import write_marked

HERE = Path(__file__).resolve().parent
POLICIES = ("cooking", "travel", "programming", "shape-qa", "no-stars")
IMAGE_POLICIES = ("shape-qa", "no-stars", "no-red", "one-shape")
PURE_STEER = ["--mode", "steer", "--opening", "", "--stop", "never"]
#: (system key in report.json, label, steering, opening, stop) in table order
ROWS = (
    ("steer-only", "steering only", "✓", "", ""),
    ("steer+stop", "steering, stop", "✓", "", "✓"),
    ("opening-only", "opening only", "", "✓", ""),
    ("opening+stop", "opening, stop", "", "✓", "✓"),
    ("opening+steer", "opening + steering", "✓", "✓", ""),
    ("opening+steer+stop", "opening + steering, stop", "✓", "✓", "✓"),
    ("template", "template answer", "", "", ""),
    ("system-prompt", "system prompt", "", "", ""),
    ("none", "unsteered", "", "", ""),
)


def crvlm(*args: str) -> None:
    command = [sys.executable, "-m", "crvlm_sdk.cli", *args]
    print("$ crvlm " + " ".join(repr(a) if not a or " " in a else a for a in args), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    print(f"  ({time.monotonic() - started:.0f}s)", flush=True)


def run_policy(name: str, bundles: Path, model_dir: Path, rebuild: bool) -> None:
    policy = HERE / name / "policy.yaml"
    model = ["--model", str(model_dir)] if name in IMAGE_POLICIES else []
    for suffix, flags, report, baselines in (("", [], "report", "all"),
                                            ("-steer-only", PURE_STEER, "report-steer-only", "none")):
        out = bundles / f"{name}{suffix}"
        if rebuild or not (out / "manifest.json").is_file():
            crvlm("build-bundle", "--policy", str(policy), "--out", str(out), "--overwrite", *model, *flags)
        crvlm("eval", "--bundle", str(out), "--policy", str(policy), "--out", str(HERE / name / report),
              "--baseline", baselines, "--overwrite", *model)


def _rate(m: dict, key: str) -> str:
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def _line(label: str, flags: tuple[str, str, str], m: dict, bold: bool = False) -> str:
    cells = [label, *flags, _rate(m, "srs"), f"{m['srs_keyword']:.3f}" if m.get("srs_keyword") is not None else "–",
             _rate(m, "brs"), "–" if m["answer_accuracy"] is None else f"{m['answer_accuracy']:.3f}",
             f"{m['in_changed']}/{m['n_in']}", f"{m['in_degraded']}/{m['n_in']}"]
    if bold:
        cells[0] = f"**{cells[0]}**"
        cells[4] = f"**{cells[4]}**"
    return "| " + " | ".join(cells) + " |"


def summary(policies: list[str]) -> str:
    """One row per policy: the flag-less bundle on the test split, next to the unsteered model."""
    lines = ["| policy | chosen on validation | clean SRS ↑ | keyword SRS | BRS ↓ | accuracy (unsteered) | "
             "gate-passed in-scope answered as unsteered | degraded | build |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in policies:
        report = json.loads((HERE / name / "report" / "report.json").read_text())
        manifest = json.loads((HERE / name / "report" / "bundle-manifest.json").read_text())
        b, plain = report["bundle"], report["baselines"]["none"]
        resp = manifest["response"]
        if resp["mode"] == "template":
            chosen = "template answer"
        else:
            steps = "all" if manifest["decode_steps"] is None else manifest["decode_steps"]
            steering = "no steering" if manifest["alpha"] == 0 else (
                f"{manifest['operator']} {manifest['layers']} × {manifest['extraction']['strength']:g}, {steps} tok")
            chosen = f"{steering}; opening {resp['opening']!r}, stop {resp['stop_sentences']}"
        acc = "–" if b["answer_accuracy"] is None else (
            f"{b['answer_accuracy']:.3f} ({plain['answer_accuracy']:.3f})")
        lines.append(f"| {name} | {chosen} | {_rate(b, 'srs')} | {b['srs_keyword']:.3f} | {_rate(b, 'brs')} | {acc} | "
                     f"{b['passed_same']}/{b['passed_n']} | {b['in_degraded']}/{b['n_in']} | "
                     f"{manifest['validation']['build_seconds']:.0f} s |")
    return "\n".join(lines)


def table(policies: list[str]) -> str:
    head = ("| system | steering | opening | stop | clean SRS ↑ | keyword SRS | BRS ↓ | accuracy | "
            "in-scope changed | degraded |")
    lines = []
    for name in policies:
        report = json.loads((HERE / name / "report" / "report.json").read_text())
        pure = HERE / name / "report-steer-only" / "report.json"
        settings = report["settings"]
        resp = settings["response"]
        lines += [f"**{name}** — flag-less bundle: {'template answer' if resp['mode'] == 'template' else 'steering'}"
                  f" (layers {settings['bundle_layers']}, {settings['bundle_operator']}, "
                  f"{settings['decode_steps']} steered tokens), opening {resp['opening']!r}, stop "
                  f"{resp['stop_sentences']}; gate {settings['gate']}. {report['bundle']['n_out']} out-of-scope / "
                  f"{report['bundle']['n_in']} in-scope test questions.", "", head,
                  "| " + " | ".join("---" for _ in head.strip("|").split("|")) + " |"]
        b = report["bundle"]
        lines.append(_line("bundle as built (default)", ("", "", ""), b, bold=True) + "")
        if pure.is_file():
            lines.append(_line("steering only, swept for it", ("✓", "", ""), json.loads(pure.read_text())["bundle"]))
        for key, label, *flags in ROWS:
            if key in report["baselines"]:
                lines.append(_line(label, tuple(flags), report["baselines"][key]))
        lines.append("")
    return "\n".join(lines)


def write_table(policies: list[str], marker: str) -> None:
    results = HERE / "RESULTS.md"
    write_marked(results, marker, f"{summary(policies)}\n\n{table(policies)}")
    print(f"wrote the ablation table for {', '.join(policies)} into {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--bundles", type=Path, default=Path("bundles"), help="where bundles are built")
    parser.add_argument("--model-dir", type=Path, default=Path("demo-vlm"), help="demo VLM directory")
    parser.add_argument("--rebuild", action="store_true", help="rebuild bundles that already exist")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the reports")
    parser.add_argument("--marker", default="ablation", help="which table of RESULTS.md to write")
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not args.table_only:
        if any(p in IMAGE_POLICIES for p in policies) and not (args.model_dir / "config.json").is_file():
            crvlm("demo-model", "--out", str(args.model_dir), "--overwrite")
        for name in policies:
            run_policy(name, args.bundles, args.model_dir, args.rebuild)
    shown = [p for p in POLICIES if _has_new_report(p)] if args.marker == "ablation" else policies
    write_table(shown, args.marker)


def _has_new_report(name: str) -> bool:
    """Whether the policy's report was written by an evaluation with the response ablations."""
    path = HERE / name / "report" / "report.json"
    return path.is_file() and "response" in json.loads(path.read_text())["settings"]


if __name__ == "__main__":
    main()
