"""A tiny random GPT-NeoX model for tests: built from its config class, saved, no download."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_pythia(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """Two Pythia-shaped layers (parallel residual, partial rotary), 64 wide, saved to ``out``."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
