"""crvlm beside steering-vectors and repeng: extraction cost, generation cost and the refusal job.

Setup: bash scripts/setup_bench.sh        (creates .venv-bench: crvlm + steering-vectors + repeng)
Run:   .venv-bench/bin/python benchmarks/bench_peers.py [--parts extraction,runtime,job]
                                                         [--policies cooking,travel]

One process tree, one machine, one model (SmolLM2-135M-Instruct, float32) and the same data:

- **extraction**: each library gets a refusal vector at layers 1–28 from the same N contrast
  pairs (N = 64, 256): an out-of-scope question under the policy's refusal instruction with the
  refusal prefix ("Sorry,") forced as the reply's start, against the same prompt with the
  compliant prefix ("Sure,"). The peers get the prompts as text, decoded from the token ids
  crvlm builds (checked to re-tokenize to the same ids); every library runs batches of 8. Each
  run is a fresh subprocess; peak memory is the highest resident set size sampled every 2 ms
  during the extraction minus the resident size just before it (after loading the model, one
  warm-up forward and returning freed heap to the system with ``malloc_trim``). crvlm is timed with its
  default reading (mean over the forced tokens, the build's) and with the last forced token,
  which is the quantity steering-vectors computes (mean over pairs of positive − negative at
  the last token); their cosine says whether the two compute the same thing. repeng's
  ``pca_diff`` is the first principal component of the centred pair differences: a different
  quantity, its cosine is shown for information.
- **runtime**: steered / unsteered generation time, batch 1 and 8, exactly 64 new tokens, each
  library applying its vector its own way (``SteeringVector.apply`` context manager, repeng's
  wrapped ``ControlModel``, crvlm's ``Steerer`` with the policy's bundle: its gate, its layers,
  its decode-step limit; response shaping off so every row runs 64 tokens). Pairs of runs in
  alternating order, median ratio with its interquartile range (as ``bench_steer.py``).
- **job**: per policy, the flag-less crvlm bundle (``bundles/<policy>``, built with ``crvlm
  build-bundle --policy examples/policies/<policy>/policy.yaml --out bundles/<policy>``) against
  each peer's vector from the policy's training split, applied as the peer's README does: to
  every input (neither library has a gate), every token, at fixed strength. Each peer's layers
  and strength are chosen on the validation split by MB on clean SRS (as crvlm's sweep ranks),
  ties broken by MB on keyword SRS (the setting that refuses most, as a peer's user would pick
  it), from the bundle's own layers and the layer band repeng's README uses (the 5th to the 17th
  from the top), times strengths 1/16 … 1/2 of the layer's median residual norm (the same scale
  for both libraries; stronger ones are skipped once every validation question is declined).
  Then the test split, strict judge: clean SRS, keyword SRS, BRS, MB with 95% intervals,
  in-scope answers changed. "crvlm steering only" is the bundle's gate and steering without its
  response settings (no forced opening, no stop): the peers' way of answering, with a gate.

Results: benchmarks/results/bench_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata as metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # repeng prints a progress bar per layer

import torch
from bench_steer import paired  # benchmarks/ is the script's directory, so on sys.path
from safetensors.torch import load_file, save_file

from crvlm_sdk import Bundle, Sample, Steerer, adapter_for, capture, get_plugin_manager, load_model
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.evaluation.evaluate import System, judge_report, report_samples, run_systems
from crvlm_sdk.evaluation.metrics import compute_metrics, mb_score
from crvlm_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "examples" / "policies"
LAYERS = list(range(1, 29))  # repeng reads hidden_states[l + 1]; the last entry is after the final norm
BATCH = 8
LIBS = ("crvlm", "crvlm (last token)", "steering-vectors", "repeng")
QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Explain photosynthesis in one paragraph.",
    "Write a short poem about the sea.", "What are three tips for learning a language?",
    "How does a bicycle gear work?", "Name five fruits that are red.", "Why is the sky blue?",
]
#: steering strengths in the job: |added vector| as a fraction of the layer's median residual norm
STRENGTHS = (0.0625, 0.125, 0.25, 0.5)


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("crvlm", "steering-vectors", "repeng", "torch", "transformers")}


def pair_texts(adapter: BackboneAdapter, questions: Sequence[str], pol: Policy) -> list[tuple[str, str]]:
    """(refusal-forced, compliance-forced) prompt texts whose tokens are exactly crvlm's."""
    pairs = []
    for q in questions:
        texts = []
        for prefix in (pol.refusal_prefix, pol.compliant_prefix):
            ids = adapter.build_prompts([q], system=pol.instruction(), forced_prefix=prefix).inputs["input_ids"][0]
            text = adapter.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            again = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
            if again != ids.tolist():
                raise SystemExit(f"the prompt text of {q!r} does not re-tokenize to crvlm's ids")
            texts.append(text)
        pairs.append((texts[0], texts[1]))
    return pairs


