"""The one place where crvlm registers and removes PyTorch hooks.

Every hook goes through :func:`hooks_installed`, which removes all of them on any exit path,
including when registration itself fails half-way, so a crashed ``generate`` never leaves a
steered model behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass whose output is not needed."""


@dataclass(frozen=True)
class HookSpec:
    """A hook to install: ``kind`` is ``"forward"`` or ``"pre"`` (forward pre-hook)."""

    module: torch.nn.Module
    fn: Callable[..., Any]
    kind: str = "forward"
    with_kwargs: bool = False


def _register(spec: HookSpec) -> RemovableHandle:
    if spec.kind == "forward":
        return spec.module.register_forward_hook(spec.fn, with_kwargs=spec.with_kwargs)
    if spec.kind == "pre":
        return spec.module.register_forward_pre_hook(spec.fn, with_kwargs=spec.with_kwargs)
    raise ValueError(f"unknown hook kind {spec.kind!r}")


@contextmanager
def hooks_installed(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Install ``specs`` for the duration of the block; always remove every one of them."""
    handles: list[RemovableHandle] = []
    try:
        for spec in specs:
            handles.append(_register(spec))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (plain tensor in 5.x, tuple in 4.x)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the original structure."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module's weights live (with ``device_map="auto"`` each layer may differ)."""
    for param in module.parameters():
        return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def last_token_index(attention_mask: torch.Tensor | None, seq_len: int, batch: int, device: Any) -> torch.Tensor:
    """Index of each row's last real token, without a host sync.

    A 2-D mask may be longer than the current input when a cache holds earlier tokens; only
    its last ``seq_len`` columns describe this call. Without a usable mask, left padding is
    assumed and the last position is used.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= seq_len:
        mask = attention_mask[:, attention_mask.shape[1] - seq_len :]
        return (seq_len - 1) - mask.flip(-1).to(torch.int32).argmax(-1).to(torch.long)
    return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
