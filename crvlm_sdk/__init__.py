"""crvlm: configurable refusal for vision-language models by activation steering.

The two lines most applications need::

    steerer = Steerer.from_bundle(model, "bundle/", processor)
    answers = steerer.generate(["What is in this picture?"], images=["cat.png"])
"""

from crvlm_sdk._version import __version__
from crvlm_sdk.backbones import adapter_for
from crvlm_sdk.build import BuildOptions, build_bundle
from crvlm_sdk.bundle import Bundle, BundleWarning, GateSpec, Manifest, PolicySummary
from crvlm_sdk.capture import ActivationStats, capture, capture_forced
from crvlm_sdk.errors import AdapterError, BundleError, CrvlmError, ModelLoadError, PluginError
from crvlm_sdk.evaluate import evaluate, write_report
from crvlm_sdk.gating import LayerGates
from crvlm_sdk.hookspecs import hookimpl
from crvlm_sdk.interfaces import (
    BackboneAdapter,
    Fingerprint,
    Gate,
    LayerChoice,
    LayerLocator,
    PromptBatch,
    RefusalJudge,
    Sample,
    VectorExtractor,
    VisualAligner,
)
from crvlm_sdk.models import load_model
from crvlm_sdk.plugins import PluginManager, get_plugin_manager
from crvlm_sdk.policy import Policy, PolicyError
from crvlm_sdk.processors import load_processor
from crvlm_sdk.prompts import ChatTemplateAdapter
from crvlm_sdk.steerer import Steerer
from crvlm_sdk.vlm_adapter import VisionChatAdapter

__all__ = [
    "ActivationStats",
    "AdapterError",
    "BackboneAdapter",
    "BuildOptions",
    "Bundle",
    "BundleError",
    "BundleWarning",
    "ChatTemplateAdapter",
    "CrvlmError",
    "Fingerprint",
    "Gate",
    "GateSpec",
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
    "Sample",
    "Steerer",
    "VectorExtractor",
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
