"""Batched, padding-aware reading of decoder-layer outputs at chosen token positions.

Statistics accumulate in float64 as running sums, so memory does not grow with the number of
samples; per-sample rows are kept only when asked (for probes). The forward pass stops right
after the deepest layer read, which saves most of the compute for early layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.hooks import HookSpec, StopForward, hooks_installed, layer_hidden
from crvlm_sdk.interfaces import BackboneAdapter, PromptBatch, Sample

Position = Literal["last_prompt", "prefix_last", "prefix_mean"]


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
    blocks = adapter.decoder_layers()
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise CrvlmError("no layers to capture")
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise CrvlmError(f"layers {bad} out of range for a model with {len(blocks)} decoder layers")
    stats = ActivationStats(layers=list(layers), samples={layer: [] for layer in layers} if keep else None)
    deepest = layers[-1]
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            h = layer_hidden(output)
            w = current["weights"].to(device=h.device)
            read = torch.bmm(w.unsqueeze(1), h.float()).squeeze(1)  # (B, H)
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

    specs = [HookSpec(blocks[layer], make_hook(layer)) for layer in layers]
    device, dtype = model_input_device(model), model_float_dtype(model)
    chunks = batches(samples, batch_size)
    with progress_bar(progress) as bar, hooks_installed(specs):
        task = bar.add_task(description, total=len(samples))
        for chunk in chunks:
            batch = adapter.build_prompts(
                [s.question for s in chunk],
                [s.image for s in chunk],
                system=system,
                forced_prefix=forced_prefix,
            )
            current["weights"] = position_weights(batch, position)
            batch = batch.to(device, dtype)
            with torch.inference_mode(), contextlib.suppress(StopForward):
                model(**batch.inputs, use_cache=False)
            stats.count += len(chunk)
            bar.advance(task, len(chunk))
    return stats
