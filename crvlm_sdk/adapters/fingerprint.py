"""What identifies a backbone: the rule behind :class:`~crvlm_sdk.types.Fingerprint`."""

from __future__ import annotations

import hashlib
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
    first = adapter.decoder_layers()[0]
    for name, tensor in sorted(first.state_dict().items()):
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
    )
