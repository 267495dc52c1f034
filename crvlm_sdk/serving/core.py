"""Steering for engines that run many requests' tokens as one flat batch (vLLM and the like).

A serving engine does not call ``model.generate`` per batch: each forward step holds, for every
running request, a run of consecutive rows in one ``(tokens, hidden)`` tensor (a whole prompt,
or one new token), and requests come and go between steps. :class:`SteeringCore` keeps what
:class:`~crvlm_sdk.steering.steerer.Steerer` keeps per ``generate`` call, per *request*
instead: which bundles it asked for, each bundle's gate value ``p`` (read at the request's last
prompt token and frozen), and which of its tokens are still steered (``decode_steps``, counted
by token position as the Steerer counts them). The engine describes each step with
:class:`Rows` and calls :meth:`SteeringCore.layer_output` from its decoder-layer hooks; nothing
here depends on the engine.

Per step, the host builds two small index tensors (row → request slot, row → steered by which
bundle); the gates write ``p`` into a per-slot table on the model's device and the band layers
gather from it, so no layer waits on the host.

A prompt that a bundle steers (or whose question tokens its gate reads) must arrive in one
step: with chunked prefill the chunks before the last would run before the gate is read,
unsteered, and their cached keys and values would stay so. The core refuses such a step with
one clear error instead of steering part of a prompt. A request whose bundles steer generated
tokens only (``steer_prompt = False``) and read the last prompt token may arrive in chunks or
after a cached prefix: its gate is read on the step that holds its last prompt token.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from crvlm_sdk.activations.capture import question_weights
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.bundle.manifest import gates_needing_prepass
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.plugins.manager import PluginManager
from crvlm_sdk.steering.operators import in_span, steer
from crvlm_sdk.steering.response import RowPlan


@dataclass(frozen=True)
class Rows:
    """One request's rows in a step's flat batch.

    ``start``/``count``: its rows are ``start .. start + count - 1``; ``position``: the sequence
    position of its first row here (0 for a prompt, the number of tokens before it otherwise);
    ``prompt_length``: tokens in its prompt; ``bundles``: the bundle names it asked for (read on
    its first step); ``prompt_ids``: its prompt's token ids, needed on the step that holds its
    prompt when a gate reads the question's tokens.
    """

    key: Hashable
    start: int
    count: int
    position: int
    prompt_length: int
    bundles: tuple[str, ...] = ()
    prompt_ids: torch.Tensor | None = None


@dataclass
class _Request:
    slot: int
    bundles: tuple[int, ...]
    prompt_length: int
    #: its prompt must run in one step (a bundle steers it, or a gate reads its question)
    whole_prompt: bool = True
    #: per loaded bundle: whether its gate is read in the pre-pass for this request (another of
    #: the request's bundles steers its prompt at or below a layer the gate reads)
    prepass: tuple[bool, ...] = ()
    gated: bool = False


@dataclass
class _Step:
    """Per-step index tensors (host-built, moved to the model's device once per step)."""

    slots: torch.Tensor  # (tokens,) long: each row's request slot (the spare slot for rows of no request)
    steered: torch.Tensor  # (tokens, bundles) float 0/1: whether each bundle steers each row
    gate_rows: torch.Tensor  # (n,) long: rows of the last prompt tokens read by the gates this step
    gate_slots: torch.Tensor  # (n,) long: their requests' slots
    gate_bundles: torch.Tensor  # (n, bundles) bool: which bundles each of those requests asked for
    gate_prepass: torch.Tensor  # (n, bundles) bool: which of those gates are read in the pre-pass
    question: torch.Tensor | None  # (n, tokens) float weights of each request's question rows
    #: (bundle, in pre-pass) pairs with some gate row to read this step (host-side, no sync)
    reads: set[tuple[int, bool]]
    on: torch.device | None = None
    #: (bundle, in pre-pass) -> (n,) summed gate log-odds
    totals: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)

    @property
    def prepass(self) -> bool:
        return any(pre for _, pre in self.reads)

    def to(self, device: torch.device) -> None:
        if self.on != device:
            for name in ("slots", "steered", "gate_rows", "gate_slots", "gate_bundles", "gate_prepass", "question"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device))
            self.on = device


