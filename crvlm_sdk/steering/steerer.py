"""The Steerer: applies refusal bundles to a frozen transformers model (the public face of
steering; the hook machinery is in :mod:`crvlm_sdk.steering.runtime`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from crvlm_sdk.activations.capture import (
    GATE_POSITION,
    Sample,
    capture,
    model_float_dtype,
    model_input_device,
    question_weights,
)
from crvlm_sdk.activations.hooks import (
    hooks_installed,
)
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.plugins.manager import PluginManager
from crvlm_sdk.steering.response import ResponseShaper, RowPlan, end_of_sequence_id, sentence_end_ids
from crvlm_sdk.steering.runtime import LoadedBundle, PassState, QuestionSpan, SteeringRuntime
from crvlm_sdk.types import ImageInput

_CACHE_KWARGS = ("cache", "past_key_values", "cache_position")
_ACTIVE_ATTR = "_crvlm_active_steerer"
#: ``response=`` argument: a whole spec, some of its fields, ``False`` (steering only) or None (as built)
ResponseOverride = ResponseSpec | Mapping[str, Any] | bool | None
_STEER_ONLY = {"mode": "steer", "opening": "", "stop_sentences": None}


class Steerer:
    """Applies one or more refusal bundles to a frozen transformers model."""

    def __init__(
        self,
        adapter: BackboneAdapter,
        bundles: Sequence[Bundle],
        *,
        plugins: PluginManager | None = None,
        check_fingerprint: bool = True,
    ) -> None:
        if not bundles:
            raise CrvlmError("Steerer needs at least one bundle")
        names = [b.name for b in bundles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CrvlmError(f"two bundles share the policy name {dupes}; names select bundles per row")
        self.adapter = adapter
        self.model = adapter.model
        for bundle in bundles:
            bundle.check_model(adapter, where=f"bundle {bundle.name!r}", check_fingerprint=check_fingerprint)
        loaded = [LoadedBundle(b, b.gate(plugins), torch.device("cpu")) for b in bundles]
        self._runtime = SteeringRuntime(self.model, adapter.decoder_layers(), loaded, self._question_span())
        self._sentence_ends: torch.Tensor | None = None

    def _question_span(self) -> QuestionSpan:
        """How the runtime finds each row's question in ``input_ids`` (as the build's capture does)."""
        adapter = self.adapter

        def span(input_ids: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor) -> torch.Tensor:
            return question_weights(input_ids, mask, last, adapter.question_opener(), adapter.image_token_ids())

        return span

    @classmethod
    def from_bundle(
        cls,
        model: torch.nn.Module,
        bundle: Bundle | str | Path | Sequence[Bundle | str | Path],
        processor: Any = None,
        *,
        adapter: str | None = None,
        plugins: PluginManager | None = None,
        check_fingerprint: bool = True,
    ) -> Steerer:
        """Load bundle(s) for ``model``; ``processor`` is found from the model's path if omitted."""
        if processor is None:
            processor = _find_processor(model)
        backbone = adapter_for(model, processor, adapter, plugins=plugins)
        items = [bundle] if isinstance(bundle, (Bundle, str, Path)) else list(bundle)
        loaded = [
            b if isinstance(b, Bundle) else Bundle.load(b, adapter=backbone, check_fingerprint=check_fingerprint)
            for b in items
        ]
        return cls(backbone, loaded, plugins=plugins, check_fingerprint=check_fingerprint)

    @classmethod
    def from_pretrained(
        cls,
        model: torch.nn.Module,
        path: str | Path | Sequence[str | Path],
        processor: Any = None,
        **kwargs: Any,
    ) -> Steerer:
        """:meth:`from_bundle` under the name PEFT adapters use (``PeftModel.from_pretrained``)."""
        return cls.from_bundle(model, path, processor, **kwargs)

    @property
    def bundle_names(self) -> list[str]:
        return [item.name for item in self._loaded]

    @property
    def bundles(self) -> list[Bundle]:
        return [item.bundle for item in self._loaded]

    @property
    def _state(self) -> PassState:
        return self._runtime.state

    @property
    def _loaded(self) -> list[LoadedBundle]:
        return self._runtime.loaded

    # -- public API -----------------------------------------------------------------------
    @contextmanager
    def apply(
        self,
        *,
        rows: Sequence[Sequence[str]] | None = None,
        bundles: Sequence[str] | None = None,
        response: ResponseOverride = None,
        alpha_scale: float = 1.0,
    ) -> Iterator[Steerer]:
        """Steer every forward/generate call on the model inside the block.

        The hooks are the model's, so while the block runs the model belongs to the thread that
        entered it: a forward call from another thread raises :class:`CrvlmError` instead of
        being steered by mistake. ``Steerer.generate(steer=False)`` inside the block runs unsteered.

        ``bundles`` limits which bundles apply to all rows; ``rows`` gives, per batch row, the
        names of the bundles that apply to that row (multi-tenant batches). ``response``
        overrides every bundle's response settings for the block: a :class:`ResponseSpec`,
        some of its fields (``{"stop_sentences": 2}``), or ``False`` for steering only.
        ``alpha_scale`` multiplies every bundle's steering strength for the block (the gate
        and the manifest are unchanged): 0 turns steering off, 1.2 pushes 20% harder.
        """
        if getattr(self.model, _ACTIVE_ATTR, None) is not None:
            raise CrvlmError("a Steerer is already active on this model; nested apply() is not supported")
        if not (alpha_scale >= 0 and alpha_scale != float("inf")):
            raise CrvlmError(f"alpha_scale must be a finite number >= 0, got {alpha_scale}")
        self._runtime.place()
        self._state.selection = self._selection(rows, bundles)
        self._state.alpha_scale = float(alpha_scale)
        override = _STEER_ONLY if response is False else (None if response is True else response)
        for item in self._loaded:
            item.response = item.bundle.manifest.response.updated(override)
        specs = self._runtime.hook_specs()
        original_generate = self.model.__dict__.get("generate")
        steerer = self

        def generate(*args: Any, **kwargs: Any) -> Any:
            shaper = steerer._shaper(kwargs.get("eos_token_id"))
            if shaper is not None:
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), shaper])
            steerer._state.in_generate, steerer._state.generate_started = True, False
            try:
                return type(steerer.model).generate(steerer.model, *args, **kwargs)
            finally:
                steerer._state.in_generate = False

        setattr(self.model, _ACTIVE_ATTR, self)
        try:
            with hooks_installed(specs):
                self.model.generate = generate
                self._state.active = True
                self._state.owner = threading.get_ident()
                yield self
        finally:
            self._state.active = False
            self._state.owner = None
            self._state.in_generate = False
            self._state.selection = None
            self._state.alpha_scale = 1.0
            if original_generate is None:
                self.model.__dict__.pop("generate", None)
            else:
                self.model.generate = original_generate
            delattr(self.model, _ACTIVE_ATTR)

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """No steering for the block, even inside this Steerer's ``apply()`` (hooks stay installed)."""
        was = self._state.active
        self._state.active = False
        try:
            yield
        finally:
            self._state.active = was

    def _shaper(self, eos_override: Any) -> ResponseShaper | None:
        """The logits processor that shapes refused rows in this ``generate`` call, if any bundle asks."""
        if not any(item.response.shapes for item in self._loaded):
            return None
        eos = end_of_sequence_id(self.model, self.adapter, eos_override)
        plans = [RowPlan.of(item.response, self.adapter, eos) for item in self._loaded]
        if self._sentence_ends is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._sentence_ends = sentence_end_ids(self.adapter, vocab)
        return ResponseShaper(plans, self._runtime.gate_buffers, self._sentence_ends, eos)

    def _selection(self, rows: Sequence[Sequence[str]] | None, bundles: Sequence[str] | None) -> torch.Tensor | None:
        names = self.bundle_names
        for name in [n for row in (rows or []) for n in row] + list(bundles or []):
            if name not in names:
                raise CrvlmError(f"unknown bundle {name!r}; this Steerer has {names}")
        if rows is None and bundles is None:
            return None
        if rows is None:
            return torch.tensor([[1.0] if n in bundles else [0.0] for n in names])
        return torch.tensor([[1.0 if n in row else 0.0 for row in rows] for n in names])

    def generate(
        self,
        questions: Sequence[str] | str,
        images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        *,
        system: str | None = None,
        rows: Sequence[Sequence[str]] | None = None,
        bundles: Sequence[str] | None = None,
        steer: bool = True,
        response: ResponseOverride = None,
        alpha_scale: float = 1.0,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer ``questions`` (greedy, 64 new tokens unless told otherwise).

        ``response`` and ``alpha_scale`` override the bundles' response settings and scale their
        steering for this call (see :meth:`apply`).
        """
        return self.generate_detailed(
            questions, images, system=system, rows=rows, bundles=bundles, steer=steer, response=response,
            alpha_scale=alpha_scale,
            **generate_kwargs,
        ).texts

    def generate_detailed(
        self,
        questions: Sequence[str] | str,
        images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        *,
        system: str | Sequence[str | None] | None = None,
        rows: Sequence[Sequence[str]] | None = None,
        bundles: Sequence[str] | None = None,
        steer: bool = True,
        response: ResponseOverride = None,
        alpha_scale: float = 1.0,
        **generate_kwargs: Any,
    ) -> Generation:
        """Like :meth:`generate`, also returning what judges read: first-step logits, ended rows.

        ``system`` may differ per row (a list), like ``rows``.
        """
        if isinstance(questions, str):
            questions = [questions]
        new_tokens = generate_kwargs.get("max_new_tokens", 64)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise CrvlmError(f"max_new_tokens must be an integer >= 1, got {new_tokens!r}")
        if not questions:
            return Generation([], None, [])
        batch = self.adapter.build_prompts(questions, images, system=system)
        batch = batch.to(model_input_device(self.model), model_float_dtype(self.model))
        first = _FirstLogits()
        kwargs: dict[str, Any] = {"max_new_tokens": 64, "do_sample": False, "pad_token_id": self.adapter.pad_token_id}
        kwargs.update(generate_kwargs)
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), first])
        with torch.inference_mode():
            if steer:
                with self.apply(rows=rows, bundles=bundles, response=response, alpha_scale=alpha_scale):
                    out = self.model.generate(**batch.inputs, **kwargs)
            else:
                with self._paused():
                    out = type(self.model).generate(self.model, **batch.inputs, **kwargs)
        new_tokens = out[:, batch.seq_len :].tolist()
        texts = [self.adapter.decode(row).strip() for row in new_tokens]
        stops = _eos_ids(self.model, kwargs.get("eos_token_id"))
        ended = [any(token in stops for token in row) for row in new_tokens]
        return Generation(texts, first.logits, ended)

    def gate_scores(
        self,
        questions: Sequence[str] | str,
        images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        *,
        system: str | None = None,
        batch_size: int = 16,
    ) -> dict[str, torch.Tensor]:
        """``{bundle name: (N,) float32}`` gate probabilities on the unsteered model."""
        if isinstance(questions, str):
            questions = [questions]
        if not questions:
            return {item.name: torch.zeros(0) for item in self._loaded}
        image_rows = list(images) if images is not None else [None] * len(questions)
        samples = [Sample(q, img) for q, img in zip(questions, image_rows, strict=True)]
        out: dict[str, torch.Tensor] = {}
        for features in dict.fromkeys(item.gate.features for item in self._loaded):
            items = [item for item in self._loaded if item.gate.features == features]
            layers = sorted({layer for item in items for layer in item.gate.layers})
            stats = capture(self.adapter, samples, layers, position=GATE_POSITION[features], system=system,
                            batch_size=batch_size, keep=True, progress=False)
            for item in items:
                out[item.name] = item.gate.score({layer: stats.rows(layer).to(item.gate_device)
                                                  for layer in item.gate.layers}).cpu()
        return {item.name: out[item.name] for item in self._loaded}


@dataclass
class Generation:
    texts: list[str]
    #: (B, V) float32 logits of the first generated token, on the CPU
    first_logits: torch.Tensor | None
    #: per row: the answer ended (end-of-sequence) before the token limit
    ended: list[bool] = field(default_factory=list)


def _eos_ids(model: torch.nn.Module, override: Any) -> set[int]:
    value = override if override is not None else getattr(model.generation_config, "eos_token_id", None)
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.flatten().tolist()}
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


class _FirstLogits(LogitsProcessor):
    """A logits processor that keeps the first step's scores and changes nothing."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = scores.detach().float().cpu()
        return scores


def _find_processor(model: torch.nn.Module) -> Any:
    import transformers

    source = getattr(model.config, "_name_or_path", "")
    if source and Path(source).is_dir():
        if model.config.get_text_config() is not model.config:  # a VLM: works without torchvision too
            from crvlm_sdk.models.processors import load_processor

            return load_processor(source, getattr(model.config, "model_type", None))
        for auto in (transformers.AutoProcessor, transformers.AutoTokenizer):
            try:
                return auto.from_pretrained(source)
            except (OSError, ValueError, KeyError):
                continue
    raise CrvlmError(
        "no processor given and none could be loaded from the model's directory",
        hint="pass processor= (the model's AutoProcessor or tokenizer)",
    )
