"""Batched, padding-aware reading of decoder-layer outputs at chosen token positions.

Statistics accumulate in float64 as running sums, so memory does not grow with the number of
samples; per-sample rows are kept only when asked (for probes). The forward pass stops right
after the deepest layer read, which saves most of the compute for early layers.
"""

from __future__ import annotations

import contextlib
import copy
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


def _reader(stats_for: dict[str, ActivationStats | None], weights: dict[str, torch.Tensor | None], deepest: int):
    """Hook factory: add each layer's weighted read to ``stats_for["target"]``; stop after ``deepest``.

    With no target (or no weights) the hook only stops the pass: that is how a shared prompt
    is run once to fill a KV cache without reading anything.
    """

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            stats, w = stats_for["target"], weights["w"]
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

    return make_hook


def _checked_layers(adapter: BackboneAdapter, layers: Sequence[int]) -> list[int]:
    blocks = adapter.decoder_layers()
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise CrvlmError("no layers to capture")
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise CrvlmError(f"layers {bad} out of range for a model with {len(blocks)} decoder layers")
    return layers


def _new_stats(layers: list[int], keep: bool) -> ActivationStats:
    return ActivationStats(layers=list(layers), samples={layer: [] for layer in layers} if keep else None)


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
    model = adapter.model
    layers = _checked_layers(adapter, layers)
    stats = _new_stats(layers, keep)
    target: dict[str, ActivationStats | None] = {"target": stats}
    weights: dict[str, torch.Tensor | None] = {"w": None}
    make_hook = _reader(target, weights, layers[-1])
    blocks = adapter.decoder_layers()
    specs = [HookSpec(blocks[layer], make_hook(layer)) for layer in layers]
    device, dtype = model_input_device(model), model_float_dtype(model)
    with progress_bar(progress) as bar, hooks_installed(specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches(samples, batch_size):
            batch = adapter.build_prompts(
                [s.question for s in chunk],
                [s.image for s in chunk],
                system=system,
                forced_prefix=forced_prefix,
            )
            weights["w"] = position_weights(batch, position)
            batch = batch.to(device, dtype)
            with torch.inference_mode(), contextlib.suppress(StopForward):
                model(**batch.inputs, use_cache=False)
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
    model = adapter.model
    layers = _checked_layers(adapter, layers)
    results = [_new_stats(layers, keep) for _ in prefixes]
    target: dict[str, ActivationStats | None] = {"target": None}
    weights: dict[str, torch.Tensor | None] = {"w": None}
    make_hook = _reader(target, weights, layers[-1])
    blocks = adapter.decoder_layers()
    specs = [HookSpec(blocks[layer], make_hook(layer)) for layer in layers]
    device, dtype = model_input_device(model), model_float_dtype(model)
    seq_keys = getattr(adapter, "sequence_keys", ("input_ids", "attention_mask"))
    shared = share_prompt  # None: decided on the first batch

    def run(inputs: dict[str, torch.Tensor], into: ActivationStats | None, w: torch.Tensor | None, **kw: Any):
        target["target"], weights["w"] = into, w
        with torch.inference_mode(), contextlib.suppress(StopForward):
            model(**inputs, **kw)

    with progress_bar(progress) as bar, hooks_installed(specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in batches(samples, batch_size):
            questions, images = [s.question for s in chunk], [s.image for s in chunk]
            prompt = adapter.build_prompts(questions, images, system=system)
            forced = [adapter.build_prompts(questions, images, system=system, forced_prefix=p) for p in prefixes]
            tails = [_continuation(prompt, f, seq_keys) for f in forced]
            if shared is None:
                shared = all(t is not None for t in tails) and _continuation_matches(
                    model, run, prompt, forced, tails, layers, device, dtype)
            if shared and any(t is None for t in tails):
                if share_prompt:
                    raise CrvlmError("share_prompt=True, but the forced prompts do not extend the plain prompt "
                                     "token for token", hint="leave share_prompt=None to fall back to full passes")
                shared = False
            if shared:
                cache = DynamicCache()
                run(prompt.to(device, dtype).inputs, None, None, use_cache=True, past_key_values=cache)
                for i, (f, tail, stats) in enumerate(zip(forced, tails, results, strict=True)):
                    assert tail is not None
                    branch = cache if i == len(prefixes) - 1 else copy.deepcopy(cache)
                    w = position_weights(f, position)[:, prompt.seq_len :]
                    run({k: v.to(device) for k, v in tail.items()}, stats, w, use_cache=True,
                        past_key_values=branch)
            else:
                for f, stats in zip(forced, results, strict=True):
                    run(f.to(device, dtype).inputs, stats, position_weights(f, position), use_cache=False)
            for stats in results:
                stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return results


def _continuation_matches(model: torch.nn.Module, run: Any, prompt: PromptBatch, forced: list[PromptBatch],
                          tails: list[dict[str, torch.Tensor] | None], layers: list[int],
                          device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the cached continuation reads what the full pass reads, on one batch."""
    f, tail = forced[0], tails[0]
    assert tail is not None
    full, cached = _new_stats(layers, True), _new_stats(layers, True)
    run(f.to(device, dtype).inputs, full, position_weights(f, "prefix_mean"), use_cache=False)
    cache = DynamicCache()
    try:
        run(prompt.to(device, dtype).inputs, None, None, use_cache=True, past_key_values=cache)
        run({k: v.to(device) for k, v in tail.items()}, cached,
            position_weights(f, "prefix_mean")[:, prompt.seq_len :], use_cache=True, past_key_values=cache)
    except Exception as exc:  # e.g. Qwen2-VL's 3-D rotary positions are computed from the whole prompt
        logger.info("%s cannot continue a cached prompt (%s); running full passes", type(model).__name__, exc)
        return False
    # float32 agrees to ~1e-6 of the norm; half precision to ~1e-2
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for layer in layers:
        a, b = full.rows(layer), cached.rows(layer)
        if not bool(((a - b).norm(dim=-1) <= tol * a.norm(dim=-1).clamp_min(1e-6)).all()):
            logger.info("cached continuation differs from the full pass at layer %d; running full passes", layer)
            return False
    return True
