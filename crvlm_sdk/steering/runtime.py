"""The machinery behind :class:`~crvlm_sdk.steering.steerer.Steerer`: ``h_l ← h_l + α·p(x)·v_l``
on a frozen model, gated per input.

How a forward pass is steered (all hooks installed by ``Steerer.apply``, removed on exit):

- a pre-hook on the top-level model decides whether this call is a *prefill* (a new prompt)
  or a *decoding step*, and at prefill computes each row's last real token from the
  attention mask (tensor ops, no host sync);
- at prefill each bundle's gate reads ``h_g`` at that token and writes ``p`` into a
  preallocated buffer with ``copy_``; decoding steps reuse the frozen value. A gate read at
  several layers adds each layer's log-odds into a buffer and writes ``p`` at its last one.
  If a gate layer sits at or above a band that steers the prompt of a row reading that gate
  (a row's activations change only under the bundles selected for it), an unsteered
  *pre-pass* (stopped right after the last such gate layer) reads the gate first, so gates
  always see the model they were trained on;
- every layer of a bundle's band adds ``scale[b] · v_l`` where ``scale = α·p·row_mask``;
- a bundle whose manifest sets ``decode_steps = k`` steers the prompt and the first ``k``
  generated tokens only, then its ``scale`` is zeroed in place. On small models a push strong
  enough to start a refusal wrecks the text if it never lets go; stopping after a few tokens
  leaves a refusal opening that the model continues on its own. A bundle with
  ``steer_prompt = False`` leaves the prompt alone and steers generated tokens only, so its
  gate never needs the pre-pass. Token positions decide, so generation without a KV cache
  steers the same tokens as cached generation;
- inside ``generate``, a bundle's ``response`` settings (forced opening, stop after n
  sentences, or a template answer) are applied to the rows its gate refuses by a logits
  processor that reads the same gate buffers (:mod:`crvlm_sdk.steering.response`).

Inside ``model.generate`` the first forward call is the prefill and every later one a
decoding step, with or without KV cache (so cached and uncached generation agree). Outside
``generate``, a call with a non-empty cache is a decoding step. Buffers are updated in place
and never rebound, so a ``torch.compile``d decoding step (static cache, CUDA graphs) keeps
reading the current gate. A graph compiled under one set of hooks is not reused under
another: dynamo re-checks module hooks (tests/test_compile.py swaps two Steerers with the same
hook layout through one compiled ``generate``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crvlm_sdk.activations.capture import read_weighted
from crvlm_sdk.activations.hooks import (
    HookSpec,
    StopForward,
    last_token_index,
    layer_hidden,
    module_device_dtype,
    with_hidden,
)
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.bundle.manifest import ResponseSpec, gates_needing_prepass
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.steering.operators import in_span, steer

_CACHE_KWARGS = ("cache", "past_key_values", "cache_position")


@dataclass
class LoadedBundle:
    """One bundle prepared for a model: gate and vectors on the right devices."""

    bundle: Bundle
    gate: LayerGates
    gate_device: torch.device
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)  # α·v_l on layer's device/dtype
    #: whether this call reads the gate in the pre-pass (decided per call at prefill)
    prepass_now: bool = False
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
class PassState:
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
    #: (B, S) weights averaging each row's question (gates with ``last+question`` features)
    question: torch.Tensor | None = None
    #: the thread inside ``apply()``: forward calls from other threads are refused meanwhile
    owner: int | None = None


#: (input_ids, attention_mask, last_index) -> (B, S) weights over each row's question tokens
QuestionSpan = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


class SteeringRuntime:
    """Per-model state of a Steerer: bundles placed on the model's devices, the hooks, and the
    prefill/decode state machine they share. One instance per Steerer; not thread-safe."""

    def __init__(self, model: torch.nn.Module, layers: Any, loaded: list[LoadedBundle],
                 question_span: QuestionSpan | None = None) -> None:
        self.model = model
        self._layers = layers
        self.loaded = loaded
        self._question_span = question_span
        self._reads_question = any(item.gate.features == "last+question" for item in loaded)
        if self._reads_question and question_span is None:
            raise CrvlmError("a gate reads the question's tokens, but the Steerer was given no way to find them")
        self.state = PassState()
        self._placed_for: tuple[tuple[torch.device, torch.dtype], ...] | None = None
        self._prepass_stop = -1  # last gate layer read in this call's pre-pass (-1: no pre-pass)
        self.place()

    # -- placement ------------------------------------------------------------------------
    def place(self) -> None:
        """Cache α·v on each layer's own device and dtype (re-done if the model moved)."""
        placement = tuple(module_device_dtype(layer) for layer in self._layers)
        if placement == self._placed_for:
            return
        with torch.inference_mode(False):
            self._place_on(placement)

    def _place_on(self, placement: tuple[tuple[torch.device, torch.dtype], ...]) -> None:
        for item in self.loaded:
            m = item.bundle.manifest
            gate_device, _ = placement[m.gate.layers[-1]]
            item.gate = item.gate.to(gate_device)
            item.gate_device = gate_device
            item.vectors = {
                layer: (m.alpha * vec).to(device=placement[layer][0], dtype=placement[layer][1])
                for layer, vec in item.bundle.vectors.items()
            }
            item.p = item.log_odds = item.row_mask = item.scale = None
        self._placed_for = placement

    # -- hooks ----------------------------------------------------------------------------
    def hook_specs(self) -> list[HookSpec]:
        specs = [HookSpec(self.model, self._pre_forward, kind="pre", with_kwargs=True)]
        gate_layers: dict[int, list[LoadedBundle]] = {}
        band_layers: dict[int, list[LoadedBundle]] = {}
        for item in self.loaded:
            for layer in item.gate.layers:
                gate_layers.setdefault(layer, []).append(item)
            if not item.response.steers:
                continue  # template answers need the gate only
            for layer in item.bundle.manifest.layers:
                band_layers.setdefault(layer, []).append(item)
        for layer in sorted(set(gate_layers) | set(band_layers)):
            specs.append(
                HookSpec(self._layers[layer], self._make_layer_hook(layer, gate_layers.get(layer, []),
                                                                    band_layers.get(layer, [])))
            )
        return specs

    def _make_layer_hook(self, layer: int, gates: list[LoadedBundle], band: list[LoadedBundle]):
        state = self.state
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if not state.active:
                return None  # paused (an unsteered call inside apply())
            if state.in_prepass:
                pre = [g for g in gates if g.prepass_now]
                if pre:
                    self._read_gates(pre, layer, layer_hidden(output))
                if layer == self._prepass_stop:
                    raise StopForward
                return None
            if state.prefill and gates:
                in_pass = [g for g in gates if not g.prepass_now]
                if in_pass:
                    self._read_gates(in_pass, layer, layer_hidden(output))
            if not band:
                return None
            h = layer_hidden(output)
            for item in band:
                if state.prefill and not item.bundle.manifest.steer_prompt:
                    continue
                h = steer(h, item.scale, item.vectors[layer], item.bundle.manifest.operator, item.token_mask)
            return with_hidden(output, h)

        return hook

    def _read_gates(self, items: list[LoadedBundle], layer: int, h: torch.Tensor) -> None:
        """Read each item's gate at ``layer``; ``p`` is written once its last gate layer is read."""
        last = self.state.last_index.to(h.device)
        rows = h[torch.arange(h.shape[0], device=h.device), last]
        with_question: torch.Tensor | None = None
        for item in items:
            features = rows
            if item.gate.features == "last+question":
                if with_question is None:  # what capture reads at position "last_and_question"
                    question = read_weighted(self.state.question, h)  # type: ignore[arg-type]
                    with_question = torch.cat([rows.float(), question], dim=1)
                features = with_question
            p = item.gate.read(layer, features.to(item.gate_device), item.log_odds)
            if p is None:
                continue  # more gate layers to come
            item.p.copy_(p)
            item.scale.copy_(p * item.row_mask * self.state.alpha_scale)

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self.state
        if state.in_prepass or not state.active:
            return None
        if state.owner is not None and not torch.compiler.is_compiling() and threading.get_ident() != state.owner:
            raise CrvlmError("this model is being steered by another thread (inside Steerer.apply()); a steered "
                             "model belongs to that thread until its block ends",
                             hint="give each thread its own model, or run this call after the block")
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
        for item in self.loaded:
            item.token_mask = None
        state.last_index = last_token_index(kwargs.get("attention_mask"), seq_len, batch, hidden.device)
        if self._reads_question:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise CrvlmError("a gate that reads the question's tokens needs input_ids, not inputs_embeds")
            state.question = self._question_span(ids, kwargs.get("attention_mask"), state.last_index)  # type: ignore[misc]
        self._prepare_buffers(batch)
        self._decide_prepass()
        if self._prepass_stop >= 0:
            self._run_prepass(module, args, kwargs)
        return None

    def _decide_prepass(self) -> None:
        """Which gates this call reads in the pre-pass: a gate needs it when, on some row that
        reads it, a bundle selected for that row steers the prompt at or below a layer the gate
        reads (rows do not see each other's activations). Host-side, from the CPU selection."""
        selection = self.state.selection
        groups = {tuple(range(len(self.loaded)))} if selection is None else \
            {tuple(i for i in range(len(self.loaded)) if float(row[i]) > 0) for row in selection.t()}
        for item in self.loaded:
            item.prepass_now = False
        for group in groups:
            items = [self.loaded[i] for i in group]
            flags = gates_needing_prepass([item.gate.layers for item in items],
                                          [item.bundle.manifest.prompt_layers(item.response) for item in items])
            for item, needed in zip(items, flags, strict=True):
                item.prepass_now |= needed
        self._prepass_stop = max((item.gate.last_layer for item in self.loaded if item.prepass_now), default=-1)

    def _limit_decode_steps(self, seq_len: int, device: torch.device) -> None:
        """Stop steering bundles with ``decode_steps`` once that many decoding steps have run.

        Token positions decide, not call counts, so generation without a KV cache (which
        re-runs the whole sequence each step) steers exactly the tokens cached generation
        steered: the prompt (unless ``steer_prompt`` is off) and the first ``decode_steps``
        generated tokens that are fed back.
        """
        state = self.state
        total = state.prefill_len + state.step  # one new token per step, as in generate
        start = total - seq_len
        for item in self.loaded:
            first, end = item.bundle.manifest.steered_span(state.prefill_len)  # positions steered: [first, end)
            if end is not None and start >= end:
                item.token_mask = None
                item.scale.zero_()  # in place: a compiled decoding step keeps reading this buffer
            elif start < first or (end is not None and total > end):
                positions = torch.arange(start, total, device=device)
                item.token_mask = in_span(positions, (first, end)).float().view(1, -1, 1)
            else:
                item.token_mask = None

    def _prepare_buffers(self, batch: int) -> None:
        selection = self.state.selection
        if selection is not None and selection.shape[1] != batch:
            rows = selection.shape[1]
            if batch % rows:
                raise CrvlmError(f"per-row bundle selection has {rows} rows but the batch has {batch}")
            selection = selection.repeat_interleave(batch // rows, dim=1)  # beams / num_return_sequences
        for i, item in enumerate(self.loaded):
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
        self.state.in_prepass = True
        try:
            with torch.no_grad():
                module(*args, **call_kwargs)
        except StopForward:
            pass
        finally:
            self.state.in_prepass = False

    def gate_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each bundle's current ``(p, row_mask)``: reallocated at prefill, so looked up after it."""
        if any(item.p is None or item.row_mask is None for item in self.loaded):
            raise CrvlmError("the gate was not read before the first decoding step")
        return [(item.p, item.row_mask) for item in self.loaded]  # type: ignore[misc]


def _has_cached_tokens(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return False
    if torch.compiler.is_compiling():
        return True  # compiled calls with a cache are decoding steps (prefill runs eager)
    return int(cache.get_seq_length()) > 0
