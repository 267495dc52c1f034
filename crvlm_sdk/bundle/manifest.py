"""The bundle's manifest: what a bundle was built for, how it steers, how its gate reads and how
a refused answer is shaped. Validated by pydantic; unknown keys from newer minor versions are
kept and warned about, never silently dropped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crvlm_sdk._version import __version__
from crvlm_sdk.errors import BundleError, field_error
from crvlm_sdk.types import Fingerprint

FORMAT_VERSION = "1.5"  # 1.1: `decode_steps`; 1.2: `response`; 1.3: gate at several layers, base model name;
#: 1.4: `gate.features`; 1.5: `steer_prompt`
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"

Operator = Literal["additive", "rotation"]
ResponseMode = Literal["steer", "template"]


def gate_needs_prepass(gate_layers: Sequence[int], steered_layers: Iterable[int]) -> bool:
    """Whether a gate must be read in an unsteered pre-pass: some layer it reads is at or above a
    steered layer, so in the steered pass it would see activations it was not trained on."""
    return max(gate_layers) >= min(steered_layers)


def gates_needing_prepass(gate_layers: Sequence[Sequence[int]], prompt_layers: Iterable[Iterable[int]]) -> list[bool]:
    """For bundles applied to the same rows (gate layers and prompt-steered layers of each, in
    order): which gates must be read in the pre-pass. Rows never see each other's activations,
    so callers group bundles by the rows (requests) that select them together."""
    steered = set().union(*prompt_layers)
    return [bool(steered) and gate_needs_prepass(layers, steered) for layers in gate_layers]


class BundleWarning(UserWarning):
    """A bundle loads, but something about it deserves attention (e.g. unknown keys)."""


class PolicySummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    subject: str = ""
    description: str = ""
    n_in_scope: int = 0
    n_out_of_scope: int = 0


#: what each layer's gate reads: the last prompt token's hidden state (``(B, H)``), or that and
#: the mean over the question's tokens side by side (``(B, 2H)``; ``activations.capture.question_weights``)
GateFeatures = Literal["last", "last+question"]
GATE_FEATURES: tuple[str, ...] = ("last", "last+question")


class GateSpec(BaseModel):
    """The gate plugin, the layers it reads (one gate per layer, log-odds averaged), the names
    of one layer's tensors and each layer's settings."""

    type: str
    layers: list[int] = Field(min_length=1)
    #: what each layer's gate reads (``last`` before format 1.4)
    features: GateFeatures = "last"
    params: list[str] = Field(default_factory=list)
    #: one settings dict per layer, in ``layers`` order
    configs: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_one_layer(cls, data: Any) -> Any:
        """Formats before 1.3 wrote a single ``layer`` and ``config``."""
        if isinstance(data, dict) and "layer" in data and "layers" not in data:
            data = dict(data)
            data["layers"] = [data.pop("layer")]
            data["configs"] = [data.pop("config", {})]
        return data

    @model_validator(mode="after")
    def _one_config_per_layer(self) -> GateSpec:
        if sorted(set(self.layers)) != self.layers or self.layers[0] < 0:
            raise ValueError(f"`layers` must be sorted, unique and >= 0, got {self.layers}")
        if not self.configs:
            self.configs = [{} for _ in self.layers]
        if len(self.configs) != len(self.layers):
            raise ValueError(f"{len(self.configs)} `configs` for {len(self.layers)} `layers`")
        return self


class ResponseSpec(BaseModel):
    """What a refused user reads: the gate decides per row, these settings shape the answer.

    Steering alone starts a refusal on a small model but rarely ends one cleanly (it loops or
    drifts), so a refused row may get a forced ``opening`` and be ended after
    ``stop_sentences`` sentences; in ``template`` mode its whole answer is ``message`` and the
    model's activations only decide who is refused. A row counts as refused when its gate
    score reaches ``threshold``; rows below it are never forced or cut.
    """

    model_config = ConfigDict(extra="allow")  # a newer minor format may add settings: warn, not fail

    mode: ResponseMode = "steer"
    #: text forced at the start of a refused row's answer ("" = none)
    opening: str = ""
    #: end a refused row after this many sentences (None = let it run)
    stop_sentences: int | None = Field(default=None, ge=1)
    #: template mode: a refused row's whole answer
    message: str = ""
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _template_has_message(self) -> ResponseSpec:
        if self.mode == "template" and not self.message.strip():
            raise ValueError("template mode needs a non-empty `message`")
        return self

    @property
    def shapes(self) -> bool:
        """Whether a refused row's answer is changed beyond steering."""
        return self.mode == "template" or bool(self.opening) or self.stop_sentences is not None

    @property
    def steers(self) -> bool:
        """Whether the steering vectors are applied (template answers need no steering)."""
        return self.mode == "steer"

    def describe(self) -> str:
        if self.mode == "template":
            return f"template {self.message!r} (refused when p >= {self.threshold:g})"
        parts = ["steering"]
        if self.opening:
            parts.append(f"opening {self.opening!r}")
        if self.stop_sentences is not None:
            parts.append(f"ended after {self.stop_sentences} sentence{'s' if self.stop_sentences > 1 else ''}")
        return " + ".join(parts) + f" (refused when p >= {self.threshold:g})"

    def updated(self, overrides: ResponseSpec | Mapping[str, Any] | None) -> ResponseSpec:
        """These settings with ``overrides`` applied (a whole spec, or some of its fields)."""
        if overrides is None:
            return self
        if isinstance(overrides, ResponseSpec):
            return overrides
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise BundleError(f"unknown response setting(s) {unknown}",
                              hint=f"use {', '.join(type(self).model_fields)}")
        try:
            return type(self).model_validate({**self.model_dump(exclude_unset=False), **overrides})
        except ValidationError as exc:
            raise BundleError(f"response setting {field_error(exc).removeprefix('field ')}") from None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format_version: str = FORMAT_VERSION
    crvlm_version: str = __version__
    policy: PolicySummary
    backbone: Fingerprint
    #: where the base model came from (``config._name_or_path``) and its hub revision, if known
    base_model_name_or_path: str = ""
    base_model_revision: str | None = None
    adapter: str
    layers: list[int]
    alpha: float
    operator: Operator = "additive"
    #: Steer the prompt and this many decoding steps, then stop (``None``: every generated token).
    decode_steps: int | None = Field(default=None, ge=0)
    #: Whether the prompt's tokens are steered too. False steers generated tokens only: a gate
    #: above the band is then read in the one prefill pass (no pre-pass) and serving engines may
    #: chunk or cache prompts, but the refusals are less clean (benchmarks/prompt_steering.py);
    #: the build always steers the prompt.
    steer_prompt: bool = True
    gate: GateSpec
    #: response shaping; a bundle written before format 1.2 steers only (the default spec)
    response: ResponseSpec = Field(default_factory=ResponseSpec)
    extraction: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    tensors_sha256: str = ""
    #: sha256 of this manifest's other fields (:func:`manifest_digest`): any edit is detected
    manifest_sha256: str = ""
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        """The manifest as written to disk, with ``manifest_sha256`` set to cover it."""
        self.manifest_sha256 = manifest_digest(json.loads(self.model_dump_json()))
        return self.model_dump_json(indent=2) + "\n"

    @model_validator(mode="after")
    def _steers_something(self) -> Manifest:
        if not self.steer_prompt and self.decode_steps == 0:
            raise ValueError("`steer_prompt` false with `decode_steps` 0 steers no token")
        return self

    def prompt_layers(self, response: ResponseSpec | None = None) -> frozenset[int]:
        """The layers at which this bundle changes a prompt's activations under ``response``
        (default: its own): none when it answers with a template or leaves the prompt alone."""
        steers = (response or self.response).steers and self.steer_prompt
        return frozenset(self.layers) if steers else frozenset()

    def steered_span(self, prompt_length: int) -> tuple[int, int | None]:
        """Token positions this bundle steers, ``[first, end)`` (``end`` None: to the end of the
        answer); the Steerer and the serving core both count them this way."""
        first = 0 if self.steer_prompt else prompt_length
        return first, None if self.decode_steps is None else prompt_length + self.decode_steps

    def steered_tokens(self) -> str:
        """Which tokens are steered, in words (for inspect, build summaries and model cards)."""
        generated = "every generated token" if self.decode_steps is None else f"{self.decode_steps} generated tokens"
        if self.steer_prompt:
            return f"the prompt and {generated}"
        return generated if self.decode_steps is None else f"the first {generated} (not the prompt)"

    @property
    def needs_whole_prompt(self) -> bool:
        """Whether a serving engine must run this bundle's prompts whole, in one step and never
        from cached keys and values: its steering changes the prompt's activations, or its gate
        reads every question token. Otherwise only the last prompt token matters (chunked
        prefill and prefix caching are safe)."""
        return bool(self.prompt_layers()) or self.gate.features == "last+question"

    @property
    def needs_prepass(self) -> bool:
        """Whether this bundle alone needs an unsteered pre-pass to read its gate."""
        return self.steer_prompt and gate_needs_prepass(self.gate.layers, self.layers)