class SteeringCore:
    """Gates, frozen ``p`` and steering per request, over flat batches of many requests.

    ``question_opener`` and ``skip_ids`` locate a prompt's question as the build's capture did
    (``adapter.question_opener()``, ``adapter.image_token_ids()``); they matter only for bundles
    whose gate reads ``last+question``. ``capacity`` bounds the requests steered at once.
    """

    def __init__(self, bundles: Sequence[Bundle], *, plugins: PluginManager | None = None,
                 question_opener: Sequence[int] = (), skip_ids: frozenset[int] = frozenset(),
                 capacity: int = 1024) -> None:
        if not bundles:
            raise CrvlmError("the steering core needs at least one bundle")
        self.names = [b.name for b in bundles]
        if len(set(self.names)) != len(self.names):
            raise CrvlmError(f"two bundles share a policy name in {self.names}; names select bundles per request")
        self.bundles = list(bundles)
        self.gates: list[LayerGates] = [b.gate(plugins) for b in bundles]
        self.specs = [b.manifest for b in bundles]
        self._opener = tuple(question_opener)
        self._skip = set(skip_ids)
        #: whether some gate reads the question's tokens (then prompts need their ``prompt_ids``)
        self.reads_question = any(g.features == "last+question" for g in self.gates)
        #: bundles whose gate may need an unsteered pre-pass: some request may pair it with a
        #: bundle that steers the prompt at or below a layer it reads
        self.needs_prepass = gates_needing_prepass([g.layers for g in self.gates],
                                                   [m.prompt_layers() for m in self.specs])
        self.prepass_stop = max((g.last_layer for g, pre in zip(self.gates, self.needs_prepass, strict=True) if pre),
                                default=-1)
        self._vectors: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for i, (bundle, m) in enumerate(zip(self.bundles, self.specs, strict=True)):
            if m.response.steers:
                for layer, vector in bundle.vectors.items():
                    self._vectors.setdefault(layer, []).append((i, m.alpha * vector.float()))
        self._gate_at: dict[int, list[int]] = {}
        for i, gates in enumerate(self.gates):
            for layer in gates.layers:
                self._gate_at.setdefault(layer, []).append(i)
        #: decoder layers whose output the engine must pass through :meth:`layer_output`
        self.layers = sorted(set(self._vectors) | set(self._gate_at))
        #: nothing is steered below the lowest band layer, and that layer's own output is steered
        #: only after it is computed: layers ``0 .. prepass_shared`` compute the same in the
        #: pre-pass and the steered pass, so an engine may keep their outputs from the pre-pass
        #: instead of computing them twice (-1: no pre-pass)
        self.prepass_shared = min(self._vectors) if self._vectors and any(self.needs_prepass) else -1
        self.capacity = capacity
        self._requests: dict[Hashable, _Request] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._p: torch.Tensor = torch.zeros(capacity + 1, len(bundles))  # last slot: rows of no request
        self._step: _Step | None = None
        self._in_prepass = False
        self._placed: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- requests -------------------------------------------------------------------------
    def _register(self, rows: Rows) -> _Request:
        unknown = sorted(set(rows.bundles) - set(self.names))
        if unknown:
            raise CrvlmError(f"request {rows.key!r} asked for unknown bundles {unknown}; loaded: {self.names}")
        if not self._free:
            raise CrvlmError(f"more than {self.capacity} steered requests at once",
                             hint="finish() requests that ended, or raise capacity")
        indices = tuple(self.names.index(n) for n in rows.bundles)
        whole = any(self.specs[i].needs_whole_prompt for i in indices)
        # a request's rows attend only to its own tokens: only its own bundles change what its gates read
        flags = dict(zip(indices, gates_needing_prepass([self.gates[i].layers for i in indices],
                                                        [self.specs[i].prompt_layers() for i in indices]),
                         strict=True))
        prepass = tuple(flags.get(i, False) for i in range(len(self.names)))
        request = _Request(self._free.pop(), indices, rows.prompt_length, whole_prompt=whole, prepass=prepass)
        self._requests[rows.key] = request
        return request

    def finish(self, key: Hashable) -> None:
        """Forget a request that ended (its slot is reused); unknown keys are ignored."""
        request = self._requests.pop(key, None)
        if request is not None:
            self._free.append(request.slot)

    @property
    def active(self) -> int:
        return len(self._requests)

    def gated(self, key: Hashable) -> bool:
        """Whether the request's gate has been read (its last prompt token has run)."""
        request = self._requests.get(key)
        return request is not None and request.gated

    def p(self, key: Hashable) -> dict[str, float]:
        """The frozen gate values of a request, by bundle it asked for (host sync; for logging and
        the response decision)."""
        request = self._requests[key]
        if not request.gated:
            raise CrvlmError(f"request {key!r} has not had its prompt run yet")
        row = self._p[request.slot].cpu()
        return {self.names[i]: float(row[i]) for i in request.bundles}

    def response_plan(self, key: Hashable, plans: Sequence[RowPlan]) -> RowPlan | None:
        """What shapes this request's answer: the plan of the first bundle (in load order) that
        the request asked for, shapes responses and whose ``p`` reaches its threshold, or None.
        ``plans[i]`` is bundle ``i``'s (:meth:`RowPlan.of` its response settings)."""
        values = self.p(key)
        for i, name in enumerate(self.names):
            if name in values and self.specs[i].response.shapes and values[name] >= plans[i].threshold:
                return plans[i]
        return None

    # -- steps ----------------------------------------------------------------------------
    def begin_step(self, rows: Sequence[Rows], num_tokens: int) -> bool:
        """Describe the next forward step; True when it needs a gate pre-pass first (run the
        forward under :meth:`prepass`, then the real one)."""
        n_bundles = len(self.names)
        spare = self.capacity
        slots = torch.full((num_tokens,), spare, dtype=torch.long)
        steered = torch.zeros(num_tokens, n_bundles)
        gate_rows, gate_slots, gate_bundles, gate_prepass, question_rows = [], [], [], [], []
        reads: set[tuple[int, bool]] = set()
        for r in rows:
            if r.start < 0 or r.count < 1 or r.start + r.count > num_tokens:
                raise CrvlmError(f"request {r.key!r}: rows {r.start}..{r.start + r.count - 1} are outside the "
                                 f"step's {num_tokens} tokens")
            request = self._requests.get(r.key) or self._register(r)
            if not request.bundles:
                continue
            end = r.position + r.count
            holds_prompt = r.position < r.prompt_length
            if holds_prompt and request.whole_prompt and (r.position > 0 or end < r.prompt_length):
                raise CrvlmError(f"request {r.key!r}: its prompt of {r.prompt_length} tokens is split across steps "
                                 f"(this step holds positions {r.position}..{end - 1}); a steered prompt must run in "
                                 "one step, or its first part runs before the gate is read",
                                 hint="disable chunked prefill, or raise the step's token budget above the "
                                      "longest prompt")
            slots[r.start:r.start + r.count] = request.slot
            positions = torch.arange(r.position, end)
            for i in request.bundles:
                span = self.specs[i].steered_span(r.prompt_length)
                steered[r.start:r.start + r.count, i] = in_span(positions, span).float()
            if holds_prompt and end >= r.prompt_length:  # the last prompt token is in this step
                request.gated = True
                gate_rows.append(r.start + r.prompt_length - 1 - r.position)
                gate_slots.append(request.slot)
                gate_bundles.append([i in request.bundles for i in range(n_bundles)])
                gate_prepass.append(list(request.prepass))
                reads.update((i, request.prepass[i]) for i in request.bundles)
                if any(self.gates[i].features == "last+question" for i in request.bundles):
                    question_rows.append(self._question_row(r, num_tokens))
                else:
                    question_rows.append(None)
        question = None
        if any(q is not None for q in question_rows):
            question = torch.stack([q if q is not None else torch.zeros(num_tokens) for q in question_rows])
        self._step = _Step(slots, steered, torch.tensor(gate_rows, dtype=torch.long),
                           torch.tensor(gate_slots, dtype=torch.long),
                           torch.tensor(gate_bundles, dtype=torch.bool).reshape(-1, n_bundles),
                           torch.tensor(gate_prepass, dtype=torch.bool).reshape(-1, n_bundles), question, reads)
        if gate_slots:
            self._p[torch.tensor(gate_slots)] = 0.0
        return self._step.prepass

    def _question_row(self, r: Rows, num_tokens: int) -> torch.Tensor:
        if r.prompt_ids is None:
            raise CrvlmError(f"request {r.key!r}: a gate reads the question's tokens; pass its prompt_ids")
        ids = r.prompt_ids.reshape(1, -1).cpu()
        if ids.shape[1] != r.prompt_length:
            raise CrvlmError(f"request {r.key!r}: {ids.shape[1]} prompt ids for a prompt of {r.prompt_length} tokens")
        weights = question_weights(ids, None, torch.tensor([r.prompt_length - 1]), self._opener, self._skip)[0]
        row = torch.zeros(num_tokens)
        row[r.start:r.start + r.prompt_length] = weights
        return row

    @contextmanager
    def prepass(self) -> Iterator[None]:
        """The unsteered pass that reads the gates of bundles that need it; the engine may stop
        the forward after layer :attr:`prepass_stop`."""
        self._in_prepass = True
        try:
            yield
        finally:
            self._in_prepass = False

    def layer_output(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Read gates and steer at ``layer``: ``hidden`` is the layer's ``(tokens, H)`` output."""
        step = self._step
        if step is None:
            raise CrvlmError("layer_output() before begin_step()")
        if self._p.device != hidden.device:
            self._p = self._p.to(hidden.device)
            self.gates = [gates.to(hidden.device) for gates in self.gates]
        step.to(hidden.device)
        if len(step.gate_rows) and layer in self._gate_at:
            self._read_gates(layer, hidden, step)
        if self._in_prepass or layer not in self._vectors:
            return hidden
        h = hidden.unsqueeze(1)  # (tokens, 1, H): each row its own "sequence" for the operator
        for i, vector in self._vectors[layer]:
            scale = self._p[step.slots, i] * step.steered[:, i]
            h = steer(h, scale, self._vector(i, layer, vector, hidden), self.specs[i].operator)
        return h.squeeze(1)

    def _vector(self, i: int, layer: int, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (i, layer, like.device, like.dtype)
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = vector.to(device=like.device, dtype=like.dtype)
        return placed

    def _read_gates(self, layer: int, hidden: torch.Tensor, step: _Step) -> None:
        rows = hidden[step.gate_rows].float()
        for i in self._gate_at[layer]:
            if (i, self._in_prepass) not in step.reads:
                continue
            gates = self.gates[i]
            if gates.features == "last+question":
                if step.question is None:
                    raise CrvlmError("a gate reads the question's tokens, but no request passed prompt_ids")
                features = torch.cat([rows, step.question @ hidden.float()], dim=1)
            else:
                features = rows
            total = step.totals.setdefault((i, self._in_prepass),
                                           torch.zeros(len(step.gate_rows), device=hidden.device))
            p = gates.read(layer, features, total)
            if p is None:
                continue
            # this pass's rows of requests that asked for bundle i; the others keep their value
            mine = step.gate_bundles[:, i] & (step.gate_prepass[:, i] == self._in_prepass)
            self._p[step.gate_slots, i] = torch.where(mine, p.to(hidden.device), self._p[step.gate_slots, i])



class RequestResponses:
    """Response shaping per request, for engines that pick each request's next token: the
    decision is taken from the frozen gate values on the request's first generated token, then
    a refused request gets its forced tokens and ends after its sentences, exactly as
    :class:`~crvlm_sdk.steering.response.ResponseShaper` does for the rows of one ``generate``.

    ``plans[i]``: bundle ``i``'s :class:`RowPlan` (``RowPlan.of`` its response settings);
    ``sentence_ends``: ``(vocab,)`` bool, the tokens that end a sentence.
    """

    def __init__(self, core: SteeringCore, plans: Sequence[RowPlan], sentence_ends: torch.Tensor,
                 eos_token_id: int) -> None:
        if len(plans) != len(core.names):
            raise CrvlmError(f"{len(plans)} response plans for {len(core.names)} bundles")
        self.core = core
        self.plans = list(plans)
        self.ends = sentence_ends.bool().cpu()
        self.eos = int(eos_token_id)
        self._plans: dict[Hashable, RowPlan | None] = {}
        self._counted: dict[Hashable, tuple[int, int]] = {}  # key -> (tokens seen, sentences ended)

    def next_token(self, key: Hashable, generated: Sequence[int]) -> int | None:
        """The token this request must produce next, or None to let the model choose."""
        if key not in self._plans:
            if not self.core.gated(key):
                return None  # its prompt is still running in chunks: what is sampled now is dropped
            self._plans[key] = self.core.response_plan(key, self.plans)
        plan = self._plans[key]
        if plan is None:
            return None
        seen, count = self._counted.get(key, (0, 0))
        for token in generated[seen:]:
            count += int(0 <= token < len(self.ends) and bool(self.ends[token]))
        self._counted[key] = (len(generated), count)
        step = len(generated)
        if step < len(plan.forced):
            return plan.forced[step]
        if plan.stop_sentences and count >= plan.stop_sentences:
            return self.eos
        return None

    def finish(self, key: Hashable) -> None:
        self._plans.pop(key, None)
        self._counted.pop(key, None)
