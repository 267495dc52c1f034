"""Batched, padding-aware reading of decoder-layer outputs at chosen token positions.

Statistics accumulate in float64 as running sums, so memory does not grow with the number of
samples; per-sample rows are kept only when asked (for probes). The forward pass stops right
after the deepest layer read, which saves most of the compute for early layers. Tokens that
several prompts share (the chat header and system message of every row; the whole prompt under
several forced replies) run once and are continued through a KV cache, with explicit positions
so each row's tokens sit where they would unpadded.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import DynamicCache

from crvlm_sdk.activations.hooks import HookSpec, StopForward, hooks_installed, layer_hidden
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.types import PromptBatch, Sample

Position = Literal["last_prompt", "prefix_last", "prefix_mean", "last_and_question"]
#: where a gate's features are read, by the manifest's ``gate.features``
GATE_POSITION: dict[str, Position] = {"last": "last_prompt", "last+question": "last_and_question"}
logger = logging.getLogger(__name__)


@dataclass
class ActivationStats:
    """Running sums of ``h_l`` per layer, and optionally every sample's row."""

    layers: list[int]
    count: int = 0
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    sq_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    samples: dict[int, list[torch.Tensor]] | None = None

    def mean(self, layer: int) -> torch.Tensor:
        if self.count == 0:
            raise CrvlmError("no activations were captured (empty data set)")
        return (self.sums[layer] / self.count).float()

    def rows(self, layer: int) -> torch.Tensor:
        """``(N, H)`` float32 per-sample activations (needs ``keep=True``)."""
        if self.samples is None:
            raise CrvlmError("per-sample activations were not kept; capture with keep=True")
        return torch.cat(self.samples[layer]) if self.samples[layer] else torch.empty(0)


def question_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, last_index: torch.Tensor,
                     opener: Sequence[int], skip_ids: set[int]) -> torch.Tensor:
    """``(B, S)`` float32 weights averaging each row's question: the tokens after the last
    ``opener`` (the user-turn opening) up to the last prompt token, image placeholders left out.

    Computed from token ids alone, with tensor ops on their device, so the build and the Steerer
    (at prefill inside a caller's ``generate``) read the same span without a host sync. A row
    without the opener averages its whole attended prompt.
    """
    device = input_ids.device
    rows, width = input_ids.shape
    cols = torch.arange(width, device=device).unsqueeze(0)
    last = last_index.to(device).unsqueeze(1)
    start = torch.zeros(rows, dtype=torch.long, device=device)
    if attention_mask is not None:
        start = (attention_mask[:, -width:] == 0).long().cumprod(1).sum(1)  # left padding
    k = len(opener)
    if k and width >= k:
        windows = input_ids.unfold(1, k, 1)  # (B, S-k+1, k)
        hits = (windows == torch.tensor(list(opener), dtype=input_ids.dtype, device=device)).all(-1)
        hits &= cols[:, : width - k + 1] + k - 1 <= last
        last_hit = (width - k) - hits.flip(1).long().argmax(1)
        start = torch.where(hits.any(1), last_hit + k, start)
    span = (cols >= start.unsqueeze(1)) & (cols <= last)
    if skip_ids:
        span &= ~torch.isin(input_ids, torch.tensor(sorted(skip_ids), dtype=input_ids.dtype, device=device))
    if attention_mask is not None:
        span &= attention_mask[:, -width:].bool()
    span |= cols == last  # never empty
    weights = span.float()
    return weights / weights.sum(1, keepdim=True)


