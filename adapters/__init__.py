"""Built-in backbone adapters, registered through the same hook a third party uses."""

from __future__ import annotations

from crvlm_sdk.hookspecs import hookimpl


@hookimpl
def crvlm_adapters() -> list[type]:
    from crvlm_adapters.causal_lm import CausalLMAdapter
    from crvlm_adapters.llava import LlavaAdapter

    return [LlavaAdapter, CausalLMAdapter]
