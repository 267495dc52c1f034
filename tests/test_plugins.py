"""Plugin discovery: entry points, broken plugins, duplicate names, by-name lookup."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_bundle, pip_install_into

from crvlm_plugins.gates import AlwaysGate
from crvlm_sdk import PluginError, PluginManager, Steerer
from crvlm_sdk.plugins.manager import KINDS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "crvlm-cosine-gate"


def fresh_manager() -> PluginManager:
    manager = PluginManager()
    manager.load_builtins()
    manager.load_entry_points()
    return manager


def fake_distribution(root: Path, dist: str, entry: str, module: str, source: str) -> None:
    """A minimal installed distribution: dist-info with entry_points.txt, plus its module."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[crvlm]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="session")
def installed_example(tmp_path_factory) -> Path:
    """pip-install the example plugin distribution into a private target directory."""
    return pip_install_into(EXAMPLE, tmp_path_factory.mktemp("site"))


def test_builtins_are_registered_through_hooks():
    manager = fresh_manager()
    assert {"llava", "causal-lm"} <= set(manager.components("adapter"))
    assert {"probe", "always"} <= set(manager.components("gate"))
    assert manager.components("gate")["probe"].provider == "crvlm_plugins"
    assert set(KINDS) == {"adapter", "gate", "extractor", "locator", "aligner", "judge"}


def test_gate_that_needs_constructor_arguments_must_say_how_to_start_untrained():
    class Needy(AlwaysGate):
        name = "needy"

        def __init__(self, direction: torch.Tensor) -> None:
            self.direction = direction

    with pytest.raises(PluginError, match=r"gate 'needy' needs constructor arguments"):
        Needy.untrained(8)
    assert isinstance(AlwaysGate.untrained(8), AlwaysGate)


def test_unknown_name_lists_installed():
    with pytest.raises(PluginError, match=r"unknown gate 'nope'; installed: .*always.*probe"):
        fresh_manager().get("gate", "nope")


def test_example_plugin_is_discovered_after_pip_install(installed_example, monkeypatch, tiny_llama):
    monkeypatch.syspath_prepend(str(installed_example))
    manager = fresh_manager()
    component = manager.components("gate")["cosine"]
    assert component.provider == "cosine_gate (crvlm-cosine-gate)"
    assert not manager.failures

    # ...and works end to end: fit, save in a bundle, steer through the Steerer
    _, _, adapter = tiny_llama
    gate = component.cls.untrained(adapter.hidden_size)  # what the build pipeline calls
    metrics = gate.fit(torch.randn(20, adapter.hidden_size) - 1, torch.randn(20, adapter.hidden_size) + 1)
    assert metrics["train_accuracy"] > 0.9
    gate.soften(0.2)
    assert gate.config()["temperature"] == 0.2
    bundle = make_bundle(adapter, gate=gate)
    assert bundle.manifest.gate.type == "cosine"
    steerer = Steerer(adapter, [bundle], plugins=manager)
    assert steerer.generate(["Hello"], max_new_tokens=2)


