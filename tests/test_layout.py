"""The public API loads lazily and in two tiers; the package layout keeps its layering."""

from __future__ import annotations

import json
import subprocess
import sys

import crvlm_sdk


def _modules_loaded_by(statement: str) -> list[str]:
    code = (f"import sys, json\n{statement}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'crvlm_sdk', 'crvlm_adapters', 'crvlm_plugins'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_hookimpl_loads_neither_torch_nor_the_pipeline():
    loaded = _modules_loaded_by("from crvlm_sdk import hookimpl")
    assert loaded == ["crvlm_sdk", "crvlm_sdk._version", "crvlm_sdk.plugins", "crvlm_sdk.plugins.hookspecs"]


def test_importing_steerer_does_not_load_build_eval_cli_or_demo():
    loaded = _modules_loaded_by("from crvlm_sdk import Steerer")
    assert "torch" in loaded and "crvlm_sdk.steering.steerer" in loaded
    heavy = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in ("build", "evaluation", "cli", "demo")]
    assert heavy == []


def test_every_public_name_resolves_to_its_declared_module():
    tiers = {**crvlm_sdk.APPLICATION_API, **crvlm_sdk.PLUGIN_API}
    assert not set(crvlm_sdk.APPLICATION_API) & set(crvlm_sdk.PLUGIN_API), "a name belongs to one tier"
    assert sorted(crvlm_sdk.__all__) == sorted([*tiers, "__version__"])
    for name, module in tiers.items():
        value = getattr(crvlm_sdk, name)
        assert getattr(sys.modules[module], name) is value


def test_unknown_name_is_an_attribute_error():
    try:
        crvlm_sdk.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
