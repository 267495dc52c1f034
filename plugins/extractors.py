"""Built-in vector extractors: teacher-forced refusal vectors and the mean-difference baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.activations.capture import capture, capture_forced
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.components import VectorExtractor
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.types import Sample


class TeacherForcedExtractor(VectorExtractor):
    """``v_l = mean(h_l | refusal forced) − mean(h_l | reference)`` over out-of-scope samples.

    The refusal side runs the refusal instruction as system message, the user turn, and the
    refusal prefix forced as the start of the reply. The reference side is either the plain
    prompt read at its last token (``contrast="plain"``, the CR-VLM authors' recipe) or the
    same prompt with a compliant prefix forced (``contrast="compliant"``), which cancels what
    the two forced replies share and leaves the refusal-vs-compliance direction. ``read``
    chooses the last forced token or the mean over the forced tokens.
    """

    name: ClassVar[str] = "teacher-forced"

    def extract(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        layers: Sequence[int],
        *,
        refusal_instruction: str | None = None,
        refusal_prefix: str = "Sorry,",
        compliant_prefix: str = "Sure,",
        contrast: str = "compliant",
        read: str = "mean",
        batch_size: int = 8,
        progress: bool = True,
        **options: Any,
    ) -> dict[int, torch.Tensor]:
        if not out_of_scope:
            raise CrvlmError("teacher-forced extraction needs out-of-scope samples")
        if contrast not in ("plain", "compliant"):
            raise CrvlmError(f"contrast must be 'plain' or 'compliant', got {contrast!r}")
        if read not in ("last", "mean"):
            raise CrvlmError(f"read must be 'last' or 'mean', got {read!r}")
        position = "prefix_last" if read == "last" else "prefix_mean"
        common = {"batch_size": batch_size, "progress": progress}
        if contrast == "plain":
            refusal = capture(
                adapter, out_of_scope, layers, position=position, system=refusal_instruction,
                forced_prefix=refusal_prefix, description="refusal forced", **common,
            )
            reference = capture(adapter, out_of_scope, layers, position="last_prompt",
                                description="plain prompts", **common)
        else:
            # both forced replies share the whole prompt: run it once (capture_forced)
            refusal, reference = capture_forced(
                adapter, out_of_scope, layers, [refusal_prefix, compliant_prefix], position=position,
                system=refusal_instruction, description="refusal and compliance forced", **common,
            )
        return {layer: refusal.mean(layer) - reference.mean(layer) for layer in refusal.layers}


class MeanDiffExtractor(VectorExtractor):
    """Baseline: mean of out-of-scope minus mean of in-scope plain prompts (last token)."""

    name: ClassVar[str] = "mean-diff"

    def extract(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        layers: Sequence[int],
        *,
        batch_size: int = 8,
        progress: bool = True,
        **options: Any,
    ) -> dict[int, torch.Tensor]:
        if not in_scope or not out_of_scope:
            raise CrvlmError("mean-diff extraction needs in-scope and out-of-scope samples")
        common = {"batch_size": batch_size, "progress": progress}
        out = capture(adapter, out_of_scope, layers, description="out-of-scope", **common)
        inn = capture(adapter, in_scope, layers, description="in-scope", **common)
        return {layer: out.mean(layer) - inn.mean(layer) for layer in out.layers}
