"""Runtime steering: ``h_l ← h_l + α·p(x)·v_l`` on a frozen model, gated per input.

How a forward pass is steered (all hooks installed by :meth:`Steerer.apply`, removed on exit):

- a pre-hook on the top-level model decides whether this call is a *prefill* (a new prompt)
  or a *decoding step*, and at prefill computes each row's last real token from the
  attention mask (tensor ops, no host sync);
- at prefill each bundle's gate reads ``h_g`` at that token and writes ``p`` into a
  preallocated buffer with ``copy_``; decoding steps reuse the frozen value. A gate read at
  several layers adds each layer's log-odds into a buffer and writes ``p`` at its last one.
  If a gate layer sits at or above any steering band, an unsteered *pre-pass* (stopped right
  after the last gate layer) reads the gate first, so gates always see the model they were
  trained on;
- every layer of a bundle's band adds ``scale[b] · v_l`` where ``scale = α·p·row_mask``;
- a bundle whose manifest sets ``decode_steps = k`` steers the prompt and the first ``k``
  generated tokens only, then its ``scale`` is zeroed in place. On small models a push strong
  enough to start a refusal wrecks the text if it never lets go; stopping after a few tokens
  leaves a refusal opening that the model continues on its own. Token positions decide, so
  generation without a KV cache steers the same tokens as cached generation;
- inside ``generate``, a bundle's ``response`` settings (forced opening, stop after n
  sentences, or a template answer) are applied to the rows its gate refuses by a logits
  processor that reads the same gate buffers (:mod:`crvlm_sdk.response`).

Inside ``model.generate`` the first forward call is the prefill and every later one a
decoding step, with or without KV cache (so cached and uncached generation agree). Outside
``generate``, a call with a non-empty cache is a decoding step. Buffers are updated in place
and never rebound, so a ``torch.compile``d decoding step (static cache, CUDA graphs) keeps
reading the current gate. A graph compiled under one set of hooks is not reused under
another: dynamo re-checks module hooks (tests/test_compile.py swaps two Steerers with the same
hook layout through one compiled ``generate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from crvlm_sdk.activations.capture import Sample, capture, model_float_dtype, model_input_device
from crvlm_sdk.activations.hooks import (
    HookSpec,
    StopForward,
    hooks_installed,
    last_token_index,
    layer_hidden,
    module_device_dtype,
    with_hidden,
)
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.bundle.manifest import ResponseSpec, gate_needs_prepass
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.plugins.manager import PluginManager
from crvlm_sdk.steering.response import ResponseShaper, RowPlan, end_of_sequence_id, sentence_end_ids
from crvlm_sdk.types import ImageInput

_CACHE_KWARGS = ("cache", "past_key_values", "cache_position")
_ACTIVE_ATTR = "_crvlm_active_steerer"
#: ``response=`` argument: a whole spec, some of its fields, ``False`` (steering only) or None (as built)
ResponseOverride = ResponseSpec | Mapping[str, Any] | bool | None
_STEER_ONLY = {"mode": "steer", "opening": "", "stop_sentences": None}


@dataclass
class _Loaded:
    """One bundle prepared for a model: gate and vectors on the right devices."""

    bundle: Bundle
    gate: LayerGates
    gate_device: torch.device
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # α·v_l on layer's device/dtype
    in_pass_gate: bool = True
    #: response settings in force for the current ``apply()`` block
    response: ResponseSpec = field(default_factory=ResponseSpec)
    # Per-row buffers, reallocated only when the batch size changes.
    p: torch.Tensor | None = None
    #: sum of log-odds over the gate layers read so far (gates read at several layers)
    log_odds: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    #: (1, seq, 1) 0/1 per token when a ``decode_steps`` limit falls inside this call's tokens
    token_mask: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.bundle.name


@dataclass
class _State:
    active: bool = False
    in_generate: bool = False
    generate_started: bool = False
    in_prepass: bool = False
    prefill: bool = False
    step: int = 0  # decoding steps since the last prefill
    prefill_len: int = 0
    last_index: torch.Tensor | None = None
    selection: torch.Tensor | None = None  # (n_bundles, rows) float32 on CPU, or None = all on
    alpha_scale: float = 1.0  # multiplies every bundle's α inside the current apply() block


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
        self._layers = adapter.decoder_layers()
        for bundle in bundles:
            bundle.check_model(adapter, where=f"bundle {bundle.name!r}", check_fingerprint=check_fingerprint)
        self._loaded = [_Loaded(b, b.gate(plugins), torch.device("cpu")) for b in bundles]
        self._state = _State()
        self._placed_for: tuple[tuple[torch.device, torch.dtype], ...] | None = None
        self._sentence_ends: torch.Tensor | None = None
        self._place()

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

    # -- placement ------------------------------------------------------------------------
    def _place(self) -> None:
        """Cache α·v on each layer's own device and dtype (re-done if the model moved)."""
        placement = tuple(module_device_dtype(layer) for layer in self._layers)
        if placement == self._placed_for:
            return
        with torch.inference_mode(False):
            self._place_on(placement)

    def _place_on(self, placement: tuple[tuple[torch.device, torch.dtype], ...]) -> None:
        steered = {layer for item in self._loaded for layer in item.bundle.manifest.layers}
        for item in self._loaded:
            m = item.bundle.manifest
            gate_device, _ = placement[m.gate.layers[-1]]
            item.gate = item.gate.to(gate_device)
            item.gate_device = gate_device
            item.vectors = {
                layer: (m.alpha * vec).to(device=placement[layer][0], dtype=placement[layer][1])
                for layer, vec in item.bundle.vectors.items()
            }
            # any bundle's steering may change what another bundle's gate reads
            item.in_pass_gate = not gate_needs_prepass(m.gate.layers, steered)
            item.p = item.log_odds = item.row_mask = item.scale = None
        self._placed_for = placement

    # -- hooks ----------------------------------------------------------------------------
    def _hook_specs(self) -> list[HookSpec]:
        specs = [HookSpec(self.model, self._pre_forward, kind="pre", with_kwargs=True)]
        gate_layers: dict[int, list[_Loaded]] = {}
        band_layers: dict[int, list[_Loaded]] = {}
        for item in self._loaded:
            for layer in item.gate.layers:
                gate_layers.setdefault(layer, []).append(item)
            if not item.response.steers:
                continue  # template answers need the gate only
            for layer in item.bundle.manifest.layers:
                band_layers.setdefault(layer, []).append(item)
        prepass_items = [item for item in self._loaded if not item.in_pass_gate]
        self._prepass_stop = max((i.gate.last_layer for i in prepass_items), default=-1)
        for layer in sorted(set(gate_layers) | set(band_layers)):
            specs.append(
                HookSpec(self._layers[layer], self._make_layer_hook(layer, gate_layers.get(layer, []),
                                                                    band_layers.get(layer, [])))
            )
        return specs

    def _make_layer_hook(self, layer: int, gates: list[_Loaded], band: list[_Loaded]):
        state = self._state
        in_pass = [g for g in gates if g.in_pass_gate]
        pre = [g for g in gates if not g.in_pass_gate]
        stop_here = layer == self._prepass_stop

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if state.in_prepass:
                if pre:
                    self._read_gates(pre, layer, layer_hidden(output))
                if stop_here:
                    raise StopForward
                return None
            if state.prefill and in_pass:
                self._read_gates(in_pass, layer, layer_hidden(output))
            if not band:
                return None
            h = layer_hidden(output)
            for item in band:
                h = _steer(h, item.scale, item.vectors[layer], item.bundle.manifest.operator, item.token_mask)
            return with_hidden(output, h)

        return hook

    def _read_gates(self, items: list[_Loaded], layer: int, h: torch.Tensor) -> None:
        """Read each item's gate at ``layer``; ``p`` is written once its last gate layer is read."""
        last = self._state.last_index.to(h.device)
        rows = h[torch.arange(h.shape[0], device=h.device), last]
        for item in items:
            gate, here = item.gate, rows.to(item.gate_device)
            if len(gate.layers) == 1:
                p = gate.gates[layer].score(here)
            else:
                log_odds = gate.log_odds(layer, here)
                if layer == gate.layers[0]:
                    item.log_odds.copy_(log_odds)
                else:
                    item.log_odds.add_(log_odds)
                if layer != gate.last_layer:
                    continue
                p = gate.combine(item.log_odds)
            item.p.copy_(p)
            item.scale.copy_(p * item.row_mask * self._state.alpha_scale)

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self._state
        if state.in_prepass or not state.active:
            return None
        hidden = kwargs.get("input_ids", args[0] if args else None)
        if hidden is None:
            hidden = kwargs.get("inputs_embeds")
        if hidden is None:
            raise CrvlmError("steered forward needs input_ids or inputs_embeds")
        batch, seq_len = int(hidden.shape[0]), int(hidden.shape[1])
        if state.in_generate:
            state.prefill = not state.generate_started
            state.generate_started = True
        else:
            state.prefill = not _has_cached_tokens(kwargs)
        if not state.prefill:
            state.step += 1
            self._limit_decode_steps(seq_len, hidden.device)
            return None
        state.step, state.prefill_len = 0, seq_len
        for item in self._loaded:
            item.token_mask = None
        state.last_index = last_token_index(kwargs.get("attention_mask"), seq_len, batch, hidden.device)
        self._prepare_buffers(batch)
        if self._prepass_stop >= 0:
            self._run_prepass(module, args, kwargs)
        return None

    def _limit_decode_steps(self, seq_len: int, device: torch.device) -> None:
        """Stop steering bundles with ``decode_steps`` once that many decoding steps have run.

        Token positions decide, not call counts, so generation without a KV cache (which
        re-runs the whole sequence each step) steers exactly the tokens cached generation
        steered: the prompt and the first ``decode_steps`` generated tokens that are fed back.
        """
        state = self._state
        total = state.prefill_len + state.step  # one new token per step, as in generate
        start = total - seq_len
        for item in self._loaded:
            limit = item.bundle.manifest.decode_steps
            if limit is None:
                continue
            end = state.prefill_len + limit  # positions >= end are not steered
            if start >= end:
                item.token_mask = None
                item.scale.zero_()  # in place: a compiled decoding step keeps reading this buffer
            elif total > end:
                positions = torch.arange(start, total, device=device)
                item.token_mask = (positions < end).float().view(1, -1, 1)
            else:
                item.token_mask = None

    def _prepare_buffers(self, batch: int) -> None:
        selection = self._state.selection
        if selection is not None and selection.shape[1] != batch:
            rows = selection.shape[1]
            if batch % rows:
                raise CrvlmError(f"per-row bundle selection has {rows} rows but the batch has {batch}")
            selection = selection.repeat_interleave(batch // rows, dim=1)  # beams / num_return_sequences
        for i, item in enumerate(self._loaded):
            if item.p is None or item.p.shape[0] != batch:
                # Normal (not inference-mode) tensors: they outlive the call that made them.
                with torch.inference_mode(False):
                    item.p = torch.zeros(batch, dtype=torch.float32, device=item.gate_device)
                    item.log_odds = torch.zeros(batch, dtype=torch.float32, device=item.gate_device)
                    item.row_mask = torch.ones(batch, dtype=torch.float32, device=item.gate_device)
                    item.scale = torch.zeros(batch, dtype=torch.float32, device=item.gate_device)
            item.row_mask.copy_(selection[i] if selection is not None else torch.ones(batch))
            item.p.zero_()
            item.scale.zero_()

    def _run_prepass(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        call_kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        call_kwargs["use_cache"] = False
        self._state.in_prepass = True
        try:
            with torch.no_grad():
                module(*args, **call_kwargs)
        except StopForward:
            pass
        finally:
            self._state.in_prepass = False

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
        self._place()
        self._state.selection = self._selection(rows, bundles)
        self._state.alpha_scale = float(alpha_scale)
        override = _STEER_ONLY if response is False else (None if response is True else response)
        for item in self._loaded:
            item.response = item.bundle.manifest.response.updated(override)
        specs = self._hook_specs()
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
                yield self
        finally:
            self._state.active = False
            self._state.in_generate = False
            self._state.selection = None
            self._state.alpha_scale = 1.0
            if original_generate is None:
                self.model.__dict__.pop("generate", None)
            else:
                self.model.generate = original_generate
            delattr(self.model, _ACTIVE_ATTR)

    def _shaper(self, eos_override: Any) -> ResponseShaper | None:
        """The logits processor that shapes refused rows in this ``generate`` call, if any bundle asks."""
        if not any(item.response.shapes for item in self._loaded):
            return None
        eos = end_of_sequence_id(self.model, self.adapter, eos_override)
        plans = []
        for item in self._loaded:
            spec = item.response
            if spec.mode == "template":
                forced = [*self.adapter.encode_text(spec.message), eos]
            else:
                forced = self.adapter.encode_text(spec.opening) if spec.opening else []
            plans.append(RowPlan(spec.threshold, forced, spec.stop_sentences if spec.mode == "steer" else None))
        if self._sentence_ends is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._sentence_ends = sentence_end_ids(self.adapter, vocab)
        return ResponseShaper(plans, self._gate_buffers, self._sentence_ends, eos)

    def _gate_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each bundle's current ``(p, row_mask)``: reallocated at prefill, so looked up after it."""
        if any(item.p is None or item.row_mask is None for item in self._loaded):
            raise CrvlmError("the gate was not read before the first decoding step")
        return [(item.p, item.row_mask) for item in self._loaded]  # type: ignore[misc]

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
                out = self.model.generate(**batch.inputs, **kwargs)
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
        image_rows = list(images) if images is not None else [None] * len(questions)
        samples = [Sample(q, img) for q, img in zip(questions, image_rows, strict=True)]
        layers = sorted({layer for item in self._loaded for layer in item.gate.layers})
        stats = capture(
            self.adapter, samples, layers, system=system, batch_size=batch_size, keep=True, progress=False
        )
        return {
            item.name: item.gate.score({layer: stats.rows(layer).to(item.gate_device)
                                        for layer in item.gate.layers}).cpu()
            for item in self._loaded
        }


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


def _steer(h: torch.Tensor, scale: torch.Tensor, vector: torch.Tensor, operator: str,
           token_mask: torch.Tensor | None = None) -> torch.Tensor:
    delta = scale.to(device=h.device, dtype=h.dtype).view(-1, 1, 1) * vector
    if token_mask is not None:
        delta = delta * token_mask.to(device=h.device, dtype=h.dtype)
    if operator == "additive":
        return h + delta
    # rotation: move toward the vector, then restore each token's norm
    moved = h + delta
    norm_h = h.float().norm(dim=-1, keepdim=True)
    norm_m = moved.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (moved.float() * (norm_h / norm_m)).to(h.dtype)


def _has_cached_tokens(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return False
    if torch.compiler.is_compiling():
        return True  # compiled calls with a cache are decoding steps (prefill runs eager)
    return int(cache.get_seq_length()) > 0


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
