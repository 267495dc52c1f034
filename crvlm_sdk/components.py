"""The method's extension points, as small abstract classes: gate, vector extractor, visual
aligner, layer locator and refusal judge.

Built-in components (``crvlm_plugins``) and third-party plugins implement these and register
them by name through the pluggy hooks in :mod:`crvlm_sdk.plugins.hookspecs`. Everything the
pipeline needs from a component is a method here, so a plugin never reaches into crvlm
internals. Backbone adapters have their own contract, :mod:`crvlm_sdk.adapters.base`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.errors import PluginError
from crvlm_sdk.types import Candidate, LayerChoice, Sample, Verdict


class Gate(ABC):
    """Per-input probability ``p(x)`` that ``x`` is out of scope, from ``h_g`` at one token.

    :meth:`score` runs inside a forward hook, possibly under ``torch.compile`` and CUDA graphs,
    so it must be pure tensor code: no ``.item()``, no Python branches on tensor values.
    """

    name: ClassVar[str]

    @abstractmethod
    def score(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` activations -> ``(B,)`` float32 probabilities in ``[0, 1]``."""

    def log_odds(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` -> ``(B,)`` float32 ``log(p / (1 - p))``.

        A gate read at several layers averages its members' log-odds; gates that know their
        logits exactly should return them (the default inverts :meth:`score`, which saturates).
        """
        return torch.logit(self.score(h).float(), eps=1e-6)

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned parameters, saved in the bundle's safetensors file as ``gate.<name>``
        (``gate.<layer>.<name>`` when the bundle reads its gate at several layers)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings (threshold, temperature...), saved in the manifest."""
        return {}

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Gate:
        """Rebuild the gate from :meth:`tensors` and :meth:`config`."""

    @classmethod
    def untrained(cls, hidden_size: int) -> Gate:
        """A gate ready for :meth:`fit` on ``hidden_size`` features (default: ``cls()``)."""
        try:
            return cls()
        except TypeError as exc:
            raise PluginError(f"gate {cls.name!r} needs constructor arguments ({exc})",
                              hint="give the gate class an `untrained(hidden_size)` classmethod") from None

    def fit(self, h_in: torch.Tensor, h_out: torch.Tensor, **options: Any) -> dict[str, float]:
        """Train on in-scope (label 0) and out-of-scope (label 1) activations; returns metrics."""
        raise NotImplementedError(f"gate {self.name!r} cannot be fitted")

    def calibrate(self, h_in_val: torch.Tensor, target_over_refusal: float = 0.02) -> float | None:
        """Move the decision threshold so held-out in-scope rows pass it at about the target rate.

        Gates without a threshold keep the default, which changes nothing and returns None.
        """
        return None

    def calibrate_log_odds(self, log_odds_in: torch.Tensor, target_over_refusal: float = 0.02) -> float | None:
        """Like :meth:`calibrate`, from the fresh (uncalibrated) log-odds of held-out in-scope rows,
        which may come from other fits of this gate (out-of-fold scores); returns the threshold
        in log-odds units. The default (None) means the gate cannot, and the build calibrates it
        on validation activations instead.
        """
        return None

    def soften(self, temperature: float) -> None:
        """Set how sharply ``p`` goes from 0 to 1 around the threshold (for steering at runtime).

        Build pipelines call it after calibration; gates without a temperature ignore it.
        """
        return None

    def to(self, device: torch.device | str) -> Gate:
        """Move parameters to ``device`` (kept float32: gate maths is cheap and precision matters)."""
        params = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors().items()}
        return type(self).from_tensors(params, self.config())


class VectorExtractor(ABC):
    """Turns example data into one steering vector per layer."""

    name: ClassVar[str]

    @abstractmethod
    def extract(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        layers: Sequence[int],
        **options: Any,
    ) -> dict[int, torch.Tensor]:
        """Steering vectors ``{layer: (H,) float32}`` for ``layers``."""


class VisualAligner(ABC):
    """Makes the image alone able to trigger refusal (counterfactual visual alignment)."""

    name: ClassVar[str]

    @abstractmethod
    def align(
        self,
        adapter: BackboneAdapter,
        in_scope: Sequence[Sample],
        out_of_scope: Sequence[Sample],
        vectors: dict[int, torch.Tensor],
        **options: Any,
    ) -> dict[str, Any]:
        """Return image-driven components (vectors, extra gate rows) as a dict of results.

        ``options["layers"]``, when given, are the layers results are needed at: the steering
        candidates and every gate layer (``vectors`` holds only the former).
        ``options["gate_position"]`` is where the build's gate reads (a capture position): extra
        gate rows (``"gate_in"``/``"gate_out"``) must be read there, or the build refuses them.
        """


class CandidateEvaluator(ABC):
    """Scores candidates on validation data for a locator (supplied by the build pipeline).

    ``evaluate.many(candidates)`` scores several at once (the build runs them in one batched
    ``generate``, so asking for many together is much cheaper than one by one); calling
    ``evaluate(band, strength)`` scores one candidate with the build's other settings.
    Each result holds ``srs`` (clean refusals), ``srs_keyword``, ``brs``, ``mb`` and ``alpha``.
    """

    defaults: Candidate

    @abstractmethod
    def many(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        """One score dict per candidate, in order."""

    def __call__(self, band: Sequence[int], strength: float) -> dict[str, Any]:
        base = self.defaults
        candidate = Candidate(tuple(band), float(strength), base.operator, base.decode_steps, base.response)
        return self.many([candidate])[0]


class LayerLocator(ABC):
    """Chooses gate layer, steering band and strength."""

    name: ClassVar[str]

    @abstractmethod
    def locate(self, num_layers: int, evaluate: Any, **options: Any) -> LayerChoice:
        """Pick a :class:`LayerChoice`; ``evaluate`` is a :class:`CandidateEvaluator`."""

    def candidate_layers(self, num_layers: int, **options: Any) -> list[int] | None:
        """Every layer ``locate`` may put in a band, given the same options; None: any layer.

        The build extracts vectors only there, and each capture pass stops after the deepest
        one (a sweep over early-middle layers needs less than half the model). The default
        keeps every layer, so a locator that does not say is never starved.
        """
        return None


class RefusalJudge(ABC):
    """Decides whether a generated answer is a refusal.

    ``context`` carries what the evaluator knows besides the text, per answer or per batch:
    ``ended`` (list of bool: the answer stopped before the token limit), ``first_logits``
    ((N, V) logits of the first generated token) and ``tokenizer``. A judge uses what it needs
    and ignores the rest.
    """

    name: ClassVar[str]
    #: whether the evaluator must keep first-token logits for this judge (they are large)
    needs_first_logits: ClassVar[bool] = False

    @abstractmethod
    def judge(self, answers: Sequence[str], **context: Any) -> list[bool]:
        """One verdict per answer: ``True`` means refused."""

    def assess(self, answers: Sequence[str], **context: Any) -> list[Verdict]:
        """Richer verdicts; a judge that only says refused or not counts every refusal as clean."""
        return [Verdict(declines=v, clean=v) for v in self.judge(answers, **context)]
