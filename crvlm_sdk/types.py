"""Plain data that crosses every stage: samples, prompt batches, fingerprints, verdicts.

A leaf module: it imports nothing else from crvlm, so every layer above may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, Path, "Image.Image"]


#: relative distance between weight sketches below which two models count as the same weights;
#: bfloat16 rounding moves a sketch by 0.1–0.2%, so 1% leaves a fivefold margin
SKETCH_TOLERANCE = 0.01


class Fingerprint(BaseModel):
    """What identifies a backbone well enough to refuse a bundle built for another model.

    The first decoder layer's weights are identified twice. ``first_layer_sha256`` hashes them
    rounded to bfloat16: equal hashes are the same weights. Rounding is not enough across dtypes
    (float32 → float16 → bfloat16 rounds some weights differently from float32 → bfloat16), so
    ``first_layer_sketch`` also keeps a few fixed random projections of sampled weights; when
    the hashes differ, sketches within ``SKETCH_TOLERANCE`` (relative) are the same weights in
    another precision. A fine-tune that moves the first layer by more than about 1% is told
    apart; bundles written before sketches existed are compared by hash alone.
    """

    model_config = ConfigDict(extra="allow")

    model_type: str
    architectures: list[str]
    hidden_size: int
    num_layers: int
    vocab_size: int
    first_layer_sha256: str
    first_layer_sketch: dict[str, list[float]] | None = None

    def differences(self, other: Fingerprint) -> list[str]:
        """Field-by-field mismatches as ``field: expected X, found Y`` lines."""
        out = []
        for name in type(self).model_fields:
            if name in ("first_layer_sha256", "first_layer_sketch"):
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: bundle has {mine!r}, model has {theirs!r}")
        if self.first_layer_sha256 == other.first_layer_sha256:
            return out
        mine_sketch, their_sketch = self.first_layer_sketch, other.first_layer_sketch
        if not mine_sketch or not their_sketch or mine_sketch.keys() != their_sketch.keys():
            out.append(f"first_layer_sha256: bundle has {self.first_layer_sha256!r}, "
                       f"model has {other.first_layer_sha256!r}")
            return out
        gaps = {}
        for name, mine in mine_sketch.items():
            a, b = torch.tensor(mine, dtype=torch.float64), torch.tensor(their_sketch[name], dtype=torch.float64)
            gaps[name] = float((a - b).norm() / a.norm().clamp_min(1e-12)) if a.shape == b.shape else float("inf")
        name, gap = max(gaps.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
        if not gap <= SKETCH_TOLERANCE:  # NaN in a sketch counts as a difference
            out.append(f"first-layer weights: the model's {name} differs from the bundle's by {gap:.1%} "
                       f"(more than {SKETCH_TOLERANCE:.0%}; a change of precision moves it by about 0.2%)")
        return out
        a, b = torch.tensor(mine_sketch, dtype=torch.float64), torch.tensor(their_sketch, dtype=torch.float64)
        gap = float((a - b).norm() / a.norm().clamp_min(1e-12))
        if not gap <= SKETCH_TOLERANCE:  # NaN in a sketch counts as a difference
            out.append(f"first-layer weights: the model's differ from the bundle's by {gap:.1%} "
                       f"(more than {SKETCH_TOLERANCE:.0%}; a precision change moves them by ~0.1%)")
        return out


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of chat prompts plus the token positions crvlm reads.

    ``last_prompt_index`` is the last token of the prompt proper (the end of the assistant
    header); ``prefix_start``/``prefix_end`` delimit the forced assistant prefix (empty, i.e.
    equal, when none was forced). Positions are absolute indices into the padded sequence.
    """

    inputs: dict[str, torch.Tensor]
    last_prompt_index: torch.Tensor
    prefix_start: torch.Tensor
    prefix_end: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptBatch:
        """Move tensors to ``device``; floating inputs (pixels) also take ``dtype`` if given."""
        moved = {}
        for key, value in self.inputs.items():
            if dtype is not None and value.is_floating_point():
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        return PromptBatch(
            moved,
            self.last_prompt_index.to(device),
            self.prefix_start.to(device),
            self.prefix_end.to(device),
        )


@dataclass
class Sample:
    """One example question, optionally over an image, optionally with a reference answer.

    ``answer`` may list several accepted answers (``("two", "2")``); any one of them counts.
    """

    question: str
    image: ImageInput | None = None
    answer: str | tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One setting a locator may choose: where and how hard to steer, and how refused rows read.

    ``strength`` is relative to the residual norm (0: no steering, only the gate and the
    response); ``decode_steps`` is how many generated tokens are steered (None: all);
    ``response`` holds :class:`~crvlm_sdk.bundle.manifest.ResponseSpec` fields that differ from the
    build's default response (``{"stop_sentences": 2}``, ``{"mode": "template"}``).
    """

    band: tuple[int, ...]
    strength: float
    operator: str = "rotation"
    decode_steps: int | None = 8
    response: Mapping[str, Any] = field(default_factory=dict)
    image_weight: float = 0.0

    def label(self) -> str:
        """Short description for sweep tables: steering, then how refused rows read."""
        spec = self.response
        if spec.get("mode") == "template":
            return "template answer"
        steering = "no steering" if self.strength == 0 else (
            f"{self.operator} {list(self.band)} × {self.strength:g}, "
            f"{'all' if self.decode_steps is None else self.decode_steps} tok")
        stop = spec.get("stop_sentences")
        shaping = [
            "opening" if spec.get("opening") else "no opening",
            f"stop {stop}" if stop else "no stop",
        ]
        image = f", image {self.image_weight:g}" if self.image_weight else ""
        return f"{steering}; {', '.join(shaping)}{image}"


@dataclass
class LayerChoice:
    """Where to read the gate, where to steer and how hard (and, from a sweep that chose them,
    the operator, steered tokens and response settings; None keeps the build's)."""

    gate_layer: int
    band: list[int]
    alpha: float
    table: list[dict[str, Any]] = field(default_factory=list)
    candidate: Candidate | None = None


@dataclass(frozen=True)
class Verdict:
    """How one answer reads.

    ``declines``: it opens by declining (any refusal, however broken: this is what counts as
    over-refusal on in-scope questions). ``clean``: a refusal a product could ship (it declines,
    does not loop, is made of words, stays a refusal and ends). ``degenerate``: it loops or is
    not made of words, refusal or not (an in-scope answer that became degenerate under steering
    has degraded). ``reason`` says why a declining answer is not clean ("" otherwise).
    """

    declines: bool
    clean: bool
    degenerate: bool = False
    reason: str = ""
