"""Built-in method components, registered through the same hooks a third party uses."""

from __future__ import annotations

from crvlm_sdk.hookspecs import hookimpl


@hookimpl
def crvlm_gates() -> list[type]:
    from crvlm_plugins.gates import AlwaysGate, ProbeGate

    return [ProbeGate, AlwaysGate]
