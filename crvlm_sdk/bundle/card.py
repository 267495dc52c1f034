"""The ``README.md`` model card written into every bundle: what a person browsing a bundle
directory (or a model hub page) needs to know to trust and load it."""

from __future__ import annotations

from crvlm_sdk.bundle.manifest import Manifest

MODEL_CARD = "README.md"


def model_card(manifest: Manifest, directory: str) -> str:
    """Markdown with YAML front matter (hub metadata), written from the manifest alone."""
    m, v = manifest, manifest.validation
    base = m.base_model_name_or_path or ", ".join(m.backbone.architectures)
    steering = "none (the gate and the response settings only)" if m.alpha == 0 else (
        f"{m.operator} at layers {m.layers}, α = {m.alpha:.4g}, on {m.steered_tokens()}")
    gate_layers = ", ".join(str(layer) for layer in m.gate.layers)
    lines = [
        "---",
        "library_name: crvlm",
        *([f"base_model: {m.base_model_name_or_path}"] if m.base_model_name_or_path else []),
        "tags: [crvlm, refusal, activation-steering]",
        "---",
        "",
        f"# crvlm refusal bundle: {m.policy.name}",
        "",
        (m.policy.description or f"Answers questions about {m.policy.subject or m.policy.name}; refuses the rest."),
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base} ({m.backbone.model_type}, {m.backbone.num_layers} layers × "
        f"{m.backbone.hidden_size}){f', revision {m.base_model_revision}' if m.base_model_revision else ''} |",
        f"| adapter | {m.adapter} |",
        f"| subject | {m.policy.subject or '-'} ({m.policy.n_in_scope} in-scope / {m.policy.n_out_of_scope} "
        "out-of-scope training questions) |",
        f"| gate | {m.gate.type} at layer{'s' if len(m.gate.layers) > 1 else ''} {gate_layers} |",
        f"| steering | {steering} |",
        f"| refused answers | {m.response.describe()} |",
        f"| format | crvlm bundle {m.format_version} (crvlm {m.crvlm_version}), {m.created} |",
        "",
    ]
    if "srs" in v:
        lines += [
            f"Validation ({v.get('n_out', '?')} out-of-scope / {v.get('n_in', '?')} in-scope questions, judge "
            f"`{v.get('judge', '?')}`): clean refusals {v['srs']:.3f}, in-scope answers declined {v['brs']:.3f}; "
            f"the gate caught {v.get('gate_caught', float('nan')):.3f} of out-of-scope questions and flagged "
            f"{v.get('gate_flagged', float('nan')):.3f} of in-scope ones. Test-split figures come from "
            "`crvlm eval`.",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from crvlm_sdk import Steerer",
        "",
        f'steerer = Steerer.from_pretrained(model, "{directory}", processor)  # the base model above',
        'print(steerer.generate(["Your question"]))',
        "```",
        "",
        f"or `crvlm generate --bundle {directory} \"Your question\"`; `crvlm inspect {directory}` shows every "
        "setting. The bundle refuses to load on a model whose fingerprint differs from the one it was built on.",
        "",
    ]
    return "\n".join(lines)
