"""Adapter for plain decoder-only language models (``*ForCausalLM``).

Expected module tree (Llama, Qwen2/3, Mistral, Gemma 1-3 text, Phi-3, SmolLM2, and GGUF
checkpoints that transformers loads into these classes)::

    XForCausalLM
    ├── model: XModel
    │   ├── embed_tokens
    │   ├── layers: ModuleList[num_hidden_layers]   <- the decoder layers crvlm hooks
    │   └── norm
    └── lm_head

Tested with transformers 5.24 (SmolLM2-135M-Instruct from GGUF, tiny random Llama/Qwen2).
Prompts go through the tokenizer's chat template; text only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from crvlm_sdk.adapters.chat import ChatTemplateAdapter
from crvlm_sdk.types import ImageInput


class CausalLMAdapter(ChatTemplateAdapter):
    name: ClassVar[str] = "causal-lm"
    model_classes: ClassVar[tuple[str, ...]] = (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "GraniteForCausalLM",
    )
    layers_path: ClassVar[str] = "model.layers"

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        if type(model).__name__ in cls.model_classes:
            return True
        # Other Llama-shaped causal LMs: claim them only if the documented tree is there.
        inner = getattr(model, "model", None)
        return type(model).__name__.endswith("ForCausalLM") and isinstance(
            getattr(inner, "layers", None), torch.nn.ModuleList
        )

    def encode_row(self, text: str, image: ImageInput | None) -> dict[str, Any]:
        return dict(self.tokenizer(text, add_special_tokens=self._add_special_tokens(text), return_tensors="pt"))
