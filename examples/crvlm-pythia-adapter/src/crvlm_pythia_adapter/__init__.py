"""Example crvlm plugin: a backbone adapter for GPT-NeoX / Pythia base models."""

from crvlm_pythia_adapter.adapter import PythiaAdapter

__all__ = ["PythiaAdapter"]
