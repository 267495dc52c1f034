"""Wall time of the flag-less ``crvlm build-bundle`` now against the one before response shaping.

Run:  python benchmarks/bench_default_build.py [--policy travel] [--before e16ac43]

Both builds run in this one invocation, one after the other, as fresh ``crvlm build-bundle``
processes on SmolLM2-135M-Instruct with no flag but ``--policy`` and ``--out`` (model loading
included, as a user waits for it):

- **before** (``--before``, default ``e16ac43``, the last commit before the strict judge): its
  default sweep tried 18 additive band × strength candidates one at a time on 24 + 24
  validation rows, ranked by the keyword judge, then re-scored the winner on the whole split;
- **now**: the staged sweep of ``plugins/locators.py`` (17 candidates: steering, steered tokens,
  response settings and the template answer) on the whole validation split, ranked by clean
  refusals, each stage one batched ``generate``.

The old code is checked out with ``git worktree`` into a temporary directory and imported from
there (its ``plugins/`` and ``adapters/`` folders linked under their package names). Each
build's validation figures are printed next to its time; they are not comparable one to one
(the old figures count keyword refusals on the old split sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(policy: Path, out: Path, pythonpath: str | None) -> float:
    env = dict(os.environ, COLUMNS="160")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    started = time.perf_counter()
    # cwd outside the checkout: ``python -c`` puts the working directory first on sys.path, which
    # would import this checkout's crvlm_sdk instead of the old one.
    subprocess.run([sys.executable, "-c", "from crvlm_sdk.cli import app; app()", "build-bundle",
                    "--policy", str(policy), "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL,
                   cwd=out.parent)
    return time.perf_counter() - started


def old_tree(commit: str, where: Path) -> str:
    """A checkout of ``commit`` importable as crvlm_sdk / crvlm_plugins / crvlm_adapters."""
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shim = where / "shim"
    shim.mkdir()
    for name, folder in (("crvlm_sdk", "crvlm_sdk"), ("crvlm_plugins", "plugins"), ("crvlm_adapters", "adapters")):
        (shim / name).symlink_to(tree / folder)
    return str(shim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="travel")
    parser.add_argument("--before", default="e16ac43")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_default_build.json")
    args = parser.parse_args()
    policy = ROOT / "examples" / "policies" / args.policy / "policy.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        shim = old_tree(args.before, tmp_path)
        try:
            results = {}
            for name, path in (("before", shim), ("now", None)):
                out = tmp_path / f"bundle-{name}"
                seconds = build(policy, out, path)
                manifest = json.loads((out / "manifest.json").read_text())
                v = manifest["validation"]
                results[name] = {
                    "seconds": round(seconds, 1), "build_seconds_in_manifest": v.get("build_seconds"),
                    "candidates": sum("srs" in row for row in v.get("sweep", [])),
                    "validation": {k: v.get(k) for k in ("srs", "srs_keyword", "brs", "mb", "n_in", "n_out")},
                    "judge": v.get("judge", manifest["extraction"].get("judge", "keyword")),
                    "layers": manifest["layers"], "operator": manifest.get("operator"),
                    "response": manifest.get("response"),
                }
                print(f"{name}: {seconds:.0f}s, {results[name]['candidates']} candidates, "
                      f"validation {results[name]['validation']}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp_path / "tree")],
                           check=False)
    ratio = results["before"]["seconds"] / results["now"]["seconds"]
    report = {"policy": args.policy, "before_commit": args.before, "results": results,
              "speedup": round(ratio, 2), "cpu_threads": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = (f"flag-less build-bundle, policy {args.policy}, SmolLM2-135M on {os.cpu_count()} cores:\n"
               f"  before ({args.before}): {results['before']['seconds']:.0f} s "
               f"({results['before']['candidates']} candidates)\n"
               f"  now: {results['now']['seconds']:.0f} s ({results['now']['candidates']} candidates)\n"
               f"  now is {ratio:.2f}x the speed of before\n")
    args.out.with_suffix(".txt").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
