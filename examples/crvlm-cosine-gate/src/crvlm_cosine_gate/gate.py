"""A gate that fires when the activation points along a learned direction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from crvlm_sdk import Gate


class CosineGate(Gate):
    name: ClassVar[str] = "cosine"

    def __init__(self, direction: torch.Tensor, *, cutoff: float = 0.0, temperature: float = 0.05) -> None:
        self.direction = direction.float()
        self.cutoff = float(cutoff)
        self.temperature = float(temperature)

    @classmethod
    def untrained(cls, hidden_size: int) -> CosineGate:
        return cls(torch.zeros(hidden_size))

    def soften(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        cos = torch.nn.functional.cosine_similarity(h.float(), self.direction.unsqueeze(0), dim=-1)
        return torch.sigmoid((cos - self.cutoff) / self.temperature)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction}

    def config(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "temperature": self.temperature}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> CosineGate:
        return cls(tensors["direction"], cutoff=config.get("cutoff", 0.0), temperature=config.get("temperature", 0.05))

    def fit(self, h_in: torch.Tensor, h_out: torch.Tensor, **options: Any) -> dict[str, float]:
        self.direction = (h_out.float().mean(0) - h_in.float().mean(0))
        cos = lambda h: torch.nn.functional.cosine_similarity(h.float(), self.direction.unsqueeze(0), dim=-1)  # noqa: E731
        self.cutoff = float((cos(h_in).mean() + cos(h_out).mean()) / 2)
        correct = torch.cat([cos(h_in) < self.cutoff, cos(h_out) >= self.cutoff]).float().mean()
        return {"train_accuracy": float(correct)}
