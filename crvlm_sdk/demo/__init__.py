"""Demos: the SmolLM2 cooking demo, the demo VLM (a frozen SmolLM2 with a small trained vision
side) and the star-picture policies it ships with.
"""