#: the first format whose manifests carry ``manifest_sha256`` (older ones load without the check)
DIGEST_SINCE = (1, 4)


def manifest_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of a manifest's JSON object without ``manifest_sha256``, keys sorted and compact,
    so the digest depends on the content and not on the file's layout."""
    content = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise BundleError(f"{path} is missing", hint="a bundle is manifest.json + tensors.safetensors")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a crvlm manifest") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    version = str(raw.get("format_version", ""))
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise BundleError(f"{path}: field `format_version` is {version!r}, expected 'MAJOR.MINOR'") from None
    our_major, our_minor = (int(x) for x in FORMAT_VERSION.split("."))
    if major > our_major:
        raise BundleError(
            f"{path}: bundle format {version} is newer than this crvlm {__version__} reads ({FORMAT_VERSION})",
            hint="pip install --upgrade crvlm",
        )
    if major < our_major:
        raise BundleError(f"{path}: bundle format {version} is too old for crvlm {__version__}; rebuild it")
    if (major, minor) >= DIGEST_SINCE:
        stored = raw.get("manifest_sha256")
        if not isinstance(stored, str) or stored != manifest_digest(raw):
            raise BundleError(f"{path}: field `manifest_sha256` does not match the manifest's content "
                              "(the manifest was edited after crvlm wrote it)",
                              hint="rebuild the bundle; crvlm refuses hand-edited manifests")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: {field_error(exc)}") from None
    unknown = sorted(manifest.model_extra or {})
    unknown += [f"response.{k}" for k in sorted(manifest.response.model_extra or {})]
    if unknown:
        newer = " (written by a newer crvlm)" if minor > our_minor else ""
        warnings.warn(f"{path}: ignoring unknown manifest keys {unknown}{newer}", BundleWarning, stacklevel=3)
    return manifest
