"""Evaluation of a bundle against baselines and ablations on labelled questions, and the report.

Systems compared on the same rows, prompts and decoding settings:

- ``bundle``: the bundle as shipped (gate, steering and its response settings);
- ``none``: the unsteered model (always run: it is what in-scope answers are compared with);
- ``no-gate``: the bundle applied to every input (``p = 1``);
- ``system-prompt``: the unsteered model with the policy's refusal instruction as system message;
- ablations of the response (``ABLATIONS``): steering with or without a forced opening, with or
  without ending after one sentence, the opening without steering, and the template answer.

All systems of a row chunk run in one batched ``generate``: each system is a bundle variant
selected per row, so every system sees the same padding and the unsteered rows of a batch
are exactly what an unsteered model answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crvlm_sdk.activations.capture import progress_bar
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.manifest import GateSpec, ResponseSpec
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.evaluation.metrics import answer_matches, compute_metrics
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager
from crvlm_sdk.policy import DEFAULT_MESSAGE, DEFAULT_OPENING
from crvlm_sdk.steering.steerer import Steerer
from crvlm_sdk.types import Sample, Verdict

BASELINES = ("none", "no-gate", "system-prompt")
#: response ablations: (steering on, forced opening, stop after one sentence) or the template
ABLATIONS: dict[str, tuple[bool, bool, bool] | None] = {
    "steer-only": (True, False, False),
    "steer+stop": (True, False, True),
    "opening-only": (False, True, False),
    "opening+stop": (False, True, True),
    "opening+steer": (True, True, False),
    "opening+steer+stop": (True, True, True),
    "template": None,
}
SYSTEMS = (*BASELINES, *ABLATIONS)


def without_gate(bundle: Bundle) -> Bundle:
    """The same vectors and response with the ``always`` gate: every input is refused."""
    layer = bundle.manifest.gate.layers[-1]
    gate = GateSpec(type="always", layers=[layer], params=[], configs=[{}])
    return bundle.replaced(gate=gate, gate_tensors={layer: {}})


def ablation(bundle: Bundle, name: str, *, opening: str, message: str) -> Bundle:
    """The bundle's gate and vectors with the response of ablation ``name``."""
    spec = bundle.manifest.response
    plan = ABLATIONS[name]
    if plan is None:
        response = ResponseSpec(mode="template", message=message, threshold=spec.threshold)
        return bundle.replaced(response=response)
    steering, forced, stop = plan
    response = ResponseSpec(opening=opening if forced else "", stop_sentences=(spec.stop_sentences or 1) if stop
                            else None, threshold=spec.threshold)
    return bundle.replaced(response=response, alpha=bundle.manifest.alpha if steering else 0.0)


@dataclass(frozen=True)
class System:
    """One way of answering: the bundle (by Steerer name) steering its rows, and a system prompt."""

    name: str
    bundle: str | None = None
    system_prompt: str | None = None


@dataclass
class Answers:
    texts: list[str]
    #: per row: the model stopped before the token limit
    ended: list[bool]
    first_logits: torch.Tensor | None = None


