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
the vision tower's patch count, so positions are computed after expansion. Prompting (content
lists, several images, system folding) is :class:`crvlm_sdk.vlm_adapter.VisionChatAdapter`'s.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class LlavaAdapter(VisionChatAdapter):
    name: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
