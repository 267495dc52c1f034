"""Tiny random VLMs of every class crvlm supports, with the model's real processor, offline.

Each builder makes a two-layer, 64-wide model of one transformers class from its config classes
(seeded random weights, no download), pairs it with that model's own processor class, image
processor and chat template, saves both with ``save_pretrained`` and returns the directory, so
tests load them exactly as users load real checkpoints. The tokenizer is SmolLM2's (a real BPE
with ChatML tokens) plus the special tokens each model family adds; the chat templates below
are the ones the public checkpoints ship (noted per template), so image placement and system
handling are the model's own. Image processors are configured so that differently sized images
expand to different numbers of image tokens wherever the model allows it (dynamic resolution,
tiling, any-res grids) — that is what the conformance kit's position checks need.

Without torchvision, transformers uses the Pillow image processors (``*ImageProcessorPil``) and
cannot build the processors that also own a video processor; those are built and saved through
:func:`crvlm_sdk.models.processors.image_only_processor_class`, which writes the original class name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.adapters.templates import CHATML_VLM
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.models.processors import image_only_processor_class

HIDDEN = 64
LAYERS = 2
IMAGE_TOKEN = "<image>"

# Qwen2-VL-7B-Instruct and Qwen2.5-VL-*-Instruct (identical templates).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# OpenGVLab/InternVL3-*-hf (transformers' conversion script).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (an Idefics3ForConditionalGeneration over SmolLM2).
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# google/gemma-3-*-it.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

# llava-hf/llava-v1.6-34b-hf (ChatML; the only LLaVA-NeXT template that fits SmolLM2's tokens).
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(tokenizer_dir: str | Path, tokens: Sequence[str] = (), **extra: str) -> Any:
    """SmolLM2's tokenizer plus a model family's special tokens (``extra`` become named attributes)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"extra_special_tokens": extra} if extra else {}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, **kwargs)
    missing = [t for t in [*tokens, *extra.values()] if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(list(dict.fromkeys(missing)), special_tokens=True)
    tok.padding_side = "left"
    return tok


def _ids(tok: Any, *tokens: str) -> list[int]:
    return [int(tok.convert_tokens_to_ids(t)) for t in tokens]


def _text(tok: Any, **overrides: Any) -> dict[str, Any]:
    """A Llama-shaped text config shared by the tiny models (2 layers, hidden 64, GQA 4/2)."""
    base: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    base.update(overrides)
    return base


def _save(out: str | Path, model: torch.nn.Module, processor: Any) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _vision_transformer(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    base.update(overrides)
    return base


def _small_llama(tok: Any, layers: int, hidden: int) -> dict[str, Any]:
    """The Llama text config of the tiny text model and tiny LLaVA (deeper and narrower than
    :func:`_text`, so gate and band layers can differ; fixed special-token ids)."""
    return _text(tok, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_tiny_causal_lm(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 32,
                         seed: int = 0) -> Path:
    """A random ``LlamaForCausalLM`` with SmolLM2's tokenizer, saved to ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    return _save(out, LlamaForCausalLM(LlamaConfig(**_small_llama(tok, layers, hidden))), tok)


def build_tiny_llava(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 32,
                     image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP tower) with a real ``LlavaProcessor``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_small_llama(tok, layers, hidden)),
                         image_token_id=_ids(tok, IMAGE_TOKEN)[0], vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_VLM)
    return _save(out, model, processor)


def build_tiny_qwen2_vl(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0, version: str = "2") -> Path:
    """``Qwen2VLForConditionalGeneration`` (or ``Qwen2_5_VL…`` with ``version="2.5"``).

    Real patch geometry (14 px patches merged 2×2, so one token per 28×28 px) between 4 and 16
    tokens per image: a 56×56 image gives 4 image tokens, 100×60 gives 8, 200×120 gives 15.
    """
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tok = _tokenizer(tokenizer_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    start, end, image, video = _ids(tok, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    # multimodal rope splits head_dim/2 = 8 frequencies over (time, height, width)
    text = _text(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    if version == "2":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2}
        config_cls, model_cls, proc_cls = (
            transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor,
        )
    elif version == "2.5":
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": HIDDEN,
                  "window_size": 56, "fullatt_block_indexes": [1]}
        config_cls, model_cls, proc_cls = (
            transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor,
        )
    else:
        raise CrvlmError(f"unknown Qwen-VL version {version!r}; use '2' or '2.5'")
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                        vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(seed)
    model = model_cls(config)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    )
    processor = image_only_processor_class(proc_cls)(image_processor=image_processor, tokenizer=tok,
                                                     chat_template=QWEN2_VL_TEMPLATE)
    return _save(out, model, processor)


def build_tiny_qwen2_5_vl(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``Qwen2_5_VLForConditionalGeneration`` (windowed vision attention), same geometry as Qwen2-VL."""
    return build_tiny_qwen2_vl(out, tokenizer_dir, seed=seed, version="2.5")


def build_tiny_internvl(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``InternVLForConditionalGeneration`` (Qwen2 text model, InternViT tower, pixel-shuffle 0.5).

    32×32 tiles of 4 tokens each; images are cut into up to 4 tiles by aspect ratio, plus a
    thumbnail when cut, so a square image gives 4 tokens and a 2:1 image 12.
    """
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    tok = _tokenizer(tokenizer_dir, start_image_token="<img>", end_image_token="</img>",
                     context_image_token="<IMG_CONTEXT>", video_token="<video>")
    (image,) = _ids(tok, "<IMG_CONTEXT>")
    text = _text(tok, model_type="qwen2")
    vision = InternVLVisionConfig(**_vision_transformer())
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=image, image_seq_length=4,
                            downsample_ratio=0.5, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, image_seq_length=4, chat_template=INTERNVL_TEMPLATE
    )
    return _save(out, model, processor)


def build_tiny_idefics3(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``Idefics3ForConditionalGeneration`` laid out like SmolVLM (SigLIP-style tower, pixel shuffle 2).

    Images are split into 32×32 tiles (up to 2×2) plus a global view, 4 tokens each: a small
    image gives 4 tokens, a 64×64 one 20.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _tokenizer(tokenizer_dir, ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                                     *grid])
    (image,) = _ids(tok, "<image>")
    config = Idefics3Config(text_config=_text(tok, model_type="llama"),
                            vision_config=Idefics3VisionConfig(**_vision_transformer()),
                            image_token_id=image, scale_factor=2)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    return _save(out, model, processor)


def build_tiny_gemma3(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``Gemma3ForConditionalGeneration`` (SigLIP tower, 4 pooled tokens per image).

    Gemma 3 always expands an image to the same number of tokens (``mm_tokens_per_image``).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        SiglipVisionConfig,
    )

    tok = _tokenizer(tokenizer_dir, ["<start_of_turn>", "<end_of_turn>"], boi_token="<start_of_image>",
                     eoi_token="<end_of_image>", image_token="<image_soft_token>")
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = _text(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, model_type="gemma3_text")
    vision = SiglipVisionConfig(**_vision_transformer())
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi,
                          eoi_token_index=eoi, image_token_index=image)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    return _save(out, model, processor)


def build_tiny_llava_next(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``LlavaNextForConditionalGeneration`` (CLIP tower, any-res grids of 32×32 tiles).

    The number of image tokens depends on the image's size and aspect ratio (base view, grid
    tiles with the padding rows removed, and one newline token per row).
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = _tokenizer(tokenizer_dir, ["<image>"])
    (image,) = _ids(tok, "<image>")
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(**_vision_transformer(), projection_dim=HIDDEN)
    config = LlavaNextConfig(vision_config=vision, text_config=_text(tok, model_type="llama"),
                             image_token_index=image, image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    return _save(out, model, processor)


def build_tiny_llava_onevision(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 text model, any-res grids).

    Like LLaVA-NeXT, the image-token count depends on size and aspect ratio; OneVision also
    pools the grid features down when they exceed ``anyres_max_9`` tiles' worth.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    tok = _tokenizer(tokenizer_dir, ["<image>", "<video>"])
    image, video = _ids(tok, "<image>", "<video>")
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**_vision_transformer()),
                                  text_config=_text(tok, model_type="qwen2"), image_token_index=image,
                                  video_token_index=video, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_TEMPLATE,
    )
    return _save(out, model, processor)


#: builder per kind; the kind names follow the adapters'.
TINY_VLM_BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2-vl": build_tiny_qwen2_vl,
    "qwen2.5-vl": build_tiny_qwen2_5_vl,
    "internvl": build_tiny_internvl,
    "idefics3": build_tiny_idefics3,
    "gemma3": build_tiny_gemma3,
    "llava-next": build_tiny_llava_next,
    "llava-onevision": build_tiny_llava_onevision,
}


def build_tiny_vlm(kind: str, out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny model of ``kind`` (a key of :data:`TINY_VLM_BUILDERS`) into ``out``."""
    if kind not in TINY_VLM_BUILDERS:
        raise CrvlmError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_VLM_BUILDERS)}")
    return TINY_VLM_BUILDERS[kind](out, tokenizer_dir, seed=seed)
