"""Entry-point module: crvlm calls these hook implementations to collect components."""

from __future__ import annotations

import crvlm_sdk


@crvlm_sdk.hookimpl
def crvlm_adapters() -> list[type]:
    from crvlm_pythia_adapter.adapter import PythiaAdapter

    return [PythiaAdapter]
