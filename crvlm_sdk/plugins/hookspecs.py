"""pluggy hook specifications: how a plugin contributes components.

A plugin is any module or object with functions marked ``@crvlm_sdk.hookimpl`` whose names
match the specs below; each returns a list of component classes. Built-ins use exactly these
hooks. A third-party distribution exposes its module in the ``crvlm`` entry-point group::

    [project.entry-points.crvlm]
    my_gate = "my_package.plugin"

and in ``my_package/plugin.py``::

    import crvlm_sdk

    @crvlm_sdk.hookimpl
    def crvlm_gates():
        return [MyGate]
"""

from __future__ import annotations

import pluggy

PROJECT = "crvlm"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def crvlm_adapters() -> list[type]:
    """BackboneAdapter subclasses this plugin provides."""


@hookspec
def crvlm_gates() -> list[type]:
    """Gate subclasses this plugin provides."""


@hookspec
def crvlm_extractors() -> list[type]:
    """VectorExtractor subclasses this plugin provides."""


@hookspec
def crvlm_locators() -> list[type]:
    """LayerLocator subclasses this plugin provides."""


@hookspec
def crvlm_aligners() -> list[type]:
    """VisualAligner subclasses this plugin provides."""


@hookspec
def crvlm_judges() -> list[type]:
    """RefusalJudge subclasses this plugin provides."""
