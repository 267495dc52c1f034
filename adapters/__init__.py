"""Built-in backbone adapters, registered through the same hook a third party uses.

One module per model family; each module's docstring gives the module tree the adapter
expects and the transformers versions it was tested with.
"""

from __future__ import annotations

from crvlm_sdk.plugins.hookspecs import hookimpl


@hookimpl
def crvlm_adapters() -> list[type]:
    from crvlm_adapters.causal_lm import CausalLMAdapter
    from crvlm_adapters.gemma3 import Gemma3Adapter
    from crvlm_adapters.idefics3 import Idefics3Adapter
    from crvlm_adapters.internvl import InternVLAdapter
    from crvlm_adapters.llava import LlavaAdapter
    from crvlm_adapters.llava_next import LlavaNextAdapter
    from crvlm_adapters.llava_onevision import LlavaOnevisionAdapter
    from crvlm_adapters.qwen2_5_vl import Qwen2_5_VLAdapter
    from crvlm_adapters.qwen2_vl import Qwen2VLAdapter

    return [
        LlavaAdapter,
        LlavaNextAdapter,
        LlavaOnevisionAdapter,
        Qwen2VLAdapter,
        Qwen2_5_VLAdapter,
        InternVLAdapter,
        Idefics3Adapter,
        Gemma3Adapter,
        CausalLMAdapter,
    ]