def run_systems(
    steerer: Steerer,
    rows: Sequence[Sample],
    systems: Sequence[System],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    keep_logits: bool = False,
    on_batch: Callable[[int], None] | None = None,
    alpha_scale: float = 1.0,
) -> dict[str, Answers]:
    """Greedy answers of every system to every row; each chunk of rows runs for all systems in
    one batched ``generate`` (``batch_size`` rows per call, whole chunks of rows at a time)."""
    if not systems:
        raise CrvlmError("no systems to run")
    chunk = max(1, batch_size // len(systems))
    out = {s.name: Answers([], [], [] if keep_logits else None) for s in systems}  # type: ignore[arg-type]
    any_image = any(s.image is not None for s in rows)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        jobs = [(system, sample) for system in systems for sample in part]
        prompts = [system.system_prompt for system, _ in jobs]
        gen = steerer.generate_detailed(
            [sample.question for _, sample in jobs],
            [sample.image for _, sample in jobs] if any_image else None,
            system=prompts if any(p is not None for p in prompts) else None,
            rows=[[system.bundle] if system.bundle else [] for system, _ in jobs],
            max_new_tokens=max_new_tokens,
            alpha_scale=alpha_scale,
        )
        for i, (system, _) in enumerate(jobs):
            answers = out[system.name]
            answers.texts.append(gen.texts[i])
            answers.ended.append(gen.ended[i])
            if keep_logits and gen.first_logits is not None:
                answers.first_logits.append(gen.first_logits[i])  # type: ignore[union-attr]
        if on_batch is not None:
            on_batch(len(jobs))
    for answers in out.values():
        if keep_logits:
            answers.first_logits = torch.stack(answers.first_logits) if answers.first_logits else None  # type: ignore[arg-type]
    return out


def evaluate(
    steerer: Steerer,
    rows: Sequence[Sample],
    *,
    baselines: Sequence[str] = BASELINES,
    system_prompt: str | None = None,
    opening: str | None = None,
    message: str | None = None,
    judge: str = "strict",
    batch_size: int = 32,
    max_new_tokens: int = 48,
    progress: bool = True,
    plugins: PluginManager | None = None,
) -> dict[str, Any]:
    """Run the bundle, the unsteered model and ``baselines`` (any of :data:`SYSTEMS`) on
    labelled ``rows``; returns the report as a dict.

    ``opening`` and ``message`` are what the ablations force or answer when the bundle's own
    response has none (the policy's, or crvlm's defaults for the bundle's subject).
    """
    if len(steerer.bundle_names) != 1:
        raise CrvlmError("evaluate one bundle at a time")
    if not rows:
        raise CrvlmError("no evaluation rows")
    unknown = sorted(set(baselines) - set(SYSTEMS))
    if unknown:
        raise CrvlmError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    for s in rows:
        if "in_scope" not in s.meta:
            raise CrvlmError(f"evaluation row {s.question!r} has no `in_scope` label")
    manager = plugins or get_plugin_manager()
    judge_impl = manager.get("judge", judge)()  # an unknown judge fails before anything is generated
    bundle = steerer.bundles[0]
    spec = bundle.manifest.response
    subject = bundle.manifest.policy.subject or bundle.name
    opening = spec.opening or opening or DEFAULT_OPENING
    message = spec.message or message or DEFAULT_MESSAGE.format(subject=subject)
    instruction = system_prompt or bundle.manifest.extraction.get("refusal_instruction")
    if "system-prompt" in baselines and not instruction:
        raise CrvlmError("the system-prompt baseline needs the refusal instruction",
                         hint="pass --policy, or a bundle built by crvlm build-bundle")

    names = ["bundle", "none", *[b for b in baselines if b != "none"]]
    variants: list[Bundle] = [bundle]
    systems: list[System] = []
    for name in names:
        if name == "bundle":
            systems.append(System(name, bundle.name))
        elif name == "none":
            systems.append(System(name))
        elif name == "system-prompt":
            systems.append(System(name, system_prompt=instruction))
        else:
            variant = without_gate(bundle) if name == "no-gate" else ablation(bundle, name, opening=opening,
                                                                               message=message)
            variants.append(variant.replaced(name=f"{bundle.name}:{name}"))
            systems.append(System(name, variants[-1].name))
    runner = Steerer(steerer.adapter, variants, plugins=manager)

    scores = steerer.gate_scores([s.question for s in rows], _images(rows), batch_size=batch_size)[bundle.name]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"eval {len(systems)} systems", total=len(rows) * len(systems))
        answers = run_systems(runner, rows, systems, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              keep_logits=judge_impl.needs_first_logits, on_batch=lambda n: bar.advance(task, n))
    samples = report_samples(rows, scores, answers)
    report = {
        "bundle": {},
        "baselines": {name: {} for name in names if name != "bundle"},
        "samples": samples,
        "settings": {"judge": judge, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "policy": bundle.manifest.policy.name, "system_prompt": instruction,
                     "bundle_layers": bundle.manifest.layers, "bundle_alpha": bundle.manifest.alpha,
                     "bundle_operator": bundle.manifest.operator, "decode_steps": bundle.manifest.decode_steps,
                     "response": spec.model_dump(), "ablation_opening": opening, "ablation_message": message,
                     "gate": f"{bundle.manifest.gate.type}@{','.join(map(str, bundle.manifest.gate.layers))}"},
    }
    logits = {name: got.first_logits for name, got in answers.items()}
    return judge_report(report, judge=judge, plugins=manager, first_logits=logits,
                        tokenizer=steerer.adapter.tokenizer)


