"""What identifies a backbone: the rule behind :class:`~crvlm_sdk.types.Fingerprint`."""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from crvlm_sdk.adapters.batching import text_config
from crvlm_sdk.types import Fingerprint

if TYPE_CHECKING:
    from crvlm_sdk.adapters.base import BackboneAdapter


def fingerprint_model(adapter: BackboneAdapter) -> Fingerprint:
    """Fingerprint of the adapter's model (see :class:`Fingerprint` for the hash rule)."""
    model = adapter.model
    cfg = text_config(model)
    digest = hashlib.sha256()
    weights = sorted(adapter.decoder_layers()[0].state_dict().items())
    for name, tensor in weights:
        digest.update(name.encode())
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        else:
            t = t.to("cpu").contiguous()
        digest.update(t.numpy().tobytes())
    return Fingerprint(
        model_type=str(getattr(model.config, "model_type", "unknown")),
        architectures=[type(model).__name__],
        hidden_size=int(cfg.hidden_size),
        num_layers=len(adapter.decoder_layers()),
        vocab_size=int(cfg.vocab_size),
        first_layer_sha256=digest.hexdigest(),
        first_layer_sketch=weight_sketch(weights),
    )


#: values sampled per tensor and projections kept: enough that rounding noise averages out
#: (about 0.1% of the sketch), few enough to hash a 7B model's first layer in milliseconds
SKETCH_SAMPLES = 4096
SKETCH_SIZE = 16


def weight_sketch(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[float]]:
    """Per floating tensor, fixed ±1 projections of its weights sampled at fixed positions, so the
    same weights in any floating dtype give nearly the same vectors (see :class:`Fingerprint`).

    Positions depend only on a tensor's name and size, never on its dtype or device. Tensors are
    sketched separately: a norm's weights (about 1) would otherwise drown a projection's (about 0.02).
    """
    sketch = {}
    for name, tensor in weights:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        index = torch.randint(flat.numel(), (min(SKETCH_SAMPLES, flat.numel()),), generator=generator)
        values = flat[index.to(flat.device)].to(device="cpu", dtype=torch.float64)
        signs = torch.randint(0, 2, (SKETCH_SIZE, values.numel()), generator=generator).double() * 2 - 1
        sketch[name] = (signs @ values / math.sqrt(values.numel())).tolist()
    return sketch
