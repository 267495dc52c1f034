"""Adapter for ``Idefics3ForConditionalGeneration`` (Idefics3-8B-Llama3, SmolVLM-Instruct).

Expected module tree (transformers 5.x)::

    Idefics3ForConditionalGeneration
    ├── model: Idefics3Model
    │   ├── vision_model: Idefics3VisionTransformer
    │   │   └── encoder.layers: ModuleList[vision_config.num_hidden_layers]   (never hooked)
    │   ├── connector
    │   └── text_model: LlamaModel
    │       └── layers: ModuleList[text_config.num_hidden_layers]             <- hooked
    └── lm_head

Note ``text_model``, not ``language_model``: the LLaVA-style path does not exist here.

Prompts go through ``Idefics3Processor`` and its chat template (``User:<image>question``). The
processor splits an image into tiles of ``max_image_size`` (up to ``size['longest_edge']``)
plus a global view and writes, per tile, ``<fake_token_around_image><row_i_col_j>`` followed
by ``image_seq_len`` ``<image>`` tokens — so the number of image tokens depends on the image's
size. Rows are encoded one at a time; their tile tensors (``pixel_values``,
``pixel_attention_mask``) are zero-padded to the batch's largest row exactly as the processor
pads a batch, and the model drops the all-zero tiles. Several images per prompt are supported.

Tested with transformers 5.24 on tiny random models laid out like SmolVLM (SmolLM2 text model)
with a real ``Idefics3Processor`` and ``Idefics3ImageProcessorPil``.
"""

from __future__ import annotations

from typing import ClassVar

from crvlm_sdk.adapters.vision import VisionChatAdapter


class Idefics3Adapter(VisionChatAdapter):
    name: ClassVar[str] = "idefics3"
    model_classes: ClassVar[tuple[str, ...]] = ("Idefics3ForConditionalGeneration",)
    layers_path: ClassVar[str] = "model.text_model.layers"
