"""Built-in gates: a logistic probe (the default), the CR-VLM authors' flow-field gate, and
``always`` (no gate, for ablations)."""

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


class FlowGate(ProbeGate):
    """The CR-VLM authors' flow-field gate: ``x' = x + a·σ(w·z + c)·MLP(z)`` on standardised
    activations ``z``, with ``p = σ(w·z + c)`` as the gate.

    The gate and the flow are trained together. Five losses are used:

    - gate: class-balanced cross-entropy of ``w·z + c``;
    - alignment: an out-of-scope row's shift points along the refusal direction ``d``;
    - reconstruction: the shift reaches ``d``;
    - keep: an in-scope row's shift is zero;
    - orthogonality: the flow field at in-scope rows has no component along ``d``, so a gate
      that leaks does not push in-scope rows toward refusal.

    ``d`` is the difference of the class means. The gate's ``fit`` sees activations only, not the
    bundle's vectors. The authors' released code rescales the shift to a fixed norm at
    inference, and that cancels ``σ(w·z + c)``: every input is steered equally. Here ``p`` is
    read as the gate, calibrated and softened exactly like the probe's. The flow's own shift
    (:meth:`shift`) is kept unnormalised and saved for study; crvlm steers with the bundle's
    vectors scaled by ``p``.
    """

    name: ClassVar[str] = "flow"
    #: hidden width of the flow field's MLP
    WIDTH: ClassVar[int] = 64

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 flow: Mapping[str, torch.Tensor] | None = None, **settings: Any) -> None:
        super().__init__(weight, bias, mean, std, **settings)
        hidden = weight.shape[0]
        self.flow = dict(flow) if flow is not None else {
            "flow_in": torch.zeros(self.WIDTH, hidden), "flow_in_bias": torch.zeros(self.WIDTH),
            "flow_out": torch.zeros(hidden, self.WIDTH), "flow_out_bias": torch.zeros(hidden),
            "flow_scale": torch.ones(())}

    FLOW_KEYS: ClassVar[tuple[str, ...]] = ("flow_in", "flow_in_bias", "flow_out", "flow_out_bias", "flow_scale")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), **self.flow}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FlowGate:
        probe = ProbeGate.from_tensors(tensors, config)
        missing = sorted(set(cls.FLOW_KEYS) - set(tensors))
        if missing:
            raise CrvlmError(f"flow gate tensors {missing} are missing")
        flow = {k: tensors[k] for k in cls.FLOW_KEYS}
        hidden, width = probe.weight.shape[0], flow["flow_in"].shape[0]
        expected = {"flow_in": (width, hidden), "flow_in_bias": (width,), "flow_out": (hidden, width),
                    "flow_out_bias": (hidden,), "flow_scale": ()}
        wrong = [k for k, shape in expected.items() if tuple(flow[k].shape) != shape]
        if wrong:
            raise CrvlmError(f"flow gate tensors {wrong} have the wrong shape for {hidden} features "
                             f"(flow_in is {tuple(flow['flow_in'].shape)})")
        return cls(probe.weight, probe.bias, probe.mean, probe.std, flow,
                   threshold=probe.threshold, temperature=probe.temperature)

    def field(self, z: torch.Tensor) -> torch.Tensor:
        """The flow field ``MLP(z)`` in standardised units."""
        return flow_field(z, self.flow)

    def shift(self, h: torch.Tensor) -> torch.Tensor:
        """The flow's displacement ``a·σ(w·z + c)·MLP(z)`` of ``(B, H)`` activations, in their
        own units and unnormalised (the gate is not cancelled)."""
        z = (h.float() - self.mean) / self.std
        gate = torch.sigmoid(z @ self.weight + self.bias)
        return self.flow["flow_scale"] * gate[:, None] * self.field(z) * self.std

    def fit(self, h_in: torch.Tensor, h_out: torch.Tensor, *, l2: float = 1e-2, steps: int = 300,
            lr: float = 1e-2, align: float = 1.0, reconstruct: float = 1.0, keep: float = 1.0,
            orthogonal: float = 1.0, **options: Any) -> dict[str, float]:
        """Adam on the five losses (full batch, weights in the class docstring), fixed seed."""
        if len(h_in) == 0 or len(h_out) == 0:
            raise CrvlmError("flow gate needs both in-scope and out-of-scope activations")
        x = torch.cat([h_in, h_out]).float()
        y = torch.cat([torch.zeros(len(h_in)), torch.ones(len(h_out))])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        out = y.bool()
        d = z[out].mean(0) - z[~out].mean(0)
        d_norm2 = (d * d).sum().clamp_min(1e-12)
        d_unit = d / d_norm2.sqrt()
        hidden, width = z.shape[1], self.WIDTH
        g = torch.Generator().manual_seed(0)
        params = {
            "w": torch.zeros(hidden), "c": torch.zeros(()),
            "flow_in": torch.randn(width, hidden, generator=g) / hidden**0.5, "flow_in_bias": torch.zeros(width),
            "flow_out": torch.randn(hidden, width, generator=g) * 0.01, "flow_out_bias": torch.zeros(hidden),
            "flow_scale": torch.ones(()),
        }
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list(params.values()), lr=lr)
        pos_weight = torch.tensor(len(h_in) / len(h_out))
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                logit = z @ params["w"] + params["c"]
                field = flow_field(z, params)
                moved = params["flow_scale"] * torch.sigmoid(logit)[:, None] * field
                losses = {
                    "gate": torch.nn.functional.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight),
                    "align": (1 - torch.nn.functional.cosine_similarity(moved[out], d[None], dim=1)).mean(),
                    "reconstruct": ((moved[out] - d) ** 2).sum(1).mean() / d_norm2,
                    "keep": (moved[~out] ** 2).sum(1).mean() / d_norm2,
                    "orthogonal": ((field[~out] @ d_unit) ** 2).mean() / d_norm2,
                }
                loss = (losses["gate"] + align * losses["align"] + reconstruct * losses["reconstruct"]
                        + keep * losses["keep"] + orthogonal * losses["orthogonal"] + l2 * (params["w"] ** 2).sum())
                loss.backward()
                opt.step()
        self.weight, self.bias = params["w"].detach().clone(), params["c"].detach().clone()
        self.mean, self.std = mean, std
        self.flow = {k: params[k].detach().clone() for k in self.FLOW_KEYS}
        self.threshold = 0.0
        pred = (self.logits(x) > 0).float()
        return {"train_accuracy": float((pred == y).float().mean()),
                **{f"loss_{k}": float(v.detach()) for k, v in losses.items()}}


def flow_field(z: torch.Tensor, flow: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``MLP(z)`` of a flow gate's tensors (``flow_in``, ``flow_out`` and their biases): the same
    code trains the field and reads it back."""
    hidden = torch.nn.functional.gelu(z @ flow["flow_in"].T + flow["flow_in_bias"])
    return hidden @ flow["flow_out"].T + flow["flow_out_bias"]
