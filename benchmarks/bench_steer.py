"""Cost of steering at generation time, and batched vs per-sample activation capture.

Run:  python benchmarks/bench_steer.py [--reps 6] [--out benchmarks/results/bench_steer.json]

Everything is measured in one process and reported as ratios against a baseline from the
same run (this machine is noisy): steered/unsteered generation time on SmolLM2-135M-Instruct
(greedy, exactly 64 new tokens, batch 1 and 8) with a probe gate and a band of 10 layers,
both with the gate read in the same pass (gate layer below the band) and with the unsteered
gate pre-pass (gate layer above the band); and batched capture throughput over a per-sample
loop. Each steered run is paired with an unsteered run right before or after it (order
alternating), and the median of the per-pair ratios is reported with its interquartile range,
so slow drift on this shared VM cancels within pairs; the ratio of the fastest runs is shown too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crvlm_plugins.gates import ProbeGate
from crvlm_sdk import Bundle, Sample, Steerer, adapter_for, capture, load_model

QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Explain photosynthesis in one paragraph.",
    "Write a short poem about the sea.",
    "What are three tips for learning a language?",
    "How does a bicycle gear work?",
    "Name five fruits that are red.",
    "Why is the sky blue?",
]
BAND = list(range(8, 18))


def make_bundle(adapter, gate_layer: int, seed: int = 0) -> Bundle:
    g = torch.Generator().manual_seed(seed)
    hidden = adapter.hidden_size
    vectors = {layer: torch.randn(hidden, generator=g) * 0.5 for layer in BAND}
    gate = ProbeGate(torch.randn(hidden, generator=g) * 0.05, torch.zeros(()), torch.zeros(hidden), torch.ones(hidden))
    return Bundle.create(adapter=adapter, policy={"name": f"bench-g{gate_layer}"}, vectors=vectors, gate=gate,
                         gate_layer=gate_layer, alpha=1.0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(plain: Callable[[], Any], steered: Callable[[], Any], reps: int) -> dict[str, Any]:
    """``steered``'s time over ``plain``'s in back-to-back pairs, order alternating, so slow drift
    on a shared machine cancels within each pair: median ratio, its quartiles, medians, and the
    ratio of the fastest runs."""
    times: dict[str, list[float]] = {"unsteered": [], "steered": []}
    for rep in range(reps):
        pair = [("unsteered", plain), ("steered", steered)]
        for label, fn in pair if rep % 2 == 0 else pair[::-1]:
            times[label].append(timed(fn))
    plain_s, steered_s = times["unsteered"], times["steered"]
    ratios = sorted(s / p for s, p in zip(steered_s, plain_s, strict=True))
    return {"unsteered_s": statistics.median(plain_s), "steered_s": statistics.median(steered_s),
            "ratio": statistics.median(ratios), "ratio_q1": ratios[len(ratios) // 4],
            "ratio_q3": ratios[(3 * len(ratios)) // 4], "ratio_of_min": min(steered_s) / min(plain_s),
            "runs": times}


def bench_generate(adapter, reps: int, new_tokens: int) -> list[dict]:
    steerers = {
        "gate in pass (layer 5)": Steerer(adapter, [make_bundle(adapter, 5)]),
        "gate pre-pass (layer 20)": Steerer(adapter, [make_bundle(adapter, 20)]),
    }
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    base = next(iter(steerers.values()))
    rows = []
    for batch in (1, 8):
        questions = (QUESTIONS * 8)[:batch]
        base.generate(questions, steer=False, max_new_tokens=2)  # warm-up
        for name, steerer in steerers.items():
            result = paired(lambda q=questions: base.generate(q, steer=False, **kwargs),
                            lambda s=steerer, q=questions: s.generate(q, **kwargs), reps)
            rows.append({"batch": batch, "variant": name, **result,
                         "unsteered_ms_per_token": 1000 * result["unsteered_s"] / new_tokens})
    return rows


def bench_capture(adapter, reps: int, n: int = 64) -> dict:
    samples = [Sample(q) for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]]
    layers = [6, 12, 20]
    batched, looped = [], []
    for _ in range(reps):
        batched.append(timed(lambda: capture(adapter, samples, layers, batch_size=16, progress=False)))
        looped.append(timed(lambda: capture(adapter, samples, layers, batch_size=1, progress=False)))
    tb, tl = statistics.median(batched), statistics.median(looped)
    return {"samples": n, "batched_s": tb, "per_sample_s": tl, "speedup": tl / tb,
            "batched_samples_per_s": n / tb, "per_sample_samples_per_s": n / tl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_steer.json")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    generation = bench_generate(adapter, args.reps, args.new_tokens)
    capture_result = bench_capture(adapter, args.reps)

    print(f"SmolLM2-135M-Instruct, {args.new_tokens} new tokens, band {BAND[0]}-{BAND[-1]}, "
          f"median of {args.reps}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5}  {'variant':<26} {'unsteered s':>11} {'steered s':>9} {'ratio':>6} {'IQR':>13} "
          f"{'ratio of min':>12}")
    for row in generation:
        print(f"{row['batch']:>5}  {row['variant']:<26} {row['unsteered_s']:>11.2f} {row['steered_s']:>9.2f} "
              f"{row['ratio']:>6.3f} [{row['ratio_q1']:.3f},{row['ratio_q3']:.3f}] {row['ratio_of_min']:>12.3f}")
    c = capture_result
    print(f"capture of {c['samples']} prompts at 3 layers: batched (16) {c['batched_s']:.2f}s, "
          f"per-sample loop {c['per_sample_s']:.2f}s -> {c['speedup']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "new_tokens": args.new_tokens, "reps": args.reps, "band": BAND,
        "generation": generation, "capture": capture_result,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