def report_samples(rows: Sequence[Sample], scores: Sequence[float] | torch.Tensor,
                   answers: dict[str, Answers]) -> list[dict[str, Any]]:
    """One report row per labelled sample: its data, the bundle's gate score and every system's
    answer (what :func:`judge_report` judges)."""
    return [{
        "question": s.question,
        "image": None if s.image is None else str(s.image),
        "in_scope": bool(s.meta["in_scope"]),
        "reference_answer": list(s.answer) if isinstance(s.answer, tuple) else s.answer,
        "gate_score": float(scores[i]),
        "answers": {name: answers[name].texts[i] for name in answers},
        "ended": {name: answers[name].ended[i] for name in answers},
    } for i, s in enumerate(rows)]


def judge_report(
    report: dict[str, Any],
    *,
    judge: str = "strict",
    plugins: PluginManager | None = None,
    first_logits: dict[str, torch.Tensor | None] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """(Re)judge every stored answer of ``report`` and recompute its metrics, in place.

    A judge that improves should not need the answers generated again: ``crvlm rejudge``
    calls this on a written report. Judges that read first-token logits need ``first_logits``
    (only an evaluation that just ran has them).
    """
    manager = plugins or get_plugin_manager()
    judge_impl = manager.get("judge", judge)()
    keyword = manager.get("judge", "keyword")()
    samples = report["samples"]
    if not samples:
        raise CrvlmError("the report has no samples")
    names = list(samples[0]["answers"])
    if "none" not in names or "bundle" not in names:
        raise CrvlmError("the report lacks the bundle's or the unsteered model's answers")
    in_scope = [bool(s["in_scope"]) for s in samples]
    threshold = ResponseSpec.model_validate(report["settings"].get("response", {})).threshold
    passed = [ins and s["gate_score"] < threshold for ins, s in zip(in_scope, samples, strict=True)]
    verdicts: dict[str, list[Verdict]] = {}
    for name in names:
        texts = [s["answers"][name] for s in samples]
        ended = [s["ended"][name] for s in samples] if all("ended" in s for s in samples) else None
        verdicts[name] = judge_impl.assess(texts, ended=ended, tokenizer=tokenizer,
                                           first_logits=(first_logits or {}).get(name))
        for s, v, kw in zip(samples, verdicts[name], keyword.judge(texts), strict=True):
            s.setdefault("refused", {})[name] = v.clean
            s.setdefault("declined", {})[name] = v.declines
            s.setdefault("reason", {})[name] = v.reason
            s.setdefault("keyword", {})[name] = kw
    for name in names:
        v = verdicts[name]
        texts = [s["answers"][name] for s in samples]
        correct = [_matches(a, s["reference_answer"]) for a, s in zip(texts, samples, strict=True)]
        metrics = compute_metrics([x.clean for x in v], in_scope, correct, declined=[x.declines for x in v],
                                  keyword=[s["keyword"][name] for s in samples]).as_dict()
        changed = [ins and s["answers"][name] != s["answers"]["none"] for ins, s in zip(in_scope, samples, strict=True)]
        degraded = [ins and x.degenerate and not y.degenerate
                    for ins, x, y in zip(in_scope, v, verdicts["none"], strict=True)]
        metrics.update({
            "in_changed": sum(changed),
            "in_degraded": sum(degraded),
            "passed_n": sum(passed),
            "passed_same": sum(p and not c for p, c in zip(passed, changed, strict=True)),
            "reasons_out": dict(Counter(x.reason for x, ins in zip(v, in_scope, strict=True)
                                        if not ins and not x.clean)),
        })
        if name == "bundle":
            report["bundle"] = metrics
        else:
            report["baselines"][name] = metrics
    report["settings"]["judge"] = judge
    return report


def _matches(answer: str, reference: str | list[str] | None) -> bool | None:
    if reference is None:
        return None
    return answer_matches(answer, reference if isinstance(reference, str) else tuple(reference))


def _images(rows: Sequence[Sample]) -> list[Any] | None:
    images = [s.image for s in rows]
    return images if any(i is not None for i in images) else None


