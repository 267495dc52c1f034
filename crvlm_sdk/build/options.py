"""Everything a build can be told, with the defaults that are the best recipe crvlm knows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from crvlm_sdk.bundle.manifest import GATE_FEATURES, Operator, ResponseMode
from crvlm_sdk.errors import CrvlmError

#: What won on validation across the example policies (examples/policies/RESULTS.md):
#: refusal-vs-compliance contrast averaged over the forced tokens.
DEFAULT_EXTRACTOR_OPTIONS = {"contrast": "compliant", "read": "mean"}


@dataclass
class BuildOptions:
    extractor: str = "teacher-forced"
    extractor_options: dict[str, Any] = field(default_factory=dict)
    gate: str = "probe"
    gate_layers: Sequence[int] | None = None
    #: read the gate at every layer tied best on validation (log-odds averaged); False: the first of them
    gate_ensemble: bool = True
    target_over_refusal: float = 0.02
    gate_temperature: float = 0.1
    #: what the gate reads at each layer: "last" (the last prompt token) or "last+question"
    #: (that and the mean over the question's tokens)
    gate_features: str = "last"
    #: passed to the gate's ``fit`` (the probe takes ``l2``)
    gate_options: dict[str, Any] = field(default_factory=dict)
    #: what chooses the gate's layers and threshold: "validation" (the validation split), or
    #: "out-of-fold" (5-fold out-of-fold training scores together with the validation split:
    #: 200 + 200 rows instead of 40 + 40; needs a gate with ``calibrate_log_odds``)
    gate_selection: str = "validation"
    locator: str = "sweep"
    locator_options: dict[str, Any] = field(default_factory=dict)
    aligner: str | None = "counterfactual"
    judge: str = "strict"
    #: additive or rotation; None: the sweep tries both (the fixed locator then uses rotation)
    operator: str | None = None
    #: steer the prompt and this many generated tokens; None: every token; "auto": the sweep
    #: tries a few around 8 (the fixed locator uses 8)
    decode_steps: int | str | None = "auto"
    #: forced at the start of refused answers; None: the policy's ``refusal_opening``; "": none
    opening: str | None = None
    #: end refused answers after this many sentences; None: never; "auto": from 1, the sweep may add one
    stop_sentences: int | str | None = "auto"
    #: "steer", "template", or "auto" (the sweep may choose the template answer)
    mode: str = "auto"
    #: gate score at which a row counts as refused (forced opening, stop, template)
    threshold: float = 0.5
    #: over-refusal rate above which the sweep discards a candidate (unless all are above it)
    brs_ceiling: float = 0.05
    batch_size: int = 8
    #: rows per batched ``generate`` when candidates are scored
    generate_batch_size: int = 48
    max_samples: int | None = None
    seed: int | None = None
    #: new tokens for candidates that end refused rows (a one-sentence refusal not ended by then runs on)
    sweep_new_tokens: int = 32
    #: new tokens for candidates that let refused rows run (as ``crvlm eval`` generates)
    validation_new_tokens: int = 48


def check_options(opts: BuildOptions) -> None:
    operators = get_args(Operator)
    if opts.operator is not None and opts.operator not in operators:
        raise CrvlmError(f"unknown operator {opts.operator!r}", hint=f"use one of {', '.join(operators)}")
    if opts.decode_steps != "auto" and opts.decode_steps is not None and (
            not isinstance(opts.decode_steps, int) or opts.decode_steps < 0):
        raise CrvlmError(f"decode_steps must be >= 0, None (every token) or 'auto', got {opts.decode_steps!r}")
    if opts.stop_sentences != "auto" and opts.stop_sentences is not None and (
            not isinstance(opts.stop_sentences, int) or opts.stop_sentences < 1):
        raise CrvlmError(f"stop_sentences must be >= 1, None (never) or 'auto', got {opts.stop_sentences!r}")
    modes = ("auto", *get_args(ResponseMode))
    if opts.mode not in modes:
        raise CrvlmError(f"unknown response mode {opts.mode!r}", hint=f"use one of {', '.join(modes)}")
    if opts.gate_features not in GATE_FEATURES:
        raise CrvlmError(f"unknown gate features {opts.gate_features!r}", hint=f"use one of {', '.join(GATE_FEATURES)}")
    if opts.gate_selection not in ("validation", "out-of-fold"):
        raise CrvlmError(f"unknown gate selection {opts.gate_selection!r}", hint="use validation or out-of-fold")
    if not 0 < opts.threshold < 1:
        raise CrvlmError(f"threshold must be between 0 and 1, got {opts.threshold}")
