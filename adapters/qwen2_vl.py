"""Adapter for ``Qwen2VLForConditionalGeneration`` (Qwen2-VL-2B/7B/72B-Instruct).

Expected module tree (transformers 5.x)::

    Qwen2VLForConditionalGeneration
    ├── model: Qwen2VLModel
    │   ├── visual: Qwen2VisionTransformerPretrainedModel
    │   │   └── blocks: ModuleList[vision_config.depth]          (never hooked)
    │   └── language_model: Qwen2VLTextModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]  <- hooked
    └── lm_head

A longest-``ModuleList`` guess picks ``visual.blocks`` (32 vision blocks against 28 decoder
layers on the 2B/7B models), which is why the path is explicit here.

Prompts go through ``Qwen2VLProcessor`` and its chat template: each image becomes
``<|vision_start|><|image_pad|><|vision_end|>`` before the question, and the processor repeats
``<|image_pad|>`` once per merged 28×28 patch, so the count varies with the image's size.
Positions use multimodal RoPE, computed from ``mm_token_type_ids`` and the attention mask: the
adapter makes sure every row carries ``mm_token_type_ids`` (1 on image tokens), which the
collator left-pads like ``input_ids``. Several images per prompt are supported.

Without torchvision, ``AutoProcessor`` cannot build ``Qwen2VLProcessor`` (its video processor
needs torchvision); :func:`crvlm_sdk.models.processors.load_processor` builds it without the video part.

Tested with transformers 5.24 on tiny random models (real patch geometry: 14 px patches,
2×2 merge) with a real ``Qwen2VLProcessor`` and ``Qwen2VLImageProcessorPil``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class Qwen2VLAdapter(VisionChatAdapter):
    name: ClassVar[str] = "qwen2-vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
    token_type_inputs: ClassVar[dict[str, int]] = {"mm_token_type_ids": 1}
