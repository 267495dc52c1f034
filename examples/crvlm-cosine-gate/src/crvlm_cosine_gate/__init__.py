"""Example crvlm plugin: a cosine-similarity gate."""

from crvlm_cosine_gate.gate import CosineGate

__all__ = ["CosineGate"]
