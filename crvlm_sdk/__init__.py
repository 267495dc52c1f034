"""crvlm: configurable refusal for vision-language models by activation steering.

The two lines most applications need::

    steerer = Steerer.from_bundle(model, "bundle/", processor)
    answers = steerer.generate(["What is in this picture?"], images=["cat.png"])

Names are imported on first use (PEP 562), so a plugin that only needs ``hookimpl`` does not
load torch or transformers. Two tiers: :data:`APPLICATION_API` for applications and policy
authors, :data:`PLUGIN_API` for people who write adapters and method components; anything
else is imported from its submodule (see ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crvlm_sdk._version import __version__

#: name -> defining module, for applications
APPLICATION_API: dict[str, str] = {
    "Steerer": "crvlm_sdk.steering.steerer",
    "Bundle": "crvlm_sdk.bundle.artifact",
    "ResponseSpec": "crvlm_sdk.bundle.manifest",
    "load_model": "crvlm_sdk.models.loading",
    "load_processor": "crvlm_sdk.models.processors",
    "Policy": "crvlm_sdk.policy",
    "BuildOptions": "crvlm_sdk.build.options",
    "build_bundle": "crvlm_sdk.build.pipeline",
    "evaluate": "crvlm_sdk.evaluation.evaluate",
    "write_report": "crvlm_sdk.evaluation.report",
    "CrvlmError": "crvlm_sdk.errors",
    "BundleError": "crvlm_sdk.errors",
    "BundleWarning": "crvlm_sdk.bundle.manifest",
    "PolicyError": "crvlm_sdk.errors",
    "ModelLoadError": "crvlm_sdk.errors",
    "AdapterError": "crvlm_sdk.errors",
    "PluginError": "crvlm_sdk.errors",
}

#: name -> defining module, for adapter and component authors
PLUGIN_API: dict[str, str] = {
    "hookimpl": "crvlm_sdk.plugins.hookspecs",
    "BackboneAdapter": "crvlm_sdk.adapters.base",
    "ChatTemplateAdapter": "crvlm_sdk.adapters.chat",
    "VisionChatAdapter": "crvlm_sdk.adapters.vision",
    "adapter_for": "crvlm_sdk.plugins.adapters",
    "Gate": "crvlm_sdk.components",
    "VectorExtractor": "crvlm_sdk.components",
    "VisualAligner": "crvlm_sdk.components",
    "LayerLocator": "crvlm_sdk.components",
    "CandidateEvaluator": "crvlm_sdk.components",
    "RefusalJudge": "crvlm_sdk.components",
    "Sample": "crvlm_sdk.types",
    "ImageInput": "crvlm_sdk.types",
    "PromptBatch": "crvlm_sdk.types",
    "Fingerprint": "crvlm_sdk.types",
    "Candidate": "crvlm_sdk.types",
    "LayerChoice": "crvlm_sdk.types",
    "Verdict": "crvlm_sdk.types",
    "LayerGates": "crvlm_sdk.bundle.gates",
    "Manifest": "crvlm_sdk.bundle.manifest",
    "GateSpec": "crvlm_sdk.bundle.manifest",
    "PolicySummary": "crvlm_sdk.bundle.manifest",
    "capture": "crvlm_sdk.activations.capture",
    "capture_forced": "crvlm_sdk.activations.capture",
    "ActivationStats": "crvlm_sdk.activations.capture",
    "PluginManager": "crvlm_sdk.plugins.manager",
    "get_plugin_manager": "crvlm_sdk.plugins.manager",
}

_WHERE = {**APPLICATION_API, **PLUGIN_API}
__all__ = [
    "ActivationStats",
    "AdapterError",
    "BackboneAdapter",
    "BuildOptions",
    "Bundle",
    "BundleError",
    "BundleWarning",
    "Candidate",
    "CandidateEvaluator",
    "ChatTemplateAdapter",
    "CrvlmError",
    "Fingerprint",
    "Gate",
    "GateSpec",
    "ImageInput",
    "LayerChoice",
    "LayerGates",
    "LayerLocator",
    "Manifest",
    "ModelLoadError",
    "PluginError",
    "PluginManager",
    "Policy",
    "PolicyError",
    "PolicySummary",
    "PromptBatch",
    "RefusalJudge",
    "ResponseSpec",
    "Sample",
    "Steerer",
    "VectorExtractor",
    "Verdict",
    "VisionChatAdapter",
    "VisualAligner",
    "__version__",
    "adapter_for",
    "build_bundle",
    "capture",
    "capture_forced",
    "evaluate",
    "get_plugin_manager",
    "hookimpl",
    "load_model",
    "load_processor",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'crvlm_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from crvlm_sdk.activations.capture import ActivationStats, capture, capture_forced
    from crvlm_sdk.adapters.base import BackboneAdapter
    from crvlm_sdk.adapters.chat import ChatTemplateAdapter
    from crvlm_sdk.adapters.vision import VisionChatAdapter
    from crvlm_sdk.build.options import BuildOptions
    from crvlm_sdk.build.pipeline import build_bundle
    from crvlm_sdk.bundle.artifact import Bundle
    from crvlm_sdk.bundle.gates import LayerGates
    from crvlm_sdk.bundle.manifest import BundleWarning, GateSpec, Manifest, PolicySummary, ResponseSpec
    from crvlm_sdk.components import (
        CandidateEvaluator,
        Gate,
        LayerLocator,
        RefusalJudge,
        VectorExtractor,
        VisualAligner,
    )
    from crvlm_sdk.errors import AdapterError, BundleError, CrvlmError, ModelLoadError, PluginError, PolicyError
    from crvlm_sdk.evaluation.evaluate import evaluate
    from crvlm_sdk.evaluation.report import write_report
    from crvlm_sdk.models.loading import load_model
    from crvlm_sdk.models.processors import load_processor
    from crvlm_sdk.plugins.adapters import adapter_for
    from crvlm_sdk.plugins.hookspecs import hookimpl
    from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager
    from crvlm_sdk.policy import Policy
    from crvlm_sdk.steering.steerer import Steerer
    from crvlm_sdk.types import Candidate, Fingerprint, ImageInput, LayerChoice, PromptBatch, Sample, Verdict
