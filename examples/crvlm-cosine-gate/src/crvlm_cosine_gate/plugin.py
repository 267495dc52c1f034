"""Entry-point module: crvlm calls these hook implementations to collect components."""

from __future__ import annotations

import crvlm_sdk


@crvlm_sdk.hookimpl
def crvlm_gates() -> list[type]:
    from crvlm_cosine_gate.gate import CosineGate

    return [CosineGate]
