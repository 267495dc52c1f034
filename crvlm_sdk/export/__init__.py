"""Bundles written for other inference engines (llama.cpp control vectors)."""
