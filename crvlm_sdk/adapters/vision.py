"""Base for adapters of vision-language models prompted through their processor's chat template.

Every built-in VLM adapter is this class plus the dotted path to the language decoder layers
and the model classes it claims; a third-party adapter for another HF-style VLM usually is too.
What it adds to :class:`~crvlm_sdk.adapters.chat.ChatTemplateAdapter`:

- messages in the content-list form VLM templates expect (``{"type": "image"}`` items before
  the text, as the public checkpoints' examples place them), several images per prompt;
- a system message the template cannot take (some raise, some drop it silently) is folded
  into the user turn instead of being lost, so the refusal instruction always reaches the model;
- the processor is checked on construction: a bare tokenizer (what ``AutoProcessor`` falls
  back to when the video stack is missing) is refused with a hint instead of failing later;
- inputs a model needs beside ``input_ids`` and that a processor may omit (Qwen2-VL's
  ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) are derived from the image placeholder
  ids, so positions stay right whatever processor version produced the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.adapters.batching import row_images
from crvlm_sdk.adapters.chat import ChatTemplateAdapter
from crvlm_sdk.errors import AdapterError
from crvlm_sdk.types import ImageInput


class VisionChatAdapter(ChatTemplateAdapter):
    """A VLM whose processor renders chat messages and expands image placeholders."""

    supports_images: ClassVar[bool] = True
    #: most images one prompt may carry (1 for models trained on single images)
    max_images: ClassVar[int] = 8
    #: put image items before the question text, as the model cards' examples do
    image_first: ClassVar[bool] = True
    #: derived token-type inputs this model needs: input name -> value on image tokens
    token_type_inputs: ClassVar[dict[str, int]] = {}

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        if not hasattr(processor, "image_processor") or not callable(processor):
            raise AdapterError(
                f"adapter {self.name!r} needs {type(model).__name__}'s processor (tokenizer + image processor), "
                f"got {type(processor).__name__}",
                hint="load it with crvlm_sdk.models.processors.load_processor(model_dir) (no torchvision needed) "
                "or AutoProcessor",
            )

    # -- prompt text ----------------------------------------------------------------------
    def messages(
        self, question: str, *, has_image: bool, system: str | None, num_images: int | None = None
    ) -> list[dict[str, Any]]:
        count = num_images if num_images is not None else int(has_image)
        out: list[dict[str, Any]] = []
        if system:
            out.append({"role": "system", "content": [{"type": "text", "text": system}]})
        images: list[dict[str, Any]] = [{"type": "image"} for _ in range(count)]
        text: list[dict[str, Any]] = [{"type": "text", "text": question}]
        out.append({"role": "user", "content": images + text if self.image_first else text + images})
        return out

    def render_prompt(
        self, question: str, *, has_image: bool, system: str | None, num_images: int | None = None
    ) -> str:
        import jinja2

        def render(q: str, sys_msg: str | None) -> str:
            msgs = self.messages(q, has_image=has_image, system=sys_msg, num_images=num_images)
            return self._template_owner().apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        try:
            text = render(question, system)
        except jinja2.TemplateError:
            if not system:
                raise
            text = None
        if system and (text is None or system.strip() not in text):
            # The template has no system turn: keep the instruction, in the user turn.
            text = render(f"{system}\n\n{question}", None)
        return text

    def _template_owner(self) -> Any:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise AdapterError(
                f"{type(self.processor).__name__} has no chat template",
                hint="set processor.chat_template to the model's template (crvlm prompts every model through it)",
            )
        return owner

    # -- encoding -------------------------------------------------------------------------
    def processor_images(self, images: list[Any]) -> Any:
        """How one row's images are handed to the processor (nested per sample by default)."""
        return [images]

    def encode_row(self, text: str, image: ImageInput | Sequence[ImageInput] | None) -> dict[str, torch.Tensor]:
        images = row_images(image)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt",
                                  "add_special_tokens": self._add_special_tokens(text)}
        if images:
            kwargs["images"] = self.processor_images(images)
        enc = {k: v for k, v in dict(self.processor(**kwargs)).items() if isinstance(v, torch.Tensor)}
        image_id = self.image_token_id
        for key, value in self.token_type_inputs.items():
            if key not in enc and image_id is not None:
                enc[key] = (enc["input_ids"] == image_id).to(torch.long) * value
        return enc