def test_cli_lists_example_plugin(installed_example):
    env_path = f"{installed_example}"
    out = subprocess.run(
        [sys.executable, "-m", "crvlm_sdk.cli", "plugins"],
        capture_output=True, text=True, env={"PYTHONPATH": env_path, "COLUMNS": "200", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "cosine" in out.stdout and "crvlm-cosine-gate" in out.stdout


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "broken-plugin", "broken", "broken_mod", "import does_not_exist_anywhere\n")
    fake_distribution(
        tmp_path, "good-plugin", "good", "good_mod",
        """
        import torch
        import crvlm_sdk
        from crvlm_plugins.gates import AlwaysGate

        class NeverGate(AlwaysGate):
            name = "never"
            def score(self, h):
                return torch.zeros(h.shape[0], device=h.device)

        @crvlm_sdk.hookimpl
        def crvlm_gates():
            return [NeverGate]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = fresh_manager()
    assert [f.name for f in manager.failures] == ["broken (broken-plugin)"]
    assert "ModuleNotFoundError" in manager.failures[0].error
    assert "does_not_exist_anywhere" in manager.failures[0].error
    assert "never" in manager.components("gate")
    assert "probe" in manager.components("gate")


def test_plugin_that_exits_on_import_or_in_a_hook_is_a_failure_not_a_success(tmp_path, monkeypatch):
    """``sys.exit(0)`` in a plugin made commands end with exit 0 having done nothing."""
    fake_distribution(tmp_path, "exiting-plugin", "exiting", "exiting_mod", "import sys\nsys.exit(0)\n")
    fake_distribution(
        tmp_path, "exiting-hook", "exiting-hook", "exiting_hook_mod",
        """
        import sys
        import crvlm_sdk

        @crvlm_sdk.hookimpl
        def crvlm_gates():
            sys.exit(0)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = fresh_manager()
    assert "probe" in manager.components("gate")
    failures = {f.name: f.error for f in manager.failures}
    assert failures["exiting (exiting-plugin)"].startswith("SystemExit")
    assert failures["exiting-hook (exiting-hook)"].startswith("crvlm_gates: SystemExit")


def test_duplicate_name_names_both_providers(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, "copycat", "copycat", "copycat_mod",
        """
        import crvlm_sdk
        from crvlm_plugins.gates import AlwaysGate

        class Probe(AlwaysGate):
            name = "probe"

        @crvlm_sdk.hookimpl
        def crvlm_gates():
            return [Probe]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = fresh_manager()
    with pytest.raises(PluginError, match=r"gate name 'probe' is registered twice: by .+ and by .+"):
        manager.components("gate")
    try:
        manager.components("gate")
    except PluginError as exc:
        assert "crvlm_plugins" in str(exc) and "copycat (copycat)" in str(exc)


def test_component_of_wrong_type_is_reported(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, "wrongtype", "wrongtype", "wrongtype_mod",
        """
        import crvlm_sdk

        @crvlm_sdk.hookimpl
        def crvlm_gates():
            return [dict]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = fresh_manager()
    manager.components("gate")
    assert any("not a Gate" in f.error for f in manager.failures)


MINIMAL_PLUGIN = """
import torch
from crvlm_sdk import Gate, RefusalJudge, hookimpl


class SignGate(Gate):
    name = "sign"

    def __init__(self, w):
        self.w = w

    def score(self, h):
        return torch.sigmoid(h.float() @ self.w.to(h.device))

    def tensors(self):
        return {"w": self.w}

    @classmethod
    def from_tensors(cls, tensors, config):
        return cls(tensors["w"])


class SorryJudge(RefusalJudge):
    name = "sorry"

    def judge(self, answers, **context):
        return ["sorry" in a.lower() for a in answers]


@hookimpl
def crvlm_gates():
    return [SignGate]


@hookimpl
def crvlm_judges():
    return [SorryJudge]
"""


def test_plugins_written_to_the_abcs_alone_work_in_every_command(tmp_path, monkeypatch, tiny_llama, tiny_llama_dir):
    """A gate and a judge that implement only the abstract methods: eval, rejudge, inspect,
    verify and generate must not need anything the ABCs do not declare."""
    import json

    from typer.testing import CliRunner

    from crvlm_sdk.cli import app
    from crvlm_sdk.plugins.manager import get_plugin_manager

    site = tmp_path / "site"
    fake_distribution(site, "crvlm-minimal", "minimal", "crvlm_minimal", MINIMAL_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    manager = get_plugin_manager(reload=True)
    try:
        assert {"sign", "sorry"} <= set(manager.components("gate")) | set(manager.components("judge"))
        _, _, adapter = tiny_llama
        gate = manager.get("gate", "sign")(torch.nn.functional.normalize(torch.randn(adapter.hidden_size), dim=0))
        bundle_dir = make_bundle(adapter, gate=gate, gate_layer=1, layers=(2,)).save(tmp_path / "bundle")
        policy = tmp_path / "policy"
        policy.mkdir()
        rows = [{"question": f"How do I cook {t}?"} for t in ("rice", "eggs", "soup", "bread", "cake", "pasta")]
        outs = [{"question": f"Tell me about {t}."} for t in ("chess", "tax", "cars", "kings", "rivers", "stars")]
        test = [{**r, "in_scope": True} for r in rows[:2]] + [{**r, "in_scope": False} for r in outs[:2]]
        for name, data in (("in.jsonl", rows), ("out.jsonl", outs), ("test.jsonl", test)):
            (policy / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        (policy / "policy.yaml").write_text("name: mini\nsubject: cooking\nin_scope: in.jsonl\n"
                                            "out_of_scope: out.jsonl\ntest: test.jsonl\n")
        runner = CliRunner()
        env = {"COLUMNS": "200"}
        commands = [
            ["eval", "--model", str(tiny_llama_dir), "--bundle", str(bundle_dir), "--policy",
             str(policy / "policy.yaml"), "--out", str(tmp_path / "report"), "--judge", "sorry",
             "--baseline", "none,no-gate", "--max-new-tokens", "4"],
            ["rejudge", str(tmp_path / "report" / "report.json"), "--judge", "sorry"],
            ["inspect", str(bundle_dir)],
            ["verify", str(bundle_dir), "--model", str(tiny_llama_dir)],
            ["generate", "--model", str(tiny_llama_dir), "--bundle", str(bundle_dir), "--max-new-tokens", "4",
             "Tell me about chess."],
        ]
        for command in commands:
            result = runner.invoke(app, command, env=env)
            assert result.exit_code == 0, (command[0], result.output)
        report = json.loads((tmp_path / "report" / "report.json").read_text())
        assert report["settings"]["judge"] == "sorry" and report["settings"]["gate"] == "sign@1"
    finally:
        monkeypatch.undo()
        get_plugin_manager(reload=True)
