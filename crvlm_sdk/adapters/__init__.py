"""Backbone adapters: the contract a model family implements (``base``), the chat-template and
vision bases most adapters build on, prompt batching, fingerprints and the registry that picks
an adapter for a model. Built-in adapters live in the top-level ``adapters/`` folder
(``crvlm_adapters``) and register through the same plugin hooks as third-party ones.
"""
