"""The README demos, each built and used in minutes on 2 CPU cores.

- :func:`run_vlm_demo` (``crvlm demo``): assembles the demo VLM (:mod:`crvlm_sdk.demo_vlm`),
  writes a small ``no-stars`` policy (the picture decides: anything about a picture with a
  star is refused), builds a bundle for it with the ordinary build pipeline and settings
  chosen by a full sweep on the example policy, and shows pictures answered without and with
  the bundle.
- :func:`run_demo` (``crvlm demo --text``): a cooking-only bundle for the text model
  SmolLM2-135M-Instruct. Settings follow what was measured on this model (DESIGN.md §4): the
  refusal-vs-compliance teacher-forced direction, averaged over the forced tokens, steers at
  layer 6 with α = 1.25× the raw difference; the gate is a logistic probe at layer 20, where
  in- and out-of-scope prompts separate cleanly.
"""

from __future__ import annotations

import json
import random
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from crvlm_sdk.backbones import adapter_for
from crvlm_sdk.bundle import Bundle
from crvlm_sdk.capture import capture
from crvlm_sdk.interfaces import BackboneAdapter, Sample
from crvlm_sdk.models import load_model
from crvlm_sdk.plugins import get_plugin_manager
from crvlm_sdk.steerer import Steerer

BAND = [6]
ALPHA = 1.25
GATE_LAYER = 20


def demo_policy() -> dict[str, Any]:
    return json.loads(resources.files("crvlm_sdk").joinpath("data/demo_cooking.json").read_text())


def build_demo_bundle(adapter: BackboneAdapter, policy: dict[str, Any], *, seed: int = 0,
                      progress: bool = True) -> Bundle:
    """Teacher-forced vector + calibrated probe gate from the demo policy's questions."""
    plugins = get_plugin_manager()
    rng = random.Random(seed)
    ins = [Sample(q) for q in policy["in_scope"]]
    outs = [Sample(q) for q in policy["out_of_scope"]]
    rng.shuffle(ins)
    rng.shuffle(outs)
    held = len(ins) // 5
    instruction = policy["refusal_instruction"].format(subject=policy["subject"])
    extractor = plugins.get("extractor", "teacher-forced")()
    vectors = extractor.extract(
        adapter, ins, outs, BAND, refusal_instruction=instruction, refusal_prefix=policy["refusal_prefix"],
        compliant_prefix=policy["compliant_prefix"], contrast="compliant", read="mean", progress=progress,
    )
    stats = capture(adapter, ins + outs, [GATE_LAYER], keep=True, progress=progress, description="gate features")
    rows = stats.rows(GATE_LAYER)
    h_in, h_out = rows[: len(ins)], rows[len(ins) :]
    gate = plugins.get("gate", "probe").untrained(adapter.hidden_size)
    fit = gate.fit(h_in[held:], h_out[held:])
    gate.soften(0.25)  # a sharper gate: in-scope rows get p ≈ 0, not a small leak
    gate.calibrate(h_in[:held], target_over_refusal=0.02)
    caught = float((gate.score(h_out[:held]) > 0.5).float().mean())
    flagged = float((gate.score(h_in[:held]) > 0.5).float().mean())
    return Bundle.create(
        adapter=adapter,
        policy={"name": policy["name"], "subject": policy["subject"], "n_in_scope": len(ins),
                "n_out_of_scope": len(outs)},
        vectors=vectors,
        gate=gate,
        gate_layer=GATE_LAYER,
        alpha=ALPHA,
        extraction={"extractor": "teacher-forced", "contrast": "compliant", "read": "mean",
                    "refusal_prefix": policy["refusal_prefix"], "compliant_prefix": policy["compliant_prefix"],
                    "refusal_instruction": instruction, "seed": seed},
        validation={"gate_train_accuracy": fit["train_accuracy"], "gate_heldout_out_caught": caught,
                    "gate_heldout_in_flagged": flagged, "n_heldout_per_class": held},
    )


