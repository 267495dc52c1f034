"""Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL-3B/7B/32B/72B-Instruct).

Expected module tree (transformers 5.x)::

    Qwen2_5_VLForConditionalGeneration
    ├── model: Qwen2_5_VLModel
    │   ├── visual: Qwen2_5_VisionTransformerPretrainedModel
    │   │   └── blocks: ModuleList[vision_config.depth]          (never hooked)
    │   └── language_model: Qwen2_5_VLTextModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]  <- hooked
    └── lm_head

Same prompting and positions as Qwen2-VL (:mod:`crvlm_adapters.qwen2_vl`): the same chat
template, ``<|image_pad|>`` repeated once per merged patch, multimodal RoPE from
``mm_token_type_ids`` — which Qwen2.5-VL accepts missing but then positions the image tokens
wrongly, so the adapter always supplies it. The vision tower differs (windowed attention),
which crvlm never touches.

Tested with transformers 5.24 on tiny random models with a real ``Qwen2_5_VLProcessor`` and
``Qwen2VLImageProcessorPil`` (built without the video processor, see
:mod:`crvlm_sdk.models.processors`).
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name: ClassVar[str] = "qwen2.5-vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
