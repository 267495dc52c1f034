"""Loading a VLM's processor when the optional video stack is not installed.

transformers builds the Qwen2-VL, Qwen2.5-VL, InternVL and LLaVA-OneVision processors with a
video processor, and every video processor needs torchvision. Without torchvision,
``AutoProcessor`` raises while resolving the video processor (or, for a directory without
``config.json``, silently returns the bare tokenizer), although crvlm never sends videos.
:func:`image_only_processor_class` derives from the model's own processor class one that takes
no video processor; everything that matters to crvlm — the image processor (transformers falls
back to its Pillow implementation), the image-token expansion and the chat template — is still
the model's own code. The derived class keeps the original name, so a processor saved from it
is written as the original class and loads with ``AutoProcessor`` wherever torchvision exists.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

from crvlm_sdk.errors import ModelLoadError


def takes_video_processor(processor_class: type) -> bool:
    """Whether ``processor_class`` cannot be built without a video processor."""
    return "video_processor" in inspect.signature(processor_class.__init__).parameters


@functools.cache
def image_only_processor_class(processor_class: type) -> type:
    """``processor_class`` without its video processor (the class itself if it has none).

    transformers derives a processor's sub-processors from its ``__init__`` signature and the
    settings it accepts from the code object's argument names (``from_args_and_dict``), so the
    subclass needs a real ``__init__`` with the base's named parameters minus
    ``video_processor`` — generated here from the base signature — and the base ``__init__``
    still runs, with ``video_processor=None``.
    """
    if not takes_video_processor(processor_class):
        return processor_class
    base_init = processor_class.__init__
    named = [
        p for p in inspect.signature(base_init).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name not in ("self", "video_processor")
    ]
    defaults = {p.name: p.default for p in named}
    header = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}=_defaults[{p.name!r}]"
                       for p in named)
    passed = ", ".join(f"{p.name}={p.name}" for p in named)
    source = (
        f"def __init__(self, {header}, **kwargs):\n"
        "    kwargs.pop('video_processor', None)  # a config saved with torchvision may name one\n"
        f"    _base_init(self, {passed}, video_processor=None, **kwargs)\n"
    )
    namespace: dict[str, Any] = {"_defaults": defaults, "_base_init": base_init}
    exec(compile(source, f"<crvlm image-only {processor_class.__name__}>", "exec"), namespace)
    __init__ = namespace["__init__"]

    derived = type(
        processor_class.__name__,
        (processor_class,),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"{processor_class.__name__} without videos."},
    )
    derived.crvlm_image_only = True
    return derived


def declared_processor_class(path: Path, model_type: str | None) -> type | None:
    """The processor class a model directory declares, or the one transformers maps its type to."""
    import transformers
    from transformers.models.auto import processing_auto

    name = None
    config_file = path / "processor_config.json"
    if config_file.is_file():
        try:
            name = json.loads(config_file.read_text()).get("processor_class")
        except (json.JSONDecodeError, AttributeError):
            name = None
    if name is None and model_type is not None:
        name = processing_auto.PROCESSOR_MAPPING_NAMES.get(model_type)
    if not name:
        return None
    cls = processing_auto.processor_class_from_name(name) or getattr(transformers, name, None)
    return cls if isinstance(cls, type) else None


def load_processor(path: str | Path, model_type: str | None = None) -> Any:
    """The VLM processor saved in ``path``: ``AutoProcessor``, or its image-only form without torchvision."""
    import transformers

    path = Path(path)
    error: Exception | None = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        processor, error = None, exc
    if processor is not None and hasattr(processor, "image_processor"):
        return processor
    cls = declared_processor_class(path, model_type)
    if cls is None or not takes_video_processor(cls):
        if processor is not None:
            return processor
        raise ModelLoadError(f"cannot load the processor in {path}: {str(error).splitlines()[0]}") from error
    try:
        return image_only_processor_class(cls).from_pretrained(path)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        raise ModelLoadError(
            f"cannot load {cls.__name__} from {path}: {str(exc).splitlines()[0]}",
            hint="install torchvision to load the full processor with AutoProcessor",
        ) from exc
