"""The base most adapters build on: prompting through the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.adapters.batching import text_config
from crvlm_sdk.errors import AdapterError


class ChatTemplateAdapter(BackboneAdapter):
    """Base for adapters that prompt through a tokenizer's or processor's chat template.

    Subclasses set ``layers_path`` (dotted attribute path from the model to the decoder
    ``ModuleList``) and, for VLMs, ``supports_images = True``; the layout is checked on
    construction so a mismatched model fails with what was expected and what was found.
    """

    layers_path: ClassVar[str]

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self._layers = self._resolve_layers()

    # -- layout ---------------------------------------------------------------------------
    def _resolve_layers(self) -> torch.nn.ModuleList:
        obj: Any = self.model
        walked = type(self.model).__name__
        for part in self.layers_path.split("."):
            if not hasattr(obj, part):
                children = ", ".join(name for name, _ in obj.named_children()) or "none"
                raise AdapterError(
                    f"adapter {self.name!r} expected {type(self.model).__name__}.{self.layers_path}, "
                    f"but {walked} has no {part!r} (children: {children})",
                    hint="pick another adapter with --adapter, or write one (see crvlm_sdk.testing)",
                )
            obj = getattr(obj, part)
            walked += f".{part}"
        expected = int(text_config(self.model).num_hidden_layers)
        if not isinstance(obj, torch.nn.ModuleList) or len(obj) != expected:
            found = f"{type(obj).__name__} of length {len(obj)}" if hasattr(obj, "__len__") else type(obj).__name__
            raise AdapterError(
                f"adapter {self.name!r} expected {walked} to be a ModuleList of {expected} decoder layers "
                f"(text config num_hidden_layers), found {found}"
            )
        return obj

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self._layers

    # -- text -----------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise AdapterError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        return int(pad)

    def messages(self, question: str, *, has_image: bool, system: str | None) -> list[dict[str, Any]]:
        """Chat messages for one prompt; VLM adapters override to place the image."""
        out: list[dict[str, Any]] = []
        if system:
            out.append({"role": "system", "content": system})
        out.append({"role": "user", "content": question})
        return out

    def render_prompt(self, question: str, *, has_image: bool, system: str | None,
                      num_images: int | None = None) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise AdapterError(
                f"{type(owner).__name__} has no chat template",
                hint="set processor.chat_template (crvlm prompts every model through its chat template)",
            )
        msgs = self.messages(question, has_image=has_image, system=system)
        return owner.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _add_special_tokens(self, text: str) -> bool:
        # Chat templates usually write BOS themselves; adding it again shifts every position.
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and text.startswith(bos))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
