"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and LLaVA-style models).

Expected module tree (transformers 5.x; 4.x had ``language_model`` on the outer class)::

    LlavaForConditionalGeneration
    ├── model: LlavaModel
    │   ├── vision_tower            (CLIP/SigLIP; never hooked)
    │   ├── multi_modal_projector
    │   └── language_model: XModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]   <- hooked
    └── lm_head

Tested with transformers 5.24 on tiny random LLaVA models (CLIP vision tower, Llama text
model) with a real ``LlavaProcessor``. The processor expands each ``<image>`` placeholder to
the vision tower's patch count, so positions are computed after expansion.
"""

from __future__ import annotations

from typing import Any, ClassVar

from crvlm_sdk.interfaces import ImageInput
from crvlm_sdk.prompts import ChatTemplateAdapter


class LlavaAdapter(ChatTemplateAdapter):
    name: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
    supports_images: ClassVar[bool] = True

    def messages(self, question: str, *, has_image: bool, system: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if system:
            out.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": question})
        out.append({"role": "user", "content": content})
        return out

    def encode_row(self, text: str, image: ImageInput | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if image is not None:
            kwargs["images"] = [image]
        kwargs["add_special_tokens"] = self._add_special_tokens(text)
        return dict(self.processor(**kwargs))
