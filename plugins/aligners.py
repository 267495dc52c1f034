"""Counterfactual visual alignment: let the image alone trigger refusal.

Image-only counterfactual prompts keep the picture and drop the question. Out-of-scope
images are run under the teacher-forced refusal (refusal instruction + forced refusal
prefix), in-scope images under the plain prompt; the difference of the two means is the
image-driven refusal direction. The same image-only prompts (read at the last prompt token)
become extra gate training rows, so a "What is this?" over an out-of-scope picture is gated
like an explicit out-of-scope question.

Pairing is deliberate, not an accident of list order: the distinct images of each side are
sorted by path, shuffled with the build seed, and truncated to the smaller side's count, so
both means are over equally many images and the pairs ``(out[i], in[i])`` are reproducible
and recorded (``pairs`` in the result). Without images in the policy this is a no-op.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.activations.capture import Position, capture
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.components import VisualAligner
from crvlm_sdk.types import Sample

#: The "question" of an image-only prompt. An empty user text is not accepted by every chat
#: template, so a neutral request that carries no topic is used instead.
IMAGE_ONLY_TEXT = "What is this?"


def _distinct_images(samples: Sequence[Sample]) -> list[Any]:
    seen: dict[str, Any] = {}
    for s in samples:
        if s.image is not None:
            seen.setdefault(str(s.image), s.image)
    return [seen[key] for key in sorted(seen)]


def matched_images(in_scope: Sequence[Sample], out_of_scope: Sequence[Sample], seed: int) -> list[tuple[Any, Any]]:
    """Reproducible (out-of-scope image, in-scope image) pairs of equal-size image sets."""
    outs, ins = _distinct_images(out_of_scope), _distinct_images(in_scope)
    rng = random.Random(seed)
    rng.shuffle(outs)
    rng.shuffle(ins)
    n = min(len(outs), len(ins))
    return list(zip(outs[:n], ins[:n], strict=True))


class CounterfactualAligner(VisualAligner):
    name: ClassVar[str] = "counterfactual"

    def align(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        vectors: dict[int, torch.Tensor],
        *,
        refusal_instruction: str | None = None,
        refusal_prefix: str = "Sorry,",
        layers: Sequence[int] | None = None,
        seed: int = 0,
        batch_size: int = 8,
        progress: bool = True,
        gate_position: Position = "last_prompt",
        **options: Any,
    ) -> dict[str, Any]:
        """``{"directions": {layer: (H,)}, "gate_in": {layer: (n, F)}, "gate_out": ..., "pairs": [...]}``.

        The gate rows are read where the build's gate reads (``gate_position``: ``F = 2H`` for
        gates that also read the question). Empty dict when the policy has no images on one of
        the two sides.
        """
        if not adapter.supports_images:
            return {}
        pairs = matched_images(in_scope, out_of_scope, seed)
        if not pairs:
            return {}
        layers = sorted(vectors) if layers is None else sorted(layers)
        outs = [Sample(IMAGE_ONLY_TEXT, out_img) for out_img, _ in pairs]
        ins = [Sample(IMAGE_ONLY_TEXT, in_img) for _, in_img in pairs]
        common = {"batch_size": batch_size, "progress": progress}
        forced = capture(adapter, outs, layers, position="prefix_mean", system=refusal_instruction,
                         forced_prefix=refusal_prefix, description="counterfactual: refusal forced", **common)
        plain_in = capture(adapter, ins, layers, keep=True, description="counterfactual: in-scope images", **common)
        plain_out = capture(adapter, outs, layers, keep=True, description="counterfactual: out-of-scope images",
                            **common)
        gate_in, gate_out = plain_in, plain_out
        if gate_position != "last_prompt":
            gate_in = capture(adapter, ins, layers, keep=True, position=gate_position,
                              description="counterfactual: in-scope images (gate)", **common)
            gate_out = capture(adapter, outs, layers, keep=True, position=gate_position,
                               description="counterfactual: out-of-scope images (gate)", **common)
        return {
            "directions": {layer: forced.mean(layer) - plain_in.mean(layer) for layer in layers},
            "gate_in": {layer: gate_in.rows(layer) for layer in layers},
            "gate_out": {layer: gate_out.rows(layer) for layer in layers},
            "pairs": [(str(o), str(i)) for o, i in pairs],
        }
