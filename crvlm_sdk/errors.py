"""Exception types.

Every error a *user* can cause (bad file, wrong model, unknown name) derives from
:class:`CrvlmError`, so the CLI can print it as one line with a hint and a stable exit code
instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


class CrvlmError(Exception):
    """A user-facing error: ``str(err)`` is one line; ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class BundleError(CrvlmError):
    """A bundle on disk is missing, malformed, tampered with or built for another model."""

    exit_code = 3


class AdapterError(CrvlmError):
    """No adapter fits the model, or the model's layout is not what the adapter expects."""

    exit_code = 4


class PluginError(CrvlmError):
    """A plugin name is unknown or registered twice."""

    exit_code = 5


class ModelLoadError(CrvlmError):
    """A model directory or GGUF file cannot be found or loaded."""

    exit_code = 6


class ExportError(CrvlmError):
    """A bundle uses something the export target cannot express (llama.cpp: rotation, layer 0)."""

    exit_code = 7


class PolicyError(CrvlmError):
    """A policy file or one of its data files is wrong."""


def field_error(exc: ValidationError) -> str:
    """pydantic's first complaint as one line: ``field `a.b`: message``."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    return f"field `{loc}`: {first['msg']}"