def contrast_questions(n: int) -> list[Sample]:
    """n distinct out-of-scope training questions (cooking's, then travel's and programming's)."""
    seen: dict[str, Sample] = {}
    for name in ("cooking", "travel", "programming"):
        for s in Policy.load(POLICIES / name / "policy.yaml").load_data().train_out:
            seen.setdefault(s.question, Sample(s.question))
    if len(seen) < n:
        raise SystemExit(f"only {len(seen)} distinct out-of-scope questions for N = {n}")
    return list(seen.values())[:n]


def extract(lib: str, model: Any, adapter: BackboneAdapter, pol: Policy, samples: Sequence[Sample],
            layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """One library's refusal vector per layer from the same contrast pairs."""
    if lib.startswith("crvlm"):
        extractor = get_plugin_manager().get("extractor", "teacher-forced")()
        return extractor.extract(adapter, [], samples, layers, refusal_instruction=pol.instruction(),
                                 refusal_prefix=pol.refusal_prefix, compliant_prefix=pol.compliant_prefix,
                                 contrast="compliant", read="last" if "last" in lib else "mean",
                                 batch_size=BATCH, progress=False)
    pairs = pair_texts(adapter, [s.question for s in samples], pol)
    if lib == "steering-vectors":
        from steering_vectors import train_steering_vector

        vec = train_steering_vector(model, adapter.tokenizer, pairs, layers=list(layers), read_token_index=-1,
                                    batch_size=BATCH)
        return {layer: vec.layer_activations[layer].detach().float().cpu() for layer in layers}
    from repeng import ControlVector, DatasetEntry

    vec = ControlVector.train(model, adapter.tokenizer, [DatasetEntry(p, n) for p, n in pairs],
                              hidden_layers=list(layers), batch_size=BATCH, method="pca_diff")
    return {layer: torch.from_numpy(vec.directions[layer]).float() for layer in layers}


class PeakRss:
    """Highest resident set size (bytes) seen by a sampling thread while the block runs."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def extraction_child(lib: str, n: int, out: str) -> None:
    """Runs in a fresh process: time and peak memory of one extraction."""
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    pol = Policy.load(POLICIES / "cooking" / "policy.yaml")
    samples = contrast_questions(n)
    with torch.inference_mode():
        model(**adapter.build_prompts(["warm up"]).inputs)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakRss() as rss:
        start = time.perf_counter()
        vectors = extract(lib, model, adapter, pol, samples, LAYERS)
        seconds = time.perf_counter() - start
    peak_mib = (rss.peak - rss.start) / 2**20
    save_file({str(k): v.contiguous() for k, v in vectors.items()}, out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib}))


def bench_extraction(sizes: Sequence[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            runs: dict[str, list[dict[str, float]]] = {lib: [] for lib in LIBS}
            vectors: dict[str, dict[str, torch.Tensor]] = {}
            for rep in range(reps):
                for lib in LIBS if rep % 2 == 0 else LIBS[::-1]:
                    out = Path(tmp) / f"{lib}-{n}.safetensors"
                    done = subprocess.run([sys.executable, __file__, "--child", lib, str(n), str(out)],
                                          capture_output=True, text=True, check=False)
                    if done.returncode:
                        raise SystemExit(f"{lib} extraction failed:\n{done.stderr[-3000:]}")
                    runs[lib].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    vectors[lib] = load_file(str(out))
            reference = vectors["crvlm (last token)"]
            for lib in LIBS:
                cos = [float(torch.nn.functional.cosine_similarity(vectors[lib][k], reference[k], dim=0).abs())
                       for k in reference]
                seconds = statistics.median(r["seconds"] for r in runs[lib])
                rows.append({"n": n, "library": lib, "seconds": seconds, "ms_per_pair": 1000 * seconds / n,
                             "peak_mib": statistics.median(r["peak_mib"] for r in runs[lib]),
                             "cos_to_crvlm_last_median": statistics.median(cos), "cos_min": min(cos),
                             "runs": runs[lib]})
                print(f"extraction N={n:<4} {lib:<20} {seconds:6.2f} s  {rows[-1]['peak_mib']:7.1f} MiB  "
                      f"|cos| to crvlm (last token): median {rows[-1]['cos_to_crvlm_last_median']:.4f}, "
                      f"min {rows[-1]['cos_min']:.4f}", flush=True)
    return rows


@contextlib.contextmanager
def peer_applied(lib: str, model: Any, layers: Sequence[int], vectors: dict[int, torch.Tensor],
                 scale: dict[int, float]) -> Iterator[None]:
    """Steer every token of every input with ``scale[l]·v_l`` at ``layers``, the peer's own way."""
    if lib == "steering-vectors":
        from steering_vectors import SteeringVector

        vec = SteeringVector({layer: vectors[layer] * scale[layer] for layer in layers}, "decoder_block")
        with vec.apply(model, multiplier=1.0):
            yield
        return
    from repeng import ControlModel, ControlVector

    wrapped = ControlModel(model, list(layers))
    try:
        directions = {layer: (vectors[layer] * scale[layer]).numpy() for layer in layers}
        wrapped.set_control(ControlVector(model_type=model.config.model_type, directions=directions), coeff=1.0)
        yield
    finally:
        wrapped.reset()
        wrapped.unwrap()


def bench_runtime(model: Any, adapter: BackboneAdapter, reps: int, new_tokens: int) -> list[dict[str, Any]]:
    bundle = Bundle.load(ROOT / "bundles" / "cooking", adapter=adapter)
    bundle = bundle.replaced(response=ResponseSpec(threshold=bundle.manifest.response.threshold))
    steerer = Steerer(adapter, [bundle])
    layers = list(bundle.manifest.layers)
    pol = Policy.load(POLICIES / "cooking" / "policy.yaml")
    samples = contrast_questions(64)
    vectors = {lib: extract(lib, model, adapter, pol, samples, layers) for lib in ("steering-vectors", "repeng")}
    mean_diff = vectors["steering-vectors"]
    scale = {lib: {layer: (1.0 if lib == "steering-vectors" else float(mean_diff[layer].norm())) for layer in layers}
             for lib in vectors}
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    rows = []
    for batch in (1, 8):
        questions = (QUESTIONS * 8)[:batch]
        steerer.generate(questions, steer=False, max_new_tokens=2)  # warm-up

        def plain(q: list[str] = questions) -> Any:
            return steerer.generate(q, steer=False, **kwargs)

        result = paired(plain, lambda q=questions: steerer.generate(q, **kwargs), reps)
        rows.append({"batch": batch, "library": "crvlm (Steerer, gate + bundle)", **result})
        for lib in vectors:
            def steered(lib: str = lib, q: list[str] = questions) -> Any:
                with peer_applied(lib, model, layers, vectors[lib], scale[lib]):
                    return steerer.generate(q, steer=False, **kwargs)

            rows.append({"batch": batch, "library": lib, **paired(plain, steered, reps)})
        for row in rows[-3:]:
            print(f"runtime batch {batch} {row['library']:<32} steered/unsteered {row['ratio']:.3f} "
                  f"[{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}] (unsteered {row['unsteered_s']:.2f} s)", flush=True)
    return rows


def peer_answers(steerer: Steerer, rows: Sequence[Sample], lib: str, layers: Sequence[int],
                 vectors: dict[int, torch.Tensor], scale: dict[int, float], max_new_tokens: int) -> tuple[list, list]:
    texts, ended = [], []
    with peer_applied(lib, steerer.model, layers, vectors, scale):
        for start in range(0, len(rows), 80):
            gen = steerer.generate_detailed([s.question for s in rows[start:start + 80]], steer=False,
                                            max_new_tokens=max_new_tokens)
            texts += gen.texts
            ended += gen.ended
    return texts, ended


def bench_job(model: Any, adapter: BackboneAdapter, policies: Sequence[str], max_new_tokens: int) -> list[dict]:
    manager = get_plugin_manager()
    judge, keyword = manager.get("judge", "strict")(), manager.get("judge", "keyword")()
    results = []
    for name in policies:
        pol = Policy.load(POLICIES / name / "policy.yaml")
        data = pol.load_data()
        steerer = Steerer.from_bundle(model, ROOT / "bundles" / name, adapter.processor)
        bundle = steerer.bundles[0]
        bundle_layers = list(bundle.manifest.layers)
        readme_band = list(range(adapter.num_layers - 17, adapter.num_layers - 4))
        layer_sets = {"bundle's layers": bundle_layers, "repeng README band": readme_band}
        wanted = sorted({*bundle_layers, *readme_band})
        vectors = {lib: extract(lib, model, adapter, pol, data.train_out, wanted)
                   for lib in ("steering-vectors", "repeng")}
        stats = capture(adapter, data.train_in[:64] + data.train_out[:64], wanted, keep=True, progress=False)
        residual = {layer: float(stats.rows(layer).norm(dim=1).median()) for layer in wanted}
        val = data.val_in + data.val_out
        val_scope = [True] * len(data.val_in) + [False] * len(data.val_out)
        chosen: dict[str, dict[str, Any]] = {}
        for lib in vectors:
            for set_name, layers in layer_sets.items():
                for k in STRENGTHS:
                    scale = {layer: k * residual[layer] / float(vectors[lib][layer].norm()) for layer in layers}
                    texts, ended = peer_answers(steerer, val, lib, layers, vectors[lib], scale, max_new_tokens)
                    verdicts = judge.assess(texts, ended=ended)
                    m = compute_metrics([v.clean for v in verdicts], val_scope,
                                        declined=[v.declines for v in verdicts], keyword=keyword.judge(texts))
                    kw_mb = mb_score(m.srs_keyword or 0.0, m.brs)
                    print(f"job {name} validation {lib:<16} {set_name:<18} x{k:<6} clean SRS {m.srs:.3f} "
                          f"keyword SRS {m.srs_keyword:.3f} BRS {m.brs:.3f} MB {m.mb:.3f}", flush=True)
                    rank = (m.mb, kw_mb)
                    if lib not in chosen or rank > chosen[lib]["rank"]:
                        chosen[lib] = {"layers": layers, "layer_set": set_name, "strength": k, "scale": scale,
                                       "rank": rank, "val_srs": m.srs, "val_srs_keyword": m.srs_keyword,
                                       "val_brs": m.brs}
                    if m.brs >= 0.95:  # everything refused: stronger settings only break the text further
                        break
        test = data.test
        # the bundle's steering and gate without its response settings: what the gate alone adds
        bare = bundle.replaced(name=f"{bundle.name}:steering-only",
                               response=ResponseSpec(threshold=bundle.manifest.response.threshold))
        runner = Steerer(adapter, [bundle, bare])
        answers = run_systems(runner, test, [System("bundle", bundle.name), System("none"),
                                             System("crvlm steering only", bare.name)],
                              batch_size=66, max_new_tokens=max_new_tokens)
        scores = steerer.gate_scores([s.question for s in test])[bundle.name]
        samples = report_samples(test, scores, answers)
        for lib, pick in chosen.items():
            texts, ended = peer_answers(steerer, test, lib, pick["layers"], vectors[lib], pick["scale"],
                                        max_new_tokens)
            for sample, text, end in zip(samples, texts, ended, strict=True):
                sample["answers"][lib], sample["ended"][lib] = text, end
        report = judge_report({"bundle": {}, "baselines": {}, "samples": samples,
                               "settings": {"response": bundle.manifest.response.model_dump()}})
        systems = {"crvlm bundle": report["bundle"], **report["baselines"]}
        results.append({"policy": name, "peers": {lib: {k: v for k, v in pick.items() if k not in ("scale", "rank")}
                                                  for lib, pick in chosen.items()},
                        "systems": systems, "samples": samples})
        for sys_name, m in systems.items():
            print(f"job {name} test {sys_name:<16} clean SRS {m['srs']:.3f} [{m['srs_ci'][0]:.2f}, "
                  f"{m['srs_ci'][1]:.2f}] keyword {m['srs_keyword']:.3f} BRS {m['brs']:.3f} MB {m['mb']:.3f} "
                  f"in-scope changed {m['in_changed']}/{m['n_in']}", flush=True)
    return results


def write_markdown(result: dict[str, Any], out: Path) -> None:
    lines = [f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.", ""]

    def threads(part: str) -> str:
        return f"{part.capitalize()}: {result.get(part + '_threads', result['machine']['threads'])} threads."

    if result.get("extraction"):
        lines += [threads("extraction"), "",
                  "| N pairs | library | seconds (median) | ms per pair | peak MiB | abs cos to crvlm (last token), "
                  "median / min over layers |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['n']} | {r['library']} | {r['seconds']:.2f} | {r['ms_per_pair']:.1f} | {r['peak_mib']:.0f} | "
                  f"{r['cos_to_crvlm_last_median']:.4f} / {r['cos_min']:.4f} |" for r in result["extraction"]]
        lines.append("")
    if result.get("runtime"):
        lines += [threads("runtime"), "", "| batch | library | unsteered s | steered s | steered / unsteered [IQR] |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['library']} | {r['unsteered_s']:.2f} | {r['steered_s']:.2f} | "
                  f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] |" for r in result["runtime"]]
        lines.append("")
    if result.get("job"):
        lines += [threads("job"), "",
                  "| policy | system | chosen on validation | clean SRS ↑ | keyword SRS | BRS ↓ | MB ↑ | "
                  "in-scope changed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["job"]:
            for sys_name, m in r["systems"].items():
                pick = r["peers"].get(sys_name)
                how = (f"{pick['layer_set']} {pick['layers'] if len(pick['layers']) < 4 else ''} ×{pick['strength']}"
                       if pick else ("gate + bundle" if sys_name == "crvlm bundle" else ""))
                lines.append(f"| {r['policy']} | {sys_name} | {how} | {m['srs']:.3f} [{m['srs_ci'][0]:.2f}, "
                             f"{m['srs_ci'][1]:.2f}] | {m['srs_keyword']:.3f} | {m['brs']:.3f} [{m['brs_ci'][0]:.2f}, "
                             f"{m['brs_ci'][1]:.2f}] | {m['mb']:.3f} [{m['mb_ci'][0]:.2f}, {m['mb_ci'][1]:.2f}] | "
                             f"{m['in_changed']}/{m['n_in']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="extraction,runtime,job")
    parser.add_argument("--policies", default="cooking,travel")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--reps", type=int, default=3, help="extraction runs per library and N")
    parser.add_argument("--runtime-reps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length in the job (crvlm eval's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_peers.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        extraction_child(args.child[0], int(args.child[1]), args.child[2])
        return
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"versions": versions(), "machine": {"python": platform.python_version(),
                              "threads": torch.get_num_threads(), "processor": platform.machine()}}
    if args.out.exists():  # parts run separately share one results file
        result = {**json.loads(args.out.read_text()), **result}
    for part in parts:
        result[f"{part}_threads"] = torch.get_num_threads()
    if "extraction" in parts:
        result["extraction"] = bench_extraction([int(n) for n in args.sizes.split(",")], args.reps)
    if parts & {"runtime", "job"}:
        model, tokenizer = load_model("smollm2")
        adapter = adapter_for(model, tokenizer)
        if "runtime" in parts:
            result["runtime"] = bench_runtime(model, adapter, args.runtime_reps, args.new_tokens)
        if "job" in parts:
            result["job"] = bench_job(model, adapter, args.policies.split(","), args.max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out)


if __name__ == "__main__":
    main()
