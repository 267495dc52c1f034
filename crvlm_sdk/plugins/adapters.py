"""Choosing the backbone adapter for a model."""

from __future__ import annotations

from typing import Any

import torch

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.errors import AdapterError
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager


def adapter_for(
    model: torch.nn.Module,
    processor: Any,
    name: str | None = None,
    *,
    plugins: PluginManager | None = None,
) -> BackboneAdapter:
    """The adapter named ``name``, or the first installed adapter that claims ``model``.

    Built-ins are asked first (in registration order), then plugins, so installing a plugin
    never silently changes how a supported model is handled; pass ``name`` to override.
    """
    manager = plugins or get_plugin_manager()
    if name is not None:
        return manager.get("adapter", name)(model, processor)
    components = manager.components("adapter")
    for component in components.values():
        if component.cls.matches(model):
            return component.cls(model, processor)
    installed = ", ".join(f"{c.name} ({', '.join(c.cls.model_classes) or 'custom match'})" for c in components.values())
    raise AdapterError(
        f"no adapter claims {type(model).__name__}; installed adapters: {installed}",
        hint="pass adapter=NAME (--adapter NAME) to force one, or install an adapter plugin",
    )
