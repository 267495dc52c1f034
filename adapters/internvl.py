"""Adapter for ``InternVLForConditionalGeneration`` (InternVL2.5/InternVL3 ``-hf`` checkpoints).

Expected module tree (transformers 5.x)::

    InternVLForConditionalGeneration
    ├── model: InternVLModel
    │   ├── vision_tower: InternVLVisionModel
    │   │   └── encoder.layer: ModuleList[vision_config.num_hidden_layers]   (never hooked)
    │   ├── multi_modal_projector
    │   └── language_model: Qwen2Model or LlamaModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]            <- hooked
    └── lm_head

A longest-``ModuleList`` guess picks the InternViT encoder on the small models (InternVL3-1B:
24 vision layers against 24 decoder layers; InternVL3-2B: 24 against 28 only by luck), so the
path is explicit here.

Prompts go through ``InternVLProcessor`` and its chat template, which writes ``<IMG_CONTEXT>``
where an image goes; the processor tiles the image by aspect ratio (``crop_to_patches``, up to
``max_patches`` tiles plus a thumbnail) and expands the placeholder to
``<img>`` + ``image_seq_length`` × tiles ``<IMG_CONTEXT>`` + ``</img>``, so the count varies
with the image. Several images per prompt are supported.

Without torchvision, ``AutoProcessor`` cannot build ``InternVLProcessor`` (video processor);
:func:`crvlm_sdk.models.processors.load_processor` builds it without the video part, with
``GotOcr2ImageProcessorPil``.

Tested with transformers 5.24 on tiny random models (Qwen2 text model) with a real
``InternVLProcessor``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class InternVLAdapter(VisionChatAdapter):
    name: ClassVar[str] = "internvl"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