def run_demo(out: Path, *, max_new_tokens: int = 40, console: Console | None = None) -> Path:
    console = console or Console()
    start = time.perf_counter()
    console.print("[bold]crvlm demo[/]: a cooking-assistant bundle for SmolLM2-135M-Instruct")
    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    console.print(f"loaded SmolLM2 ({adapter.num_layers} layers) in {time.perf_counter() - start:.0f}s")
    policy = demo_policy()
    bundle = build_demo_bundle(adapter, policy)
    path = bundle.save(out / "bundle", overwrite=True)
    v = bundle.manifest.validation
    console.print(
        f"bundle saved to [cyan]{path}[/]: steer layers {bundle.manifest.layers}, α={bundle.manifest.alpha}, "
        f"gate layer {bundle.manifest.gate.layer}; held-out gate: {v['gate_heldout_out_caught']:.0%} of "
        f"out-of-scope caught, {v['gate_heldout_in_flagged']:.0%} of in-scope flagged"
    )

    steerer = Steerer.from_bundle(model, path, tokenizer)  # what an application would do
    showcase = policy["showcase"]
    questions = [row["question"] for row in showcase]
    scores = steerer.gate_scores(questions)[bundle.name]
    plain = steerer.generate(questions, steer=False, max_new_tokens=max_new_tokens)
    steered = steerer.generate(questions, max_new_tokens=max_new_tokens)
    table = Table(title="Same questions, without and with the bundle", show_lines=True)
    for column in ("question", "scope", "gate p", "unsteered", "steered"):
        table.add_column(column, overflow="fold")
    for row, p, a, b in zip(showcase, scores.tolist(), plain, steered, strict=True):
        scope = "[green]in[/]" if row["in_scope"] else "[red]out[/]"
        table.add_row(row["question"], scope, f"{p:.2f}", a, b)
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.0f}s")
    return path


#: Settings for the VLM demo, from the sweep on examples/policies/no-stars (RESULTS.md).
VLM_BAND = [6]
VLM_STRENGTH = 0.9
VLM_GATE_LAYERS = (7, 8, 9, 10)  # above the band: an unsteered pre-pass reads the gate
VLM_TRAIN_PER_SIDE = 60


def run_vlm_demo(out: Path, *, max_new_tokens: int = 30, console: Console | None = None) -> Path:
    """Demo VLM + ``no-stars`` bundle + a table of pictures answered without and with it."""
    from crvlm_sdk import demo_vlm
    from crvlm_sdk.build import BuildOptions, build_bundle
    from crvlm_sdk.policy import Policy, read_jsonl
    from crvlm_sdk.shape_policies import write_no_stars

    console = console or Console()
    start = time.perf_counter()
    console.print("[bold]crvlm demo[/]: refuse questions about pictures that show a star")
    model_dir = out / "demo-vlm"
    if not (model_dir / "config.json").is_file():
        demo_vlm.build_demo_model(model_dir, overwrite=True)
        console.print(f"assembled the demo VLM in [cyan]{model_dir}[/] ({time.perf_counter() - start:.0f}s)")
    model, processor = load_model(model_dir)
    policy_path = write_no_stars(out / "no-stars", n_train=VLM_TRAIN_PER_SIDE, n_test=4)
    console.print(f"wrote the policy and {2 * VLM_TRAIN_PER_SIDE} training pictures to [cyan]{policy_path.parent}[/]")
    options = BuildOptions(locator="fixed", locator_options={"band": VLM_BAND, "strength": VLM_STRENGTH},
                           gate_layers=VLM_GATE_LAYERS, sweep_samples=12, validation_new_tokens=20)
    bundle = build_bundle(model, processor, policy_path, options=options, console=console)
    path = bundle.save(out / "bundle", overwrite=True)
    v = bundle.manifest.validation
    console.print(
        f"bundle saved to [cyan]{path}[/]: steer layers {bundle.manifest.layers}, α={bundle.manifest.alpha:.3g}, "
        f"gate layer {bundle.manifest.gate.layer}, image weight {bundle.manifest.extraction['image_weight']}; "
        f"validation SRS {v['srs']:.2f}, BRS {v['brs']:.2f}"
    )
    policy = Policy.load(policy_path)
    rows = read_jsonl(policy.base_dir / "test.jsonl", labelled=True)
    steerer = Steerer.from_bundle(model, path, processor)  # what an application would do
    questions = [r.question for r in rows]
    images = [r.image for r in rows]
    scores = steerer.gate_scores(questions, images)[bundle.name]
    plain = steerer.generate(questions, images, steer=False, max_new_tokens=max_new_tokens)
    steered = steerer.generate(questions, images, max_new_tokens=max_new_tokens)
    table = Table(title="Same pictures and questions, without and with the bundle", show_lines=True)
    for column in ("picture", "question", "star?", "gate p", "unsteered", "steered"):
        table.add_column(column, overflow="fold")
    for row, p, a, b in zip(rows, scores.tolist(), plain, steered, strict=True):
        star = "[red]yes[/]" if not row.meta["in_scope"] else "[green]no[/]"
        table.add_row(str(row.image), row.question, star, f"{p:.2f}", a, b)
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.0f}s")
    return path
