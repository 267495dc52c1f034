"""Adapter for ``Gemma3ForConditionalGeneration`` (Gemma 3 4B/12B/27B, instruction-tuned).

Expected module tree (transformers 5.x)::

    Gemma3ForConditionalGeneration
    ├── model: Gemma3Model
    │   ├── vision_tower: SiglipVisionModel
    │   │   └── vision_model.encoder.layers: ModuleList   (never hooked)
    │   ├── multi_modal_projector
    │   └── language_model: Gemma3TextModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]   <- hooked
    └── lm_head

Prompts go through ``Gemma3Processor`` and its chat template: the template has no system turn
and folds a system message into the first user turn (crvlm keeps it that way), writes
``<start_of_image>`` where an image goes, and the processor expands it to
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` × ``<image_soft_token>`` +
``<end_of_image>\\n\\n`` (a fixed count per image, more with pan-and-scan crops).

Gemma 3 attends bidirectionally among an image's tokens, which it finds through
``token_type_ids``; without them the logits are silently different. The adapter makes sure
every row carries ``token_type_ids`` (1 on image tokens), left-padded with zeros by the
collator and extended by ``generate`` for new tokens. Several images per prompt are supported.

Tested with transformers 5.24 on tiny random models (SigLIP tower) with a real
``Gemma3Processor`` and ``Gemma3ImageProcessorPil``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class Gemma3Adapter(VisionChatAdapter):
    name: ClassVar[str] = "gemma3"
    model_classes: ClassVar[tuple[str, ...]] = ("Gemma3ForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
    token_type_inputs: ClassVar[dict[str, int]] = {"token_type_ids": 1}
