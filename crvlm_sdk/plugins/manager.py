"""Plugin discovery and the by-name registry of components.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import;
crvlm must keep working when one third-party package is broken, so entry points are loaded
one by one here and failures are recorded (``crvlm plugins`` shows them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.components import Gate, LayerLocator, RefusalJudge, VectorExtractor, VisualAligner
from crvlm_sdk.errors import PluginError
from crvlm_sdk.plugins import hookspecs

#: kind -> (hook name, required base class)
KINDS: dict[str, tuple[str, type]] = {
    "adapter": ("crvlm_adapters", BackboneAdapter),
    "gate": ("crvlm_gates", Gate),
    "extractor": ("crvlm_extractors", VectorExtractor),
    "locator": ("crvlm_locators", LayerLocator),
    "aligner": ("crvlm_aligners", VisualAligner),
    "judge": ("crvlm_judges", RefusalJudge),
}

BUILTIN_MODULES = ("crvlm_adapters", "crvlm_plugins")
ENTRY_POINT_GROUP = "crvlm"


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    cls: type
    provider: str


@dataclass(frozen=True)
class PluginFailure:
    name: str
    error: str


@dataclass
class PluginManager:
    """Registers built-ins, then the ``crvlm`` entry points, and indexes components by name."""

    pm: pluggy.PluginManager = field(default_factory=lambda: pluggy.PluginManager(hookspecs.PROJECT))
    failures: list[PluginFailure] = field(default_factory=list)
    _components: dict[str, dict[str, Component]] | None = None

    def __post_init__(self) -> None:
        self.pm.add_hookspecs(hookspecs)

    def load_builtins(self) -> None:
        for module_name in BUILTIN_MODULES:
            self.pm.register(importlib.import_module(module_name), name=module_name)
        self._components = None

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            label = f"{ep.name} ({ep.dist.name})" if ep.dist is not None else ep.name
            if self.pm.has_plugin(label):
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=label)
            except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down,
                # nor end the command "successfully" by calling sys.exit on import
                self.failures.append(PluginFailure(label, f"{type(exc).__name__}: {exc}"))
        self._components = None

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register an in-process plugin object (handy in tests and notebooks)."""
        self.pm.register(plugin, name=name)
        self._components = None

    def components(self, kind: str) -> dict[str, Component]:
        if self._components is None:
            self._components = self._collect()
        return self._components[kind]

    def get(self, kind: str, name: str) -> type:
        found = self.components(kind)
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise PluginError(
                f"unknown {kind} {name!r}; installed: {known}",
                hint="`crvlm plugins` lists every component and any plugin that failed to load",
            )
        return found[name].cls

    def _collect(self) -> dict[str, dict[str, Component]]:
        out: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        for kind, (hook_name, base) in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                provider = impl.plugin_name
                try:
                    classes = impl.function() or []
                except (Exception, SystemExit) as exc:
                    self.failures.append(PluginFailure(provider, f"{hook_name}: {type(exc).__name__}: {exc}"))
                    continue
                for cls in classes:
                    if not (isinstance(cls, type) and issubclass(cls, base)):
                        self.failures.append(
                            PluginFailure(provider, f"{hook_name} returned {cls!r}, not a {base.__name__}")
                        )
                        continue
                    name = getattr(cls, "name", None)
                    if not isinstance(name, str) or not name:
                        self.failures.append(PluginFailure(provider, f"{cls.__name__} has no `name`"))
                        continue
                    if name in out[kind]:
                        other = out[kind][name].provider
                        raise PluginError(
                            f"{kind} name {name!r} is registered twice: by {other} and by {provider}",
                            hint="uninstall one of the two plugins or rename its component",
                        )
                    out[kind][name] = Component(kind, name, cls, provider)
        return out


_default: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager(reload: bool = False) -> PluginManager:
    """The process-wide manager with built-ins and installed entry points loaded."""
    global _default
    with _lock:
        if _default is None or reload:
            manager = PluginManager()
            manager.load_builtins()
            manager.load_entry_points()
            _default = manager
        return _default
