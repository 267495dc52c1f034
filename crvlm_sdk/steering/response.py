"""Response shaping inside ``generate``: a refused row opens with forced tokens and ends.

The gate's per-row score is already in a preallocated buffer once the prompt has run (the
Steerer writes it at prefill). :class:`ResponseShaper` is a logits processor that turns it
into a hard decision on its first call and from then on, for refused rows only, forces the
opening (or a template answer) token by token and forces end-of-sequence once the row has
written its allowed number of sentences. Everything is tensor arithmetic on the scores'
device, so no decoding step waits on the host, and rows the gate passes are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.errors import CrvlmError

#: a token that ends a sentence: its text ends with . ! or ? (closing quotes and brackets
#: allowed after), or it holds a line break; list markers such as "1." do not count
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s*$|\n")
_LIST_MARKER = re.compile(r"^\s*\d+\.\s*$")


def sentence_end_ids(adapter: BackboneAdapter, vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` bool: which token ids end a sentence when generated."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(vocab_size):
        try:
            text = adapter.decode([token_id])
        except (IndexError, KeyError, ValueError, TypeError, OverflowError):
            continue  # ids past the tokenizer (padded embedding rows) never end anything
        if text and _SENTENCE_END.search(text) and not _LIST_MARKER.match(text):
            table[token_id] = True
    return table


@dataclass
class RowPlan:
    """What one bundle does to the rows it refuses: tokens to force first, sentences allowed."""

    threshold: float
    forced: list[int]  # opening, or template message followed by end-of-sequence
    stop_sentences: int | None

    @classmethod
    def of(cls, spec: ResponseSpec, adapter: BackboneAdapter, eos: int) -> RowPlan:
        """The plan a bundle's response settings give, in ``adapter``'s tokens."""
        if spec.mode == "template":
            return cls(spec.threshold, [*adapter.encode_text(spec.message), eos], None)
        forced = adapter.encode_text(spec.opening) if spec.opening else []
        return cls(spec.threshold, forced, spec.stop_sentences)


class ResponseShaper(LogitsProcessor):
    """Force each refused row's opening (or template) and end it after its sentences.

    ``read_gates()`` returns, per bundle, the ``(p, row_mask)`` buffers that the Steerer fills
    at prefill; it is called once, on the first decoding step, so the decision is frozen per
    row for the whole ``generate`` call. When several bundles refuse a row, the first one (in Steerer
    order) decides what it reads.
    """

    def __init__(self, plans: Sequence[RowPlan], read_gates: Callable[[], Sequence[tuple[torch.Tensor, torch.Tensor]]],
                 sentence_ends: torch.Tensor, eos_token_id: int) -> None:
        if not plans:
            raise ValueError("at least one plan")
        self.plans = list(plans)
        self.read_gates = read_gates
        self.sentence_ends = sentence_ends
        self.eos = int(eos_token_id)
        width = max(1, max(len(p.forced) for p in plans))
        table = torch.full((len(plans), width), -1, dtype=torch.long)
        for i, plan in enumerate(plans):
            table[i, : len(plan.forced)] = torch.tensor(plan.forced, dtype=torch.long)
        self.table = table
        self.stops = torch.tensor([p.stop_sentences or 0 for p in plans], dtype=torch.long)
        self.thresholds = torch.tensor([p.threshold for p in plans], dtype=torch.float32)
        self.start: int | None = None

    def _decide(self, device: torch.device) -> None:
        gates = self.read_gates()
        if len(gates) != len(self.plans):
            raise ValueError(f"{len(gates)} gates for {len(self.plans)} response plans")
        fired = torch.stack([
            (p.to(device) >= self.thresholds[i].to(device)) & (mask.to(device) > 0)
            for i, (p, mask) in enumerate(gates)
        ])  # (bundles, B)
        self.refused = fired.any(0)
        chosen = fired.to(torch.uint8).argmax(0)  # the first bundle that fired (0 when none did)
        self.forced = self.table.to(device)[chosen]  # (B, width), -1 past a plan's tokens
        self.stop_after = self.stops.to(device)[chosen]
        self.count = torch.zeros_like(self.stop_after)
        self.ends = self.sentence_ends.to(device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = int(input_ids.shape[1])
            self._decide(scores.device)
        step = int(input_ids.shape[1]) - self.start
        if step > 0:
            last = input_ids[:, -1].to(scores.device)
            in_vocab = last < self.ends.shape[0]
            ended = self.ends[last.clamp(max=self.ends.shape[0] - 1)] & in_vocab
            self.count += (ended & self.refused).long()
        past = torch.full_like(self.stop_after, -1)
        token = self.forced[:, step] if step < self.forced.shape[1] else past
        done = (self.stop_after > 0) & (self.count >= self.stop_after) & (token < 0)
        token = torch.where(done, torch.full_like(token, self.eos), token)
        force = self.refused & (token >= 0)
        forced_scores = torch.full_like(scores, float("-inf"))
        forced_scores.scatter_(1, token.clamp_min(0).unsqueeze(1), 0.0)
        return torch.where(force.unsqueeze(1), forced_scores, scores)


def end_of_sequence_id(model: torch.nn.Module, adapter: BackboneAdapter, override: int | Sequence[int] | None) -> int:
    """The token that ends a row: ``generate``'s own ``eos_token_id`` (first of a list)."""
    candidates = [override, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(adapter.tokenizer, "eos_token_id", None)]
    for value in candidates:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, torch.Tensor):
            value = int(value.flatten()[0])
        if value is not None:
            return int(value)
    raise CrvlmError("response shaping needs an end-of-sequence token and the model has none",
                     hint="pass eos_token_id= to generate, or use a bundle response without stop/template")
