"""Adapter for ``LlavaNextForConditionalGeneration`` (LLaVA-1.6 / LLaVA-NeXT ``llava-hf`` checkpoints).

Expected module tree (transformers 5.x)::

    LlavaNextForConditionalGeneration
    ├── model: LlavaNextModel
    │   ├── vision_tower: CLIPVisionModel     (never hooked)
    │   ├── multi_modal_projector
    │   ├── image_newline
    │   └── language_model: MistralModel / LlamaModel / ...
    │       └── layers: ModuleList[text_config.num_hidden_layers]   <- hooked
    └── lm_head

Prompts go through ``LlavaNextProcessor`` and the checkpoint's chat template (Mistral
``[INST]``, Vicuna ``USER:`` or ChatML for the 34B model; the Mistral one has no system turn,
so crvlm folds a system message into the user turn). The processor expands ``<image>`` by the
"any-res" rule: a base view plus the tiles of the best-fitting grid pinpoint, with the padding
rows removed and a newline token per row, so the count depends on the image's size and aspect
ratio. Rows are encoded one at a time and their ``pixel_values`` (``(1, tiles, C, H, W)``) are
zero-padded to the batch's largest tile count, exactly as the processor pads a batch; the model
unpads them with ``image_sizes``. Several images per prompt are accepted.

Tested with transformers 5.24 on tiny random models (CLIP tower, Llama text model) with a real
``LlavaNextProcessor`` and ``LlavaNextImageProcessorPil``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class LlavaNextAdapter(VisionChatAdapter):
    name: ClassVar[str] = "llava-next"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.language_model.layers"
