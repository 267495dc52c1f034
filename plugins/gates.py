"""Built-in gates: a logistic probe (the default) and ``always`` (no gate, for ablations)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from crvlm_sdk.components import Gate
from crvlm_sdk.errors import CrvlmError


class AlwaysGate(Gate):
    """``p = 1`` for every input: steering applies unconditionally."""

    name: ClassVar[str] = "always"

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return torch.ones(h.shape[0], dtype=torch.float32, device=h.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> AlwaysGate:
        return cls()

    def fit(self, h_in: torch.Tensor, h_out: torch.Tensor, **options: Any) -> dict[str, float]:
        return {}


class ProbeGate(Gate):
    """Logistic probe on standardised activations: ``p = σ((w·z + b − θ) / T)``, ``z = (h − μ)/σ``.

    ``θ`` (threshold, in logit units) is calibrated on held-out in-scope data so that at most a
    target fraction of it scores above 0.5; ``T`` softens the gate (``T → 0`` is a hard gate).
    """

    name: ClassVar[str] = "probe"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        threshold: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise CrvlmError(f"probe gate temperature must be > 0, got {temperature}")
        self.weight, self.bias, self.mean, self.std = weight, bias.reshape(()), mean, std
        self.threshold = float(threshold)
        self.temperature = float(temperature)

    @classmethod
    def untrained(cls, hidden_size: int) -> ProbeGate:
        zeros = torch.zeros(hidden_size)
        return cls(zeros, torch.zeros(()), zeros.clone(), torch.ones(hidden_size))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = (h.float() - self.mean) / self.std
        return z @ self.weight + self.bias

    def log_odds(self, h: torch.Tensor) -> torch.Tensor:
        return (self.logits(h) - self.threshold) / self.temperature

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_odds(h))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "temperature": self.temperature}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> ProbeGate:
        """Rebuild a saved probe, refusing what would give NaN or a shape error at run time."""
        settings = {}
        for key, default in (("threshold", 0.0), ("temperature", 1.0)):
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CrvlmError(f"gate config `{key}` must be a finite number, got {value!r}")
            settings[key] = float(value)
        missing = sorted({"weight", "bias", "mean", "std"} - set(tensors))
        if missing:
            raise CrvlmError(f"probe gate tensors {missing} are missing")
        weight, bias, mean, std = (tensors[k] for k in ("weight", "bias", "mean", "std"))
        if weight.dim() != 1 or mean.shape != weight.shape or std.shape != weight.shape or bias.numel() != 1:
            raise CrvlmError(f"probe gate tensors have shapes weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                             f"mean {tuple(mean.shape)}, std {tuple(std.shape)}; expected (F,), (), (F,), (F,)")
        if not bool((std > 0).all()):
            raise CrvlmError("probe gate tensor `std` has entries <= 0 (features would be divided by zero)")
        return cls(weight, bias, mean, std, **settings)

    def fit(
        self,
        h_in: torch.Tensor,
        h_out: torch.Tensor,
        *,
        l2: float = 1e-2,
        max_iter: int = 200,
        **options: Any,
    ) -> dict[str, float]:
        """L2-regularised logistic regression (LBFGS, full batch) on standardised features."""
        if len(h_in) == 0 or len(h_out) == 0:
            raise CrvlmError("probe gate needs both in-scope and out-of-scope activations")
        x = torch.cat([h_in, h_out]).double()
        y = torch.cat([torch.zeros(len(h_in)), torch.ones(len(h_out))]).double()
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        # Balance classes so an uneven data set does not shift the decision boundary.
        pos_weight = len(h_in) / len(h_out)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z @ w + b, y, pos_weight=torch.tensor(pos_weight, dtype=torch.float64)
            ) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach().float(), b.detach().float()
        self.mean, self.std = mean.float(), std.float()
        self.threshold = 0.0
        pred = (self.logits(torch.cat([h_in, h_out]).float()) > 0).double()
        return {"train_accuracy": float((pred == y).double().mean())}

    def soften(self, temperature: float) -> None:
        if temperature <= 0:
            raise CrvlmError(f"probe gate temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def calibrate(self, h_in_val: torch.Tensor, target_over_refusal: float = 0.02) -> float:
        """Set the threshold so that about ``target_over_refusal`` of in-scope inputs pass it.

        The in-scope logits are modelled as a normal distribution and the threshold put at its
        ``1 − target`` quantile: with a few dozen validation questions an empirical 2% quantile
        is just the single largest logit, which one odd question would decide. The threshold
        never goes below 0 (the probe's own decision boundary).
        """
        self.threshold = normal_threshold(self.logits(h_in_val.float()), target_over_refusal)
        return self.threshold

    def calibrate_log_odds(self, log_odds_in: torch.Tensor, target_over_refusal: float = 0.02) -> float:
        """A fresh probe's log-odds are its logits (threshold 0, temperature 1)."""
        self.threshold = normal_threshold(log_odds_in, target_over_refusal)
        return self.threshold


def normal_threshold(in_scope_logits: torch.Tensor, target_over_refusal: float) -> float:
    """The ``1 − target`` quantile of a normal fitted to in-scope logits, never below 0 (see
    :meth:`ProbeGate.calibrate`); studies apply it to out-of-fold logits as well."""
    logits = in_scope_logits.double()
    if len(logits) < 2:
        raise CrvlmError("gate calibration needs at least 2 in-scope validation rows")
    z = float(torch.special.ndtri(torch.tensor(1.0 - target_over_refusal, dtype=torch.float64)))
    return max(0.0, float(logits.mean() + z * logits.std()))
