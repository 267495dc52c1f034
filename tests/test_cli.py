"""The CLI: readable output, one-line errors, documented exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_bundle, write_manifest
from typer.testing import CliRunner

from crvlm_sdk.bundle.manifest import MANIFEST, TENSORS
from crvlm_sdk.cli.app import app

runner = CliRunner()


@pytest.fixture
def bundle_dir(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    return make_bundle(adapter, name="cooking", layers=(1, 2)).save(tmp_path / "bundle")


def test_inspect_shows_the_manifest(bundle_dir):
    result = runner.invoke(app, ["inspect", str(bundle_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("cooking", "LlamaForCausalLM", "layers [1, 2]", "probe at layer 0", "causal-lm"):
        assert text in result.output


def test_verify_ok_and_against_model(bundle_dir, tiny_llama_dir):
    result = runner.invoke(app, ["verify", str(bundle_dir), "--model", str(tiny_llama_dir)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_verify_other_model_exits_3(bundle_dir, tiny_llama_other_dir):
    result = runner.invoke(app, ["verify", str(bundle_dir), "--model", str(tiny_llama_other_dir)])
    assert result.exit_code == 3
    assert "built for another model" in result.output
    assert "Traceback" not in result.output


def test_verify_tampered_exits_3_with_one_line(bundle_dir):
    data = bytearray((bundle_dir / TENSORS).read_bytes())
    data[100] ^= 0xFF
    (bundle_dir / TENSORS).write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(bundle_dir)])
    assert result.exit_code == 3
    assert "sha256" in result.output and "Traceback" not in result.output


def test_inspect_malformed_manifest_exits_3(bundle_dir):
    raw = json.loads((bundle_dir / MANIFEST).read_text())
    raw["layers"] = "all of them"
    write_manifest(bundle_dir, raw)
    result = runner.invoke(app, ["inspect", str(bundle_dir)])
    assert result.exit_code == 3
    assert "field `layers`" in result.output


def test_verify_missing_model_exits_6(bundle_dir, tmp_path):
    result = runner.invoke(app, ["verify", str(bundle_dir), "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 6
    assert "model directory not found" in result.output


def test_plugins_lists_builtins():
    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("llava", "causal-lm", "probe", "teacher-forced", "LlavaForConditionalGeneration"):
        assert text in result.output


def test_listings_piped_keep_identifiers_whole_and_speak_json(tmp_path):
    """``crvlm plugins | grep Qwen2VL`` works on an 80-column pipe; --json parses."""
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80"}
    piped = subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "plugins"], capture_output=True, text=True,
                           env=env, check=True).stdout
    for name in ("Qwen2VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                 "model.language_model.layers"):
        assert name in piped, name
    listed = json.loads(subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "plugins", "--json"],
                                       capture_output=True, text=True, env=env, check=True).stdout)
    qwen = next(a for a in listed["adapters"] if a["name"] == "qwen2-vl")
    assert "Qwen2VLForConditionalGeneration" in qwen["claims"]
    assert {"kind": "gate", "name": "probe", "provider": "crvlm_plugins"} in listed["components"]
    fixture = Path(__file__).parent / "fixtures" / "bundle-cooking-1.3"
    shown = json.loads(subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "inspect", str(fixture), "--json"],
                                      capture_output=True, text=True, env=env, check=True).stdout)
    assert shown["manifest"]["policy"]["name"] == "cooking" and shown["tensors"]["gate.27.weight"] == [576]
    verified = json.loads(subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "verify", str(fixture), "--json"],
                                         capture_output=True, text=True, env=env, check=True).stdout)
    assert verified == {"ok": True, "path": str(fixture), "bundle": "cooking", "model": None}


def test_markup_in_paths_and_names_is_printed_as_written(bundle_dir, tmp_path):
    """``[/x]`` in a path crashed the error printer itself; ``[link=…]`` in a policy name became a
    terminal hyperlink."""
    odd = tmp_path / "a[" / "x]b"
    result = runner.invoke(app, ["verify", str(odd)])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert "a[/x]b" in result.output.replace("\n", "")
    raw = json.loads((bundle_dir / MANIFEST).read_text())
    raw["policy"]["name"] = "[link=https://example.com]cooking[/link] [/oops]"
    write_manifest(bundle_dir, raw)
    result = runner.invoke(app, ["inspect", str(bundle_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[link=https://example.com]cooking[/link] [/oops]" in result.output


@pytest.mark.parametrize("edit", ["alpha", "gate type", "threshold", "digest removed"])
def test_any_edit_to_the_manifest_is_refused(bundle_dir, tiny_llama_dir, edit):
    """Flipping α's sign, switching the gate to `always` or a NaN threshold passed
    `verify --model` with exit 0: only the tensor file was hashed."""
    raw = json.loads((bundle_dir / MANIFEST).read_text())
    if edit == "alpha":
        raw["alpha"] = -raw["alpha"]
    elif edit == "gate type":
        raw["gate"]["type"] = "always"
    elif edit == "threshold":
        raw["gate"]["configs"][0]["threshold"] = float("nan")
    else:
        del raw["manifest_sha256"]
    write_manifest(bundle_dir, raw, reseal=False)
    result = runner.invoke(app, ["verify", str(bundle_dir), "--model", str(tiny_llama_dir)])
    assert result.exit_code == 3 and "manifest_sha256" in result.output and "Traceback" not in result.output


def test_reformatting_the_manifest_is_not_an_edit(bundle_dir):
    raw = json.loads((bundle_dir / MANIFEST).read_text())
    (bundle_dir / MANIFEST).write_text(json.dumps(dict(reversed(list(raw.items()))), indent=4))
    assert runner.invoke(app, ["verify", str(bundle_dir)]).exit_code == 0
