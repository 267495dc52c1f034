"""The extension points of crvlm, as small abstract classes.

Built-in components (``crvlm_adapters``, ``crvlm_plugins``) and third-party plugins implement
these and register them by name through the pluggy hooks in :mod:`crvlm_sdk.hookspecs`.
Everything the runtime needs from a component is a method here, so a plugin never has to
reach into crvlm internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch
from pydantic import BaseModel, ConfigDict

from crvlm_sdk.errors import PluginError

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, Path, "Image.Image"]


class Fingerprint(BaseModel):
    """What identifies a backbone well enough to refuse a bundle built for another model.

    ``first_layer_sha256`` hashes the first decoder layer's weights rounded to bfloat16, so the
    same checkpoint loaded in float32, bfloat16 or float16 keeps one fingerprint while a
    fine-tune or a different checkpoint of the same architecture does not.
    """

    model_config = ConfigDict(extra="allow")

    model_type: str
    architectures: list[str]
    hidden_size: int
    num_layers: int
    vocab_size: int
    first_layer_sha256: str

    def differences(self, other: Fingerprint) -> list[str]:
        """Field-by-field mismatches as ``field: expected X, found Y`` lines."""
        out = []
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: bundle has {mine!r}, model has {theirs!r}")
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


class BackboneAdapter(ABC):
    """Knows one family of models: where its language decoder layers are and how it prompts.

    One adapter instance serves extraction, gating, generation and evaluation, so every stage
    sees byte-identical prompts. Implementations live in :mod:`crvlm_adapters` or in plugins;
    most only need :meth:`decoder_layers`, :meth:`render_prompt` and :meth:`encode_row` — the
    base class does batching, forced prefixes, left padding, positions and fingerprints.
    """

    name: ClassVar[str]
    #: transformers class names this adapter claims; shown by ``crvlm plugins``.
    model_classes: ClassVar[tuple[str, ...]] = ()
    supports_images: ClassVar[bool] = False
    #: most images one prompt may carry. Adapters that allow more than one also accept
    #: ``num_images=`` in :meth:`render_prompt` and a list of images in :meth:`encode_row`.
    max_images: ClassVar[int] = 1

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter claims ``model``; the default matches by class name."""
        return type(model).__name__ in cls.model_classes

    @abstractmethod
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers, in order (never the vision tower's)."""

    @abstractmethod
    def render_prompt(self, question: str, *, has_image: bool, system: str | None) -> str:
        """The chat-template text of one prompt, ending with the assistant header."""

    @abstractmethod
    def encode_row(self, text: str, image: ImageInput | None) -> dict[str, torch.Tensor]:
        """Model inputs for one rendered prompt, batch dimension 1, no padding."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a bare string (no special tokens), used for forced prefixes."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens removed."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """Id used for left padding."""

    # Implemented once here; adapters override only when their model is unusual.
    def build_prompts(
        self,
        questions: Sequence[str],
        images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        *,
        system: str | Sequence[str | None] | None = None,
        forced_prefix: str | None = None,
    ) -> PromptBatch:
        """One left-padded batch; each question has no image, one, or a list of up to ``max_images``."""
        from crvlm_sdk.prompts import build_prompt_batch

        return build_prompt_batch(self, questions, images, system=system, forced_prefix=forced_prefix)

    @property
    def hidden_size(self) -> int:
        from crvlm_sdk.prompts import text_config

        return int(text_config(self.model).hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def fingerprint(self) -> Fingerprint:
        from crvlm_sdk.prompts import fingerprint_model

        return fingerprint_model(self)


class Gate(ABC):
    """Per-input probability ``p(x)`` that ``x`` is out of scope, from ``h_g`` at one token.

    :meth:`score` runs inside a forward hook, possibly under ``torch.compile`` and CUDA graphs,
    so it must be pure tensor code: no ``.item()``, no Python branches on tensor values.
    """

    name: ClassVar[str]

    @abstractmethod
    def score(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` activations -> ``(B,)`` float32 probabilities in ``[0, 1]``."""

    def log_odds(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` -> ``(B,)`` float32 ``log(p / (1 - p))``.

        A gate read at several layers averages its members' log-odds; gates that know their
        logits exactly should return them (the default inverts :meth:`score`, which saturates).
        """
        return torch.logit(self.score(h).float(), eps=1e-6)

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned parameters, saved in the bundle's safetensors file as ``gate.<name>``
        (``gate.<layer>.<name>`` when the bundle reads its gate at several layers)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings (threshold, temperature...), saved in the manifest."""
        return {}

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Gate:
        """Rebuild the gate from :meth:`tensors` and :meth:`config`."""

    @classmethod
    def untrained(cls, hidden_size: int) -> Gate:
        """A gate ready for :meth:`fit` on ``hidden_size`` features (default: ``cls()``)."""
        try:
            return cls()
        except TypeError as exc:
            raise PluginError(f"gate {cls.name!r} needs constructor arguments ({exc})",
                              hint="give the gate class an `untrained(hidden_size)` classmethod") from None

    def fit(self, h_in: torch.Tensor, h_out: torch.Tensor, **options: Any) -> dict[str, float]:
        """Train on in-scope (label 0) and out-of-scope (label 1) activations; returns metrics."""
        raise NotImplementedError(f"gate {self.name!r} cannot be fitted")

    def calibrate(self, h_in_val: torch.Tensor, target_over_refusal: float = 0.02) -> float | None:
        """Move the decision threshold so held-out in-scope rows pass it at about the target rate.

        Gates without a threshold keep the default, which changes nothing and returns None.
        """
        return None

    def soften(self, temperature: float) -> None:
        """Set how sharply ``p`` goes from 0 to 1 around the threshold (for steering at runtime).

        Build pipelines call it after calibration; gates without a temperature ignore it.
        """
        return None

    def to(self, device: torch.device | str) -> Gate:
        """Move parameters to ``device`` (kept float32: gate maths is cheap and precision matters)."""
        params = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors().items()}
        return type(self).from_tensors(params, self.config())


class VectorExtractor(ABC):
    """Turns example data into one steering vector per layer."""

    name: ClassVar[str]

    @abstractmethod
    def extract(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        layers: Sequence[int],
        **options: Any,
    ) -> dict[int, torch.Tensor]:
        """Steering vectors ``{layer: (H,) float32}`` for ``layers``."""


class VisualAligner(ABC):
    """Makes the image alone able to trigger refusal (counterfactual visual alignment)."""

    name: ClassVar[str]

    @abstractmethod
    def align(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        vectors: dict[int, torch.Tensor],
        **options: Any,
    ) -> dict[str, Any]:
        """Return image-driven components (vectors, extra gate rows) as a dict of results.

        ``options["layers"]``, when given, are the layers results are needed at: the steering
        candidates and every gate layer (``vectors`` holds only the former).
        """


@dataclass(frozen=True)
class Candidate:
    """One setting a locator may choose: where and how hard to steer, and how refused rows read.

    ``strength`` is relative to the residual norm (0: no steering, only the gate and the
    response); ``decode_steps`` is how many generated tokens are steered (None: all);
    ``response`` holds :class:`~crvlm_sdk.bundle.ResponseSpec` fields that differ from the
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


class CandidateEvaluator(ABC):
    """Scores candidates on validation data for a locator (supplied by the build pipeline).

    ``evaluate.many(candidates)`` scores several at once (the build runs them in one batched
    ``generate``, so asking for many together is much cheaper than one by one); calling
    ``evaluate(band, strength)`` scores one candidate with the build's other settings.
    Each result holds ``srs`` (clean refusals), ``srs_keyword``, ``brs``, ``mb`` and ``alpha``.
    """

    defaults: Candidate

    @abstractmethod
    def many(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        """One score dict per candidate, in order."""

    def __call__(self, band: Sequence[int], strength: float) -> dict[str, Any]:
        base = self.defaults
        candidate = Candidate(tuple(band), float(strength), base.operator, base.decode_steps, base.response)
        return self.many([candidate])[0]


@dataclass
class LayerChoice:
    """Where to read the gate, where to steer and how hard (and, from a sweep that chose them,
    the operator, steered tokens and response settings; None keeps the build's)."""

    gate_layer: int
    band: list[int]
    alpha: float
    table: list[dict[str, Any]] = field(default_factory=list)
    candidate: Candidate | None = None


class LayerLocator(ABC):
    """Chooses gate layer, steering band and strength."""

    name: ClassVar[str]

    @abstractmethod
    def locate(self, num_layers: int, evaluate: Any, **options: Any) -> LayerChoice:
        """Pick a :class:`LayerChoice`; ``evaluate`` is a :class:`CandidateEvaluator`."""

    def candidate_layers(self, num_layers: int, **options: Any) -> list[int] | None:
        """Every layer ``locate`` may put in a band, given the same options; None: any layer.

        The build extracts vectors only there, and each capture pass stops after the deepest
        one (a sweep over early-middle layers needs less than half the model). The default
        keeps every layer, so a locator that does not say is never starved.
        """
        return None


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


class RefusalJudge(ABC):
    """Decides whether a generated answer is a refusal.

    ``context`` carries what the evaluator knows besides the text, per answer or per batch:
    ``ended`` (list of bool: the answer stopped before the token limit), ``first_logits``
    ((N, V) logits of the first generated token) and ``tokenizer``. A judge uses what it needs
    and ignores the rest.
    """

    name: ClassVar[str]
    #: whether the evaluator must keep first-token logits for this judge (they are large)
    needs_first_logits: ClassVar[bool] = False

    @abstractmethod
    def judge(self, answers: Sequence[str], **context: Any) -> list[bool]:
        """One verdict per answer: ``True`` means refused."""

    def assess(self, answers: Sequence[str], **context: Any) -> list[Verdict]:
        """Richer verdicts; a judge that only says refused or not counts every refusal as clean."""
        return [Verdict(declines=v, clean=v) for v in self.judge(answers, **context)]
