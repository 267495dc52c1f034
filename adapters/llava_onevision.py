"""Adapter for ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision ``llava-hf`` checkpoints).

Expected module tree (transformers 5.x)::

    LlavaOnevisionForConditionalGeneration
    ├── model: LlavaOnevisionModel
    │   ├── vision_tower: SiglipVisionModel     (never hooked)
    │   ├── multi_modal_projector
    │   ├── image_newline
    │   └── language_model: Qwen2Model
    │       └── layers: ModuleList[text_config.num_hidden_layers]   <- hooked
    └── lm_head

The LLaVA-NeXT layout and any-res prompting (:mod:`crvlm_adapters.llava_next`), with a Qwen2
text model and its own chat template (``<|im_start|>user <image>\\nquestion<|im_end|>``); large
grids are pooled to at most ``anyres_max_9`` worth of tokens, so the image-token count still
varies with the image. ``LlavaOnevisionProcessor`` owns a video processor, so without
torchvision it is built by :func:`crvlm_sdk.models.processors.load_processor` without the video part.

Tested with transformers 5.24 on tiny random models (SigLIP tower, Qwen2 text model) with a
real ``LlavaOnevisionProcessor`` and ``LlavaOnevisionImageProcessorPil``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_adapters.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    name: ClassVar[str] = "llava-onevision"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
