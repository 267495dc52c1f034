"""Adapter for ``GPTNeoXForCausalLM`` (EleutherAI Pythia 70M–12B, GPT-NeoX-20B).

Expected module tree (transformers 5.x)::

    GPTNeoXForCausalLM
    ├── gpt_neox: GPTNeoXModel
    │   ├── embed_in
    │   ├── layers: ModuleList[num_hidden_layers]   <- the decoder layers crvlm hooks
    │   └── final_layer_norm
    └── embed_out / lm_head

crvlm's built-in ``causal-lm`` adapter only claims models with ``model.layers``, so this class
needs its own adapter. Pythia models are base models without a chat template: prompts are
rendered here as ``[system\\n\\n]Question: ...\\nAnswer:`` and a forced prefix is tokenised
as the continuation of ``Answer:`` (with its leading space), which is what the model would
generate. Text only.

Tested with transformers 5.24 on a tiny random GPT-NeoX model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk import AdapterError, BackboneAdapter
from crvlm_sdk.types import ImageInput


class PythiaAdapter(BackboneAdapter):
    name: ClassVar[str] = "pythia"
    model_classes: ClassVar[tuple[str, ...]] = ("GPTNeoXForCausalLM",)

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        inner = getattr(model, "gpt_neox", None)
        layers = getattr(inner, "layers", None)
        expected = int(model.config.num_hidden_layers)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) != expected:
            children = ", ".join(name for name, _ in model.named_children())
            raise AdapterError(
                f"adapter 'pythia' expected {type(model).__name__}.gpt_neox.layers, a ModuleList of {expected} "
                f"layers; found {type(layers).__name__ if layers is not None else 'nothing'} "
                f"(children: {children})",
                hint="this adapter is for GPTNeoXForCausalLM; pick another with --adapter",
            )
        self._layers = layers

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self._layers

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def render_prompt(self, question: str, *, has_image: bool, system: str | None,
                      num_images: int | None = None) -> str:
        head = f"{system.strip()}\n\n" if system else ""
        return f"{head}Question: {question.strip()}\nAnswer:"

    def encode_row(self, text: str, image: ImageInput | None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text(self, text: str) -> list[int]:
        # Forced prefixes continue "Answer:", so they carry the space the model would write.
        spaced = text if text[:1].isspace() else f" {text}"
        return list(self.tokenizer(spaced, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise AdapterError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        return int(pad)
