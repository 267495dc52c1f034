"""Batched, padding-aware reading of decoder-layer outputs at chosen token positions.

Statistics accumulate in float64 as running sums, so memory does not grow with the number of
samples; per-sample rows are kept only when asked (for probes). The forward pass stops right
after the deepest layer read, which saves most of the compute for early layers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import DynamicCache

from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.hooks import HookSpec, StopForward, hooks_installed, layer_hidden
from crvlm_sdk.interfaces import BackboneAdapter, PromptBatch, Sample

Position = Literal["last_prompt", "prefix_last", "prefix_mean"]
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

    def var(self, layer: int) -> torch.Tensor:
        mean = self.sums[layer] / self.count
        return (self.sq_sums[layer] / self.count - mean * mean).clamp_min(0).float()

    def rows(self, layer: int) -> torch.Tensor:
        """``(N, H)`` float32 per-sample activations (needs ``keep=True``)."""
        if self.samples is None:
            raise CrvlmError("per-sample activations were not kept; capture with keep=True")
        return torch.cat(self.samples[layer]) if self.samples[layer] else torch.empty(0)


def position_weights(batch: PromptBatch, position: Position) -> torch.Tensor:
    """``(B, S)`` float32 weights over tokens: one-hot for a single position, uniform for a span."""
    cols = torch.arange(batch.seq_len).unsqueeze(0)
    if position == "last_prompt":
        return (cols == batch.last_prompt_index.cpu().unsqueeze(1)).float()
    start, end = batch.prefix_start.cpu().unsqueeze(1), batch.prefix_end.cpu().unsqueeze(1)
    if bool((end <= start).any()):
        raise CrvlmError(f"position {position!r} needs a forced prefix, but the prompts have none")
    if position == "prefix_last":
        return (cols == end - 1).float()
    if position == "prefix_mean":
        span = ((cols >= start) & (cols < end)).float()
        return span / span.sum(1, keepdim=True)
    raise CrvlmError(f"unknown position {position!r}; use last_prompt, prefix_last or prefix_mean")


def model_input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def batches(items: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    if size < 1:
        raise CrvlmError(f"batch size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def progress_bar(enabled: bool) -> Progress:
    """The one progress-bar style of crvlm's long loops (capture, evaluation); gone when done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, disable=not enabled, transient=True)


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
        self._into: ActivationStats | None = None
        self._weights: torch.Tensor | None = None

    def new_stats(self, keep: bool) -> ActivationStats:
        return ActivationStats(layers=list(self.layers), samples={layer: [] for layer in self.layers} if keep else None)

    def _hook(self, layer: int):
        deepest = self.layers[-1]

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            stats, w = self._into, self._weights
            if stats is not None and w is not None:
                h = layer_hidden(output)
                read = torch.bmm(w.to(device=h.device).unsqueeze(1), h.float()).squeeze(1)  # (B, H)
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

    def run(self, batch: PromptBatch, into: ActivationStats | None, weights: torch.Tensor | None) -> None:
        """One full forward pass of ``batch`` (no cache), read at ``weights`` into ``into``."""
        self._forward(batch.to(self.device, self.dtype).inputs, into, weights, use_cache=False)

    def run_continued(self, prompt: PromptBatch,
                      branches: Sequence[tuple[dict[str, torch.Tensor], ActivationStats, torch.Tensor]]) -> None:
        """Run ``prompt`` once into a KV cache, then each ``(tail inputs, into, weights)`` from it.

        Every branch but the last continues a copy, so each sees the prompt's cache alone.
        """
        cache = DynamicCache()
        self._forward(prompt.to(self.device, self.dtype).inputs, None, None, use_cache=True,
                      **{self._cache_kwarg: cache})
        for i, (tail, into, weights) in enumerate(branches):
            branch = cache if i == len(branches) - 1 else copy.deepcopy(cache)
            self._forward({k: v.to(self.device) for k, v in tail.items()}, into, weights, use_cache=True,
                          **{self._cache_kwarg: branch})

    def _forward(self, inputs: dict[str, torch.Tensor], into: ActivationStats | None,
                 weights: torch.Tensor | None, **kwargs: Any) -> None:
        self._into, self._weights = into, weights
        with torch.inference_mode(), contextlib.suppress(StopForward):
            self.model(**inputs, **kwargs)


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
) -> ActivationStats:
    """Read ``h_l`` for every layer in ``layers`` at ``position`` over ``samples``."""
    reader = _LayerReader(adapter, layers)
    stats = reader.new_stats(keep)
    with progress_bar(progress) as bar, hooks_installed(reader.specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches(samples, batch_size):
            batch = adapter.build_prompts(
                [s.question for s in chunk],
                [s.image for s in chunk],
                system=system,
                forced_prefix=forced_prefix,
            )
            reader.run(batch, stats, position_weights(batch, position))
            stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return stats


def _continuation(prompt: PromptBatch, forced: PromptBatch, seq_keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The inputs that extend ``prompt`` into ``forced`` through a KV cache, or None if it does not.

    ``forced`` must be ``prompt`` with the same tokens appended to every row (what the
    built-in ``build_prompts`` produces); anything else (an adapter that pads or templates
    differently) is run in full instead.
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
    inputs = {"input_ids": tail, "attention_mask": mask}
    for key in seq_keys:
        if key in forced.inputs and key not in inputs:
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
    half the compute of two full passes for a refusal/compliance pair). The first batch is
    also run in full and compared, so an architecture whose cached continuation differs
    (position bookkeeping, image token types) falls back to full passes instead of reading
    different activations. Equal to separate ``capture`` calls up to float rounding.
    ``share_prompt``: None checks as above, False always runs full passes, True shares
    without the check (and fails if the prompts cannot be shared).
    """
    if position == "last_prompt":
        raise CrvlmError("capture_forced reads forced tokens; use capture() for last_prompt")
    if not prefixes or any(not p for p in prefixes):
        raise CrvlmError("capture_forced needs non-empty forced prefixes")
    reader = _LayerReader(adapter, layers)
    results = [reader.new_stats(keep) for _ in prefixes]
    seq_keys = getattr(adapter, "sequence_keys", ("input_ids", "attention_mask"))
    shared = share_prompt  # None: decided on the first batch
    with progress_bar(progress) as bar, hooks_installed(reader.specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches(samples, batch_size):
            questions, images = [s.question for s in chunk], [s.image for s in chunk]
            prompt = adapter.build_prompts(questions, images, system=system)
            forced = [adapter.build_prompts(questions, images, system=system, forced_prefix=p) for p in prefixes]
            tails = [t for t in (_continuation(prompt, f, seq_keys) for f in forced) if t is not None]
            if shared is None:
                shared = len(tails) == len(forced) and _continuation_matches(reader, prompt, forced[0], tails[0])
            if shared and len(tails) < len(forced):
                if share_prompt:
                    raise CrvlmError("share_prompt=True, but the forced prompts do not extend the plain prompt "
                                     "token for token", hint="leave share_prompt=None to fall back to full passes")
                shared = False
            if shared:
                reader.run_continued(prompt, [
                    (tail, stats, position_weights(f, position)[:, prompt.seq_len :])
                    for f, tail, stats in zip(forced, tails, results, strict=True)
                ])
            else:
                for f, stats in zip(forced, results, strict=True):
                    reader.run(f, stats, position_weights(f, position))
            for stats in results:
                stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return results


def _continuation_matches(reader: _LayerReader, prompt: PromptBatch, forced: PromptBatch,
                          tail: dict[str, torch.Tensor]) -> bool:
    """Whether the cached continuation reads what the full pass reads, on one batch."""
    full, cached = reader.new_stats(True), reader.new_stats(True)
    weights = position_weights(forced, "prefix_mean")
    reader.run(forced, full, weights)
    try:
        reader.run_continued(prompt, [(tail, cached, weights[:, prompt.seq_len :])])
    except Exception as exc:  # e.g. Qwen2-VL's 3-D rotary positions are computed from the whole prompt
        logger.info("%s cannot continue a cached prompt (%s); running full passes", type(reader.model).__name__, exc)
        return False
    # float32 agrees to ~1e-6 of the norm; half precision to ~1e-2
    tol = 1e-3 if reader.dtype == torch.float32 else 5e-2
    for layer in reader.layers:
        a, b = full.rows(layer), cached.rows(layer)
        if not bool(((a - b).norm(dim=-1) <= tol * a.norm(dim=-1).clamp_min(1e-6)).all()):
            logger.info("cached continuation differs from the full pass at layer %d; running full passes", layer)
            return False
    return True
