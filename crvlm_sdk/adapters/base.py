"""The contract between crvlm and one family of models.

Adapters implement the few abstract methods; batching, forced prefixes, left padding and
fingerprints are done once, here and in :mod:`crvlm_sdk.adapters.batching`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.adapters.batching import SEQUENCE_KEYS, build_prompt_batch, question_opener, text_config
from crvlm_sdk.adapters.fingerprint import fingerprint_model
from crvlm_sdk.types import Fingerprint, ImageInput, PromptBatch


class BackboneAdapter(ABC):
    """Knows one family of models: where its language decoder layers are and how it prompts.

    One adapter instance serves extraction, gating, generation and evaluation, so every stage
    sees byte-identical prompts. Implementations live in :mod:`crvlm_adapters` or in plugins;
    most only need :meth:`decoder_layers`, :meth:`render_prompt` and :meth:`encode_row` — the
    base class does batching, forced prefixes, left padding, positions and fingerprints.
    """

    name: ClassVar[str]
    #: transformers class names this adapter claims; shown by ``crvlm plugins``.
    model_classes: ClassVar[tuple[str, ...]] = ()
    supports_images: ClassVar[bool] = False
    #: most images one prompt may carry. Adapters that allow more than one also accept
    #: ``num_images=`` in :meth:`render_prompt` and a list of images in :meth:`encode_row`.
    max_images: ClassVar[int] = 1
    #: inputs that run along the token dimension: left-padded, extended by forced prefixes and
    #: cut where a shared prompt prefix is run once
    sequence_keys: ClassVar[tuple[str, ...]] = SEQUENCE_KEYS

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter claims ``model``; the default matches by class name."""
        return type(model).__name__ in cls.model_classes

    @abstractmethod
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers, in order (never the vision tower's)."""

    @abstractmethod
    def render_prompt(self, question: str, *, has_image: bool, system: str | None,
                      num_images: int | None = None) -> str:
        """The chat-template text of one prompt, ending with the assistant header.

        ``num_images`` is given only for a prompt with several images (adapters whose
        ``max_images`` is above 1); ``has_image`` covers the usual none-or-one case.
        """

    @abstractmethod
    def encode_row(self, text: str, image: ImageInput | None) -> dict[str, torch.Tensor]:
        """Model inputs for one rendered prompt, batch dimension 1, no padding."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a bare string (no special tokens), used for forced prefixes."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens removed."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """Id used for left padding."""

    # Implemented once here; adapters override only when their model is unusual.
    def build_prompts(
        self,
        questions: Sequence[str],
        images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        *,
        system: str | Sequence[str | None] | None = None,
        forced_prefix: str | None = None,
    ) -> PromptBatch:
        """One left-padded batch; each question has no image, one, or a list of up to ``max_images``."""
        return build_prompt_batch(self, questions, images, system=system, forced_prefix=forced_prefix)

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (judges get it to read first-token logits)."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token_id(self) -> int | None:
        """The placeholder token a processor repeats once per image feature (None: none)."""
        config = self.model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        return None

    def image_token_ids(self) -> set[int]:
        """Every token id that stands for image content (image, video, vision-start markers).

        A prompt prefix shared across rows is run once only up to the first of these: the
        placeholders are equal across rows, the pictures they carry are not.
        """
        ids: set[int] = set()
        configs = [self.model.config, getattr(self.model.config, "text_config", None)]
        for config in filter(None, configs):
            for name, value in vars(config).items():
                if isinstance(value, int) and any(w in name for w in ("image", "video", "vision", "boi")) and \
                        name.endswith(("_token_id", "_token_index")):
                    ids.add(value)
        if self.image_token_id is not None:
            ids.add(self.image_token_id)
        return ids

    def question_opener(self) -> tuple[int, ...]:
        """Token ids that open the user's turn (see :func:`batching.question_opener`); cached."""
        cached = self.__dict__.get("_question_opener")
        if cached is None:
            cached = self.__dict__["_question_opener"] = question_opener(self)
        return cached

    @property
    def hidden_size(self) -> int:
        return int(text_config(self.model).hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def fingerprint(self) -> Fingerprint:
        return fingerprint_model(self)
