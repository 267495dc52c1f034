"""Built-in method components, registered through the same hooks a third party uses."""

from __future__ import annotations

from crvlm_sdk.plugins.hookspecs import hookimpl


@hookimpl
def crvlm_gates() -> list[type]:
    from crvlm_plugins.gates import AlwaysGate, FlowGate, ProbeGate

    return [ProbeGate, FlowGate, AlwaysGate]


@hookimpl
def crvlm_extractors() -> list[type]:
    from crvlm_plugins.extractors import MeanDiffExtractor, TeacherForcedExtractor

    return [TeacherForcedExtractor, MeanDiffExtractor]


@hookimpl
def crvlm_locators() -> list[type]:
    from crvlm_plugins.locators import FixedLocator, SweepLocator

    return [SweepLocator, FixedLocator]


@hookimpl
def crvlm_aligners() -> list[type]:
    from crvlm_plugins.aligners import CounterfactualAligner

    return [CounterfactualAligner]


@hookimpl
def crvlm_judges() -> list[type]:
    from crvlm_plugins.judges import KeywordJudge, LogitJudge, StrictJudge

    return [StrictJudge, KeywordJudge, LogitJudge]