def position_weights(batch: PromptBatch, position: Position, adapter: BackboneAdapter | None = None,
                     ) -> torch.Tensor:
    """``(B, S)`` float32 weights over tokens: one-hot for a single position, uniform for a span;
    ``(B, 2, S)`` for ``last_and_question`` (the last prompt token, then the question's mean,
    read as one ``(B, 2H)`` row: the gate's features)."""
    cols = torch.arange(batch.seq_len).unsqueeze(0)
    if position in ("last_prompt", "last_and_question"):
        last = (cols == batch.last_prompt_index.cpu().unsqueeze(1)).float()
        if position == "last_prompt":
            return last
        if adapter is None:
            raise CrvlmError("position 'last_and_question' needs the adapter (its chat template's user opening)")
        question = question_weights(batch.inputs["input_ids"], batch.inputs.get("attention_mask"),
                                    batch.last_prompt_index, adapter.question_opener(), adapter.image_token_ids())
        return torch.stack([last, question.cpu()], dim=1)  # weights live on the CPU, like the others
    start, end = batch.prefix_start.cpu().unsqueeze(1), batch.prefix_end.cpu().unsqueeze(1)
    if bool((end <= start).any()):
        raise CrvlmError(f"position {position!r} needs a forced prefix, but the prompts have none")
    if position == "prefix_last":
        return (cols == end - 1).float()
    if position == "prefix_mean":
        span = ((cols >= start) & (cols < end)).float()
        return span / span.sum(1, keepdim=True)
    raise CrvlmError(f"unknown position {position!r}; use last_prompt, prefix_last, prefix_mean or "
                     "last_and_question")


