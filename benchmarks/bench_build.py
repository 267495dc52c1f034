"""Time and peak memory of bundle building's activation stages vs the research code's loop.

Run:  python benchmarks/bench_build.py [--n 300] [--repeats 3] [--out benchmarks/results/bench_build.json]

What is compared, on SmolLM2-135M-Instruct with the cooking policy's questions:

- **crvlm**: what ``build-bundle`` runs before its sweep — the teacher-forced vectors
  (refusal forced and compliance forced, batched, running float64 sums) at the layers the
  default sweep may steer (5–13 of 30; passes stop after layer 13), plus the gate features
  (last prompt token at the candidate gate layers 7–29, kept per sample). Batches
  are formed shortest question first; the chat header and system message that every prompt
  starts with run once per batch, and both forced replies continue one run of the prompt
  (``capture`` / ``capture_forced``);
- **crvlm, all layers**: the same with vectors at all 30 layers, i.e. exactly the loop's
  output, to separate what the layer choice saves from what batching and sharing save;
- **per-sample two-pass loop** (the CR-VLM research code's approach): for each out-of-scope
  question, one forward pass of the plain prompt and one of the forced prompt, each with
  ``output_hidden_states=True``, keeping every layer's activations in Python lists and
  averaging at the end; then the same per-sample loop for the gate features.

Each measurement runs in a fresh subprocess (model load excluded from the timing), so peak
RSS (``ru_maxrss``) belongs to that run alone. crvlm is also run at a third of the samples to
show its peak memory does not grow with the number of samples. Ratios are within this run:
crvlm and the loop alternate ``--repeats`` times and the median ratio is reported, so a busy
spell on a shared machine does not land on one side only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICY = Path(__file__).resolve().parents[1] / "examples" / "policies" / "cooking" / "policy.yaml"


def worker(mode: str, n: int) -> dict:
    import torch

    from crvlm_plugins.extractors import TeacherForcedExtractor
    from crvlm_plugins.locators import SweepLocator
    from crvlm_sdk import adapter_for, capture, load_model
    from crvlm_sdk.policy import Policy

    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    policy = Policy.load(POLICY)
    data = policy.load_data()
    pool_out = (data.train_out + data.val_out) * 4
    pool_in = (data.train_in + data.val_in) * 4
    outs, ins = pool_out[: n // 2], pool_in[: n - n // 2]
    layers = list(range(adapter.num_layers))
    steer_layers = SweepLocator().candidate_layers(adapter.num_layers) if mode == "crvlm" else layers
    gate_layers = list(range(adapter.num_layers // 4, adapter.num_layers))
    instruction = policy.instruction()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if mode != "naive":
        vectors = TeacherForcedExtractor().extract(
            adapter, ins, outs, steer_layers, refusal_instruction=instruction, refusal_prefix=policy.refusal_prefix,
            compliant_prefix=policy.compliant_prefix, contrast="compliant", read="mean", batch_size=16,
            progress=False,
        )
        feats = capture(adapter, ins + outs, gate_layers, batch_size=16, keep=True, progress=False)
        checksum = float(sum(v.norm() for v in vectors.values())) + float(feats.rows(gate_layers[0]).sum())
    else:
        forced, compliant = [], []
        with torch.no_grad():
            for sample in outs:  # two passes per sample, every layer kept
                for prefix, store in ((policy.refusal_prefix, forced), (policy.compliant_prefix, compliant)):
                    batch = adapter.build_prompts([sample.question], system=instruction, forced_prefix=prefix)
                    hs = model(**batch.inputs, output_hidden_states=True).hidden_states
                    s, e = int(batch.prefix_start[0]), int(batch.prefix_end[0])
                    store.append([h[0, s:e].mean(0).clone() for h in hs[1:]])
            vectors = {}
            for layer in layers:
                refusal = torch.stack([f[layer] for f in forced]).mean(0)
                vectors[layer] = refusal - torch.stack([c[layer] for c in compliant]).mean(0)
            feats_rows = []
            for sample in ins + outs:
                batch = adapter.build_prompts([sample.question])
                hs = model(**batch.inputs, output_hidden_states=True).hidden_states
                feats_rows.append([hs[layer + 1][0, -1].clone() for layer in gate_layers])
        checksum = float(sum(v.norm() for v in vectors.values())) + float(sum(r[0].sum() for r in feats_rows))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": n, "seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": rss_before,
            "peak_minus_load_mb": peak - rss_before, "checksum": checksum}


def run(mode: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--n", str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="alternating crvlm/loop pairs (median ratio)")
    parser.add_argument("--worker", choices=["crvlm", "crvlm-all", "naive"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_build.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n)))
        return
    small = run("crvlm", args.n // 3)
    rounds = []
    for _ in range(args.repeats):  # alternate, so a busy spell on a shared machine hits every side
        rounds.append((run("crvlm", args.n), run("crvlm-all", args.n), run("naive", args.n)))
    pairs = [(crvlm, naive) for crvlm, _, naive in rounds]
    ratios = sorted(naive["seconds"] / crvlm["seconds"] for crvlm, naive in pairs)
    ratios_all = sorted(naive["seconds"] / every["seconds"] for _, every, naive in rounds)
    speedup = statistics.median(ratios)
    crvlm_peak = max(c["peak_minus_load_mb"] for c, _ in pairs)
    naive_peak = max(n["peak_minus_load_mb"] for _, n in pairs)
    lines = [f"activation stages of build-bundle on SmolLM2, {args.n} samples (half in-, half out-of-scope)"]
    for r in [small, *(r for round_ in rounds for r in round_)]:
        lines.append(f"  {r['mode']:>9} n={r['n']:>4}: {r['seconds']:7.1f}s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                     f"({r['peak_minus_load_mb']:+.0f} MB over the loaded model)")
    lines.append(f"speed-up crvlm (as build-bundle runs) vs per-sample two-pass loop: median {speedup:.1f}x over "
                 f"{len(ratios)} rounds (range {ratios[0]:.1f}-{ratios[-1]:.1f}x)")
    lines.append(f"speed-up crvlm with vectors at all layers (the loop's output) vs the loop: median "
                 f"{statistics.median(ratios_all):.1f}x (range {ratios_all[0]:.1f}-{ratios_all[-1]:.1f}x)")
    lines.append(f"peak growth over the loaded model: crvlm {small['peak_minus_load_mb']:+.0f} MB at n={small['n']}, "
                 f"{crvlm_peak:+.0f} MB at n={args.n}; loop {naive_peak:+.0f} MB at n={args.n}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "n": args.n, "small": small, "rounds": [{"crvlm": c, "crvlm_all_layers": a, "naive": n} for c, a, n in rounds],
        "speedup_median": speedup, "speedup_range": [ratios[0], ratios[-1]],
        "speedup_all_layers_median": statistics.median(ratios_all),
        "speedup_all_layers_range": [ratios_all[0], ratios_all[-1]],
    }, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")  # the summary, next to the figures


if __name__ == "__main__":
    main()
