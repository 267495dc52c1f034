"""The README demos, each built and used in minutes on 2 CPU cores.

- :func:`run_vlm_demo` (``crvlm demo``): assembles the demo VLM (:mod:`crvlm_sdk.demo.vlm`),
  writes a small ``no-stars`` policy (the picture decides: anything about a picture with a
  star is refused), builds a bundle for it with the ordinary build pipeline and the setting the
  full sweep chose on the example policy, and shows pictures answered without and with it.
- :func:`run_demo` (``crvlm demo --text``): a cooking-only bundle for the text model
  SmolLM2-135M-Instruct, built the same way from the packaged demo questions.

Both fix the steering setting instead of sweeping it (the sweep takes minutes more) and keep
the default response: a refused answer opens with the policy's opening, continues in the
model's own words under steering and ends after one sentence.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import describe_layers
from crvlm_sdk.models.loading import load_model
from crvlm_sdk.steering.steerer import Steerer

#: Text demo settings: rotation at layer 6, what the sweep chose on the example text policies.
BAND = [6]
STRENGTH = 0.9
GATE_LAYERS = (18, 20, 22, 24, 27)


def demo_policy() -> dict[str, Any]:
    return json.loads(resources.files("crvlm_sdk.demo").joinpath("data/demo_cooking.json").read_text())


def _fixed_options(band: list[int], strength: float, gate_layers: tuple[int, ...]) -> Any:
    from crvlm_sdk.build.options import BuildOptions

    return BuildOptions(locator="fixed", locator_options={"band": band, "strength": strength},
                        operator="rotation", decode_steps=8, gate_layers=gate_layers, mode="steer", stop_sentences=1)


def _explain(console: Console, bundle: Bundle) -> None:
    spec = bundle.manifest.response
    console.print(
        f"Refused answers: {escape(spec.describe())}. Other response modes, per call or per build: "
        "[bold]template[/] (every refused question gets exactly the policy's refusal_message, "
        f"here {escape(repr(spec.message))}) or steering alone "
        "(steerer.generate(..., response=False): loops and drifts on a model this small)."
    )


def run_demo(out: Path, *, max_new_tokens: int = 40, console: Console | None = None) -> Path:
    from crvlm_sdk.build.pipeline import build_bundle
    from crvlm_sdk.policy import Policy

    console = console or Console()
    start = time.perf_counter()
    console.print("[bold]crvlm demo[/]: a cooking-assistant bundle for SmolLM2-135M-Instruct")
    model, tokenizer = load_model("smollm2")
    console.print(f"loaded SmolLM2 in {time.perf_counter() - start:.0f}s")
    raw = demo_policy()
    policy = Policy.model_validate({k: v for k, v in raw.items() if k != "showcase"})
    bundle = build_bundle(model, tokenizer, policy, options=_fixed_options(BAND, STRENGTH, GATE_LAYERS),
                          console=console)
    path = bundle.save(out / "bundle", overwrite=True)
    v = bundle.manifest.validation
    console.print(
        f"{_saved(bundle, path)}; validation: {v['gate_caught']:.0%} of out-of-scope caught, "
        f"{v['gate_flagged']:.0%} of in-scope flagged, clean refusals {v['srs']:.0%}"
    )

    steerer = Steerer.from_bundle(model, path, tokenizer)  # what an application would do
    showcase = raw["showcase"]
    questions = [row["question"] for row in showcase]
    scores = steerer.gate_scores(questions)[bundle.name]
    plain = steerer.generate(questions, steer=False, max_new_tokens=max_new_tokens)
    steered = steerer.generate(questions, max_new_tokens=max_new_tokens)
    table = Table(title="Same questions, without and with the bundle", show_lines=True)
    for column in ("question", "scope", "gate p", "unsteered", "with the bundle"):
        table.add_column(column, overflow="fold")
    for row, p, a, b in zip(showcase, scores.tolist(), plain, steered, strict=True):
        scope = "[green]in[/]" if row["in_scope"] else "[red]out[/]"
        table.add_row(escape(row["question"]), scope, f"{p:.2f}", escape(a), escape(b))
    console.print(table)
    _explain(console, bundle)
    console.print(f"done in {time.perf_counter() - start:.0f}s")
    return path


#: Settings for the VLM demo, from the sweep on examples/policies/no-stars (RESULTS.md).
VLM_BAND = [6]
VLM_STRENGTH = 0.8
VLM_GATE_LAYERS = (7, 8, 9, 10)  # above the band: an unsteered pre-pass reads the gate
VLM_TRAIN_PER_SIDE = 60


def run_vlm_demo(out: Path, *, max_new_tokens: int = 30, console: Console | None = None) -> Path:
    """Demo VLM + ``no-stars`` bundle + a table of pictures answered without and with it."""
    from crvlm_sdk.build.pipeline import build_bundle
    from crvlm_sdk.demo import vlm as demo_vlm
    from crvlm_sdk.demo.shape_policies import write_no_stars
    from crvlm_sdk.policy import Policy, read_jsonl

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
    options = _fixed_options(VLM_BAND, VLM_STRENGTH, VLM_GATE_LAYERS)
    bundle = build_bundle(model, processor, policy_path, options=options, console=console)
    path = bundle.save(out / "bundle", overwrite=True)
    v = bundle.manifest.validation
    console.print(
        f"{_saved(bundle, path)}, image weight {bundle.manifest.extraction['image_weight']}; "
        f"validation: clean refusals {v['srs']:.0%} of star pictures, {v['brs']:.0%} of the others refused"
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
    for column in ("picture", "question", "star?", "gate p", "unsteered", "with the bundle"):
        table.add_column(column, overflow="fold")
    for row, p, a, b in zip(rows, scores.tolist(), plain, steered, strict=True):
        star = "[red]yes[/]" if not row.meta["in_scope"] else "[green]no[/]"
        table.add_row(escape(str(row.image)), escape(row.question), star, f"{p:.2f}", escape(a), escape(b))
    console.print(table)
    _explain(console, bundle)
    console.print(f"done in {time.perf_counter() - start:.0f}s")
    return path


def _saved(bundle: Bundle, path: Path) -> str:
    """The line both demos print once the bundle is on disk (where, how it steers, its gate)."""
    m = bundle.manifest
    return (f"bundle saved to [cyan]{path}[/]: steer layers {m.layers}, α={m.alpha:.3g}, "
            f"gate at {describe_layers(m.gate.layers)}")