def read_weighted(weights: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(B, K·H)`` float32: ``h`` (``(B, S, H)``) averaged under each of ``weights``' rows
    (``(B, S)`` or ``(B, K, S)``), K reads side by side. Capture and the Steerer's gate share it."""
    w = weights.to(device=h.device)
    w = w.unsqueeze(1) if w.dim() == 2 else w
    return torch.bmm(w, h.float()).flatten(1)


def model_input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def batches(items: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    if size < 1:
        raise CrvlmError(f"batch size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def length_order(samples: Sequence[Sample]) -> list[int]:
    """Sample indices, shortest question first: batches of similar length carry little padding.

    Characters stand in for tokens (tokenizing twice would cost more than it saves); ties keep
    the given order, so the order, and with it every float sum, is deterministic.
    """
    return sorted(range(len(samples)), key=lambda i: len(samples[i].question))


def restore_order(stats: ActivationStats, order: Sequence[int]) -> ActivationStats:
    """Put kept per-sample rows back in the caller's order after a ``length_order`` capture."""
    if stats.samples is not None:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(list(order), dtype=torch.long)] = torch.arange(len(order))
        for layer, rows in stats.samples.items():
            if rows:
                stats.samples[layer] = [torch.cat(rows)[inverse]]
    return stats


def progress_bar(enabled: bool) -> Progress:
    """The one progress-bar style of crvlm's long loops (capture, evaluation); gone when done.

    Off when the console is not a terminal: a transient bar written to a log or a pipe leaves a
    blank line behind for every loop.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, transient=True, disable=not (enabled and get_console().is_terminal))


#: Below this many shared tokens a batch is run whole: the extra pass would cost more than it saves.
MIN_SHARED_PREFIX = 8


@dataclass
class _PromptSplit:
    """A left-padded batch cut after the tokens every row starts with (the chat header, the system
    message, the user-turn opening), so that part runs once instead of once per row.

    ``suffix`` covers the batch's last ``width`` columns: each row's tokens after the shared
    ``length`` (rows re-masked where they had prefix tokens in those columns), with explicit
    positions so every token sits where it does in the unpadded prompt.
    """

    prefix: dict[str, torch.Tensor]
    suffix: dict[str, torch.Tensor]
    length: int
    width: int
    batch_size: int
    next_position: torch.Tensor


def _split_prompt(batch: PromptBatch, seq_keys: Sequence[str], stop_ids: set[int],
                  weights: torch.Tensor | None = None) -> _PromptSplit | None:
    """Cut ``batch`` after its rows' common leading tokens, or None where that does not pay or fit.

    None when: no attention mask or not left-padded; or fewer than ``MIN_SHARED_PREFIX`` shared
    tokens before the first read position (non-zero ``weights``).
    """
    ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    if mask is None:
        return None
    rows, width = ids.shape
    lengths = mask.sum(1)
    pads = width - lengths
    cols = torch.arange(width, device=ids.device)
    if not torch.equal(mask.bool(), cols.unsqueeze(0) >= pads.unsqueeze(1)):
        return None
    shortest = int(lengths.min())
    head = ids.gather(1, pads.unsqueeze(1) + torch.arange(shortest, device=ids.device).unsqueeze(0))
    same = (head == head[:1]).all(0)
    for token in stop_ids:
        same &= head[0] != token
    differs = (~same).nonzero()
    length = min(int(differs[0]) if len(differs) else shortest, shortest - 1)
    if length < MIN_SHARED_PREFIX:
        return None
    if weights is not None:
        # a read inside the shared part (a span that starts right after the user-turn opening)
        # ends the shared part there, so every read falls in the per-row rest
        read = (weights.ne(0) if weights.dim() == 2 else weights.ne(0).any(1)).to(pads.device)
        first_read = torch.where(read.any(1), read.long().argmax(1), torch.full_like(pads, width))
        length = min(length, int((first_read - pads).min()))
        if length < MIN_SHARED_PREFIX:
            return None
    cut = int(pads.min()) + length  # the first column that is not shared in every row
    start = int(pads[0])
    prefix = {key: batch.inputs[key][:1, start : start + length] for key in seq_keys
              if key in batch.inputs and key != "attention_mask"}
    prefix["attention_mask"] = torch.ones(1, length, dtype=mask.dtype, device=mask.device)
    suffix_mask = (cols[cut:].unsqueeze(0) >= (pads + length).unsqueeze(1)).to(mask.dtype)
    suffix = {key: value[:, cut:] if key in seq_keys else value for key, value in batch.inputs.items()}
    suffix["attention_mask"] = torch.cat([mask.new_ones(rows, length), suffix_mask], 1)
    suffix["position_ids"] = (length + suffix_mask.cumsum(1) - 1).clamp_min(length)
    return _PromptSplit(prefix=prefix, suffix=suffix, length=length, width=width - cut, batch_size=rows,
                        next_position=lengths)


#: (model, kind) -> whether the shared path read what full passes read, so it is checked once
#: per model and kind of batch rather than on every capture call.
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, bool], bool]] = weakref.WeakKeyDictionary()


class _LayerReader:
    """Hooks on the read layers, shared by every forward pass of one capture.

    Each ``run`` says where that pass's reads go: ``into=None`` only runs the layers (how a
    shared prompt fills a KV cache). Every pass stops after the deepest read layer.
    """

    def __init__(self, adapter: BackboneAdapter, layers: Sequence[int]) -> None:
        blocks = adapter.decoder_layers()
        self.layers = sorted(set(int(layer) for layer in layers))
        if not self.layers:
            raise CrvlmError("no layers to capture")
        bad = [layer for layer in self.layers if not 0 <= layer < len(blocks)]
        if bad:
            raise CrvlmError(f"layers {bad} out of range for a model with {len(blocks)} decoder layers")
        self.model = adapter.model
        self.device, self.dtype = model_input_device(self.model), model_float_dtype(self.model)
        self.specs = [HookSpec(blocks[layer], self._hook(layer)) for layer in self.layers]
        # transformers renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.seq_keys: tuple[str, ...] = tuple(adapter.sequence_keys)
        self.stop_ids = adapter.image_token_ids()
        self._into: ActivationStats | None = None
        self._weights: torch.Tensor | None = None

    def new_stats(self, keep: bool) -> ActivationStats:
        return ActivationStats(layers=list(self.layers), samples={layer: [] for layer in self.layers} if keep else None)

    def _hook(self, layer: int):
        deepest = self.layers[-1]

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            stats, w = self._into, self._weights
            if stats is not None and w is not None:
                read = read_weighted(w, layer_hidden(output))
                read64 = read.double().cpu()
                if layer not in stats.sums:
                    stats.sums[layer] = torch.zeros(read.shape[1], dtype=torch.float64)
                    stats.sq_sums[layer] = torch.zeros(read.shape[1], dtype=torch.float64)
                stats.sums[layer] += read64.sum(0)
                stats.sq_sums[layer] += (read64 * read64).sum(0)
                if stats.samples is not None:
                    stats.samples[layer].append(read.cpu())
            if layer == deepest:
                raise StopForward

        return hook

    def split(self, batch: PromptBatch, weights: torch.Tensor | None = None) -> _PromptSplit | None:
        """``batch`` (on the model's device) cut after its shared leading tokens, if that pays."""
        return _split_prompt(batch, self.seq_keys, self.stop_ids, weights)

    def run(self, batch: PromptBatch, into: ActivationStats | None, weights: torch.Tensor | None,
            split: _PromptSplit | None = None) -> None:
        """One forward pass of ``batch`` read at ``weights`` into ``into``; with ``split``, the
        shared leading tokens run once and only the rest runs per row."""
        self._run_prompt(batch, into, weights, split, cached=False)

    def run_continued(self, prompt: PromptBatch,
                      branches: Sequence[tuple[dict[str, torch.Tensor], ActivationStats, torch.Tensor]],
                      split: _PromptSplit | None = None) -> None:
        """Run ``prompt`` once into a KV cache, then each ``(tail inputs, into, weights)`` from it.

        Every branch but the last continues a copy, so each sees the prompt's cache alone. With
        ``split``, the prompt itself runs as shared prefix + per-row rest, and the tails carry
        explicit positions (their columns no longer say where each row's tokens sit).
        """
        cache, mask, next_position = self._run_prompt(prompt, None, None, split, cached=True)
        for i, (tail, into, weights) in enumerate(branches):
            branch = cache if i == len(branches) - 1 else copy.deepcopy(cache)
            inputs = {k: v.to(self.device) for k, v in tail.items()}
            steps = inputs["input_ids"].shape[1]
            inputs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], 1)
            if next_position is not None:
                inputs["position_ids"] = next_position.unsqueeze(1) + torch.arange(steps, device=mask.device)
            self._forward(inputs, into, weights, use_cache=True, **{self._cache_kwarg: branch})

    def checked(self, kind: tuple[str, bool], check: Callable[[], bool]) -> bool:
        """Whether the shared path of ``kind`` is exact on this model: ``check`` runs once per model."""
        seen = _CHECKED.setdefault(self.model, {})
        if kind not in seen:
            seen[kind] = check()
        return seen[kind]

    def same_reads(self, full: Callable[[ActivationStats], None], shared: Callable[[ActivationStats], None]) -> bool:
        """Whether ``shared`` reads what ``full`` reads, on one batch (float32 agrees to ~1e-6 of
        the norm, half precision to ~1e-2); a shared path that raises counts as different."""
        want, got = self.new_stats(True), self.new_stats(True)
        full(want)
        try:
            shared(got)
        except Exception as exc:  # e.g. Qwen2-VL's 3-D rotary positions are computed from the whole prompt
            logger.info("%s cannot share prompt tokens through a KV cache (%s); running full passes",
                        type(self.model).__name__, exc)
            return False
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        for layer in self.layers:
            a, b = want.rows(layer), got.rows(layer)
            if not bool(((a - b).norm(dim=-1) <= tol * a.norm(dim=-1).clamp_min(1e-6)).all()):
                logger.info("the cached pass differs from the full pass at layer %d; running full passes", layer)
                return False
        return True

    def _run_prompt(self, prompt: PromptBatch, into: ActivationStats | None, weights: torch.Tensor | None,
                    split: _PromptSplit | None, *, cached: bool,
                    ) -> tuple[DynamicCache | None, torch.Tensor, torch.Tensor | None]:
        """The prompt's pass (whole, or shared prefix + rest): its cache (with ``cached`` or a
        split), the attention mask a continuation extends, and explicit next positions (split)."""
        if split is None:
            inputs = prompt.to(self.device, self.dtype).inputs
            cache = DynamicCache() if cached else None
            self._forward(inputs, into, weights, use_cache=cached, **({self._cache_kwarg: cache} if cached else {}))
            return cache, inputs["attention_mask"], None
        cache = self._prefix_cache(split)
        self._forward(split.suffix, into, None if weights is None else weights[..., -split.width :],
                      use_cache=True, **{self._cache_kwarg: cache})
        return cache, split.suffix["attention_mask"], split.next_position

    def _prefix_cache(self, split: _PromptSplit) -> DynamicCache:
        cache = DynamicCache()
        self._forward(split.prefix, None, None, use_cache=True, **{self._cache_kwarg: cache})
        cache.batch_repeat_interleave(split.batch_size)
        return cache

    def _forward(self, inputs: dict[str, torch.Tensor], into: ActivationStats | None,
                 weights: torch.Tensor | None, **kwargs: Any) -> None:
        self._into, self._weights = into, weights
        with torch.inference_mode(), contextlib.suppress(StopForward):
            self.model(**inputs, **kwargs)


def _has_images(batch: PromptBatch) -> bool:
    return any(v.is_floating_point() for v in batch.inputs.values())


def capture(
    adapter: BackboneAdapter,
    samples: Sequence[Sample],
    layers: Sequence[int],
    *,
    position: Position = "last_prompt",
    system: str | None = None,
    forced_prefix: str | None = None,
    batch_size: int = 8,
    keep: bool = False,
    progress: bool = True,
    description: str = "capturing activations",
    share_prefix: bool | None = None,
) -> ActivationStats:
    """Read ``h_l`` for every layer in ``layers`` at ``position`` over ``samples``.

    Every prompt of a batch starts with the same tokens (chat header, system message, user-turn
    opening: often half of a short prompt); those run once per batch and are continued per row
    through a KV cache. Checked once per model against full passes (falls back where the
    architecture's cached continuation differs). ``share_prefix``: None checks, False never
    shares, True shares without the check.
    """
    reader = _LayerReader(adapter, layers)
    stats = reader.new_stats(keep)
    order = length_order(samples)
    with progress_bar(progress) as bar, hooks_installed(reader.specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches([samples[i] for i in order], batch_size):
            batch = adapter.build_prompts(
                [s.question for s in chunk],
                [s.image for s in chunk],
                system=system,
                forced_prefix=forced_prefix,
            ).to(reader.device, reader.dtype)
            weights = position_weights(batch, position, adapter)
            split = reader.split(batch, weights) if share_prefix is not False else None
            if split is not None and share_prefix is None:
                check = partial(_split_matches, reader, batch, weights, split)
                split = split if reader.checked(("prefix", _has_images(batch)), check) else None
            reader.run(batch, stats, weights, split)
            stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return restore_order(stats, order)


def _continuation(prompt: PromptBatch, forced: PromptBatch, seq_keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The tail inputs that extend ``prompt`` into ``forced`` through a KV cache, or None if it does not.

    ``forced`` must be ``prompt`` with the same tokens appended to every row (what the
    built-in ``build_prompts`` produces); anything else (an adapter that pads or templates
    differently) is run in full instead. The tail's attention mask is added when it runs.
    """
    width = prompt.seq_len
    a, b = prompt.inputs["input_ids"], forced.inputs["input_ids"]
    if b.shape[1] <= width or not torch.equal(b[:, :width], a):
        return None
    tail = b[:, width:]
    if not bool((tail == tail[:1]).all()) or not bool((forced.prefix_start == width).all()):
        return None
    mask = forced.inputs.get("attention_mask")
    if mask is None or not torch.equal(mask[:, :width], prompt.inputs["attention_mask"]) or \
            not bool(mask[:, width:].all()):
        return None
    inputs = {"input_ids": tail}
    for key in seq_keys:
        if key in forced.inputs and key not in inputs and key != "attention_mask":
            inputs[key] = forced.inputs[key][:, width:]
    return inputs


def capture_forced(
    adapter: BackboneAdapter,
    samples: Sequence[Sample],
    layers: Sequence[int],
    prefixes: Sequence[str],
    *,
    position: Position = "prefix_mean",
    system: str | None = None,
    batch_size: int = 8,
    keep: bool = False,
    progress: bool = True,
    description: str = "forced prefixes",
    share_prompt: bool | None = None,
) -> list[ActivationStats]:
    """``capture`` of the same prompts under several forced prefixes, running the prompt once.

    Every forced prompt shares the whole system + user + image part, which is almost all of
    its tokens; that part is run once into a KV cache and each prefix only extends it (about
    half the compute of two full passes for a refusal/compliance pair). Within the prompt,
    the leading tokens every row shares run once per batch, as in ``capture``. The first
    batch is also run in full and compared (once per model), so an architecture whose cached
    continuation differs (position bookkeeping, image token types) falls back to full passes
    instead of reading different activations. Equal to separate ``capture`` calls up to float
    rounding. ``share_prompt``: None checks as above, False always runs full passes, True
    shares without the check (and fails if the prompts cannot be shared).
    """
    if position == "last_prompt":
        raise CrvlmError("capture_forced reads forced tokens; use capture() for last_prompt")
    if not prefixes or any(not p for p in prefixes):
        raise CrvlmError("capture_forced needs non-empty forced prefixes")
    reader = _LayerReader(adapter, layers)
    results = [reader.new_stats(keep) for _ in prefixes]
    order = length_order(samples)
    with progress_bar(progress) as bar, hooks_installed(reader.specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches([samples[i] for i in order], batch_size):
            questions, images = [s.question for s in chunk], [s.image for s in chunk]
            plain = adapter.build_prompts(questions, images, system=system)
            forced = [adapter.build_prompts(questions, images, system=system, forced_prefix=p) for p in prefixes]
            tails = [t for t in (_continuation(plain, f, reader.seq_keys) for f in forced) if t is not None]
            prompt = plain.to(reader.device, reader.dtype)  # compared above on the host, run on the model's device
            shared = share_prompt is not False and len(tails) == len(forced)
            if share_prompt and not shared:
                raise CrvlmError("share_prompt=True, but the forced prompts do not extend the plain prompt "
                                 "token for token", hint="leave share_prompt=None to fall back to full passes")
            split = reader.split(prompt) if shared else None
            if shared and share_prompt is None:
                kind = ("forced" if split is None else "forced-split", _has_images(prompt))
                check = partial(_continuation_matches, reader, prompt, forced[0], tails[0], split)
                shared = reader.checked(kind, check)
            if shared:
                reader.run_continued(prompt, [
                    (tail, stats, position_weights(f, position)[:, prompt.seq_len :])
                    for f, tail, stats in zip(forced, tails, results, strict=True)
                ], split)
            else:
                for f, stats in zip(forced, results, strict=True):
                    reader.run(f, stats, position_weights(f, position))
            for stats in results:
                stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return [restore_order(stats, order) for stats in results]


def _split_matches(reader: _LayerReader, batch: PromptBatch, weights: torch.Tensor, split: _PromptSplit) -> bool:
    return reader.same_reads(lambda into: reader.run(batch, into, weights),
                             lambda into: reader.run(batch, into, weights, split))


def _continuation_matches(reader: _LayerReader, prompt: PromptBatch, forced: PromptBatch,
                          tail: dict[str, torch.Tensor], split: _PromptSplit | None) -> bool:
    weights = position_weights(forced, "prefix_mean")
    tail_weights = weights[:, prompt.seq_len :]
    return reader.same_reads(lambda into: reader.run(forced, into, weights),
                             lambda into: reader.run_continued(prompt, [(tail, into, tail_weights)], split))
