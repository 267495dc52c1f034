"""Bad inputs that used to end in a traceback or be accepted silently (issue 14, items 11, 13, 14):
each now gives one line naming the file or field, and the CLI its documented exit code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_bundle, write_manifest, write_tensors
from PIL import Image
from typer.testing import CliRunner

from crvlm_sdk import Bundle, BundleError, CrvlmError, Steerer
from crvlm_sdk.bundle.manifest import MANIFEST, TENSORS
from crvlm_sdk.cli.app import app
from crvlm_sdk.errors import PolicyError
from crvlm_sdk.policy import Policy, read_jsonl

runner = CliRunner()


def _policy(tmp_path, ins, outs, test=None, extra=""):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("in.jsonl", ins)
    write("out.jsonl", outs)
    text = f"name: p\nsubject: cooking\nin_scope: in.jsonl\nout_of_scope: out.jsonl\n{extra}"
    if test is not None:
        write("test.jsonl", test)
        text += "test: test.jsonl\n"
    (tmp_path / "policy.yaml").write_text(text)
    return tmp_path / "policy.yaml"


def _questions(prefix, n=30):
    return [{"question": f"{prefix} {i}?"} for i in range(n)]


# -- policy files -----------------------------------------------------------------------------

def test_non_utf8_policy_and_data_files_name_the_file_and_line(tmp_path):
    path = _policy(tmp_path, _questions("cook"), _questions("chess"))
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: not UTF-8 text"):
        Policy.load(path)
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"question": "ok?"}\n{"question": "caf\xe9?"}\n')
    with pytest.raises(PolicyError, match=r"rows.jsonl:2: not UTF-8 text"):
        read_jsonl(data, labelled=False)


@pytest.mark.parametrize(("ins", "outs", "test", "message"), [
    ([*_questions("cook"), {"question": "Cook  0?"}], _questions("chess"), None,
     r"the in-scope data has '[Cc]ook +0\?' twice"),
    ([*_questions("cook"), {"question": "chess 3?"}], _questions("chess"), None,
     r"'chess 3\?' is in both the in-scope and the out-of-scope data"),
    (_questions("cook"), _questions("chess"), [{"question": "cook 1?", "in_scope": True}],
     r"'cook 1\?' is in both the in-scope and the test data"),
])
def test_contradicting_or_leaking_examples_are_refused(tmp_path, ins, outs, test, message):
    with pytest.raises(PolicyError, match=message):
        Policy.load(_policy(tmp_path, ins, outs, test)).load_data()


@pytest.mark.parametrize("image", ["../outside.png", "/tmp/abs.png"])
def test_images_outside_the_policy_folder_are_refused(tmp_path, image):
    folder = tmp_path / "policy"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8)).save("/tmp/abs.png")
    rows = [{**q, "image": image} for q in _questions("cook")]
    with pytest.raises(PolicyError, match="is outside the policy's folder"):
        Policy.load(_policy(folder, rows, _questions("chess"))).load_data()


def test_a_decompression_bomb_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100×100 picture stands in for 20000×20000
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    rows = [{**q, "image": "big.png"} for q in _questions("cook")]
    with pytest.raises(PolicyError, match=r"big.png is too large"):
        Policy.load(_policy(tmp_path, rows, _questions("chess"))).load_data()


# -- bundle files -----------------------------------------------------------------------------

@pytest.fixture
def saved(tiny_llama, tmp_path):
    return make_bundle(tiny_llama[2], layers=(1, 2)).save(tmp_path / "bundle")


@pytest.mark.parametrize("name", ["vector.²", "vector.01"])
def test_tensor_names_crvlm_does_not_write_are_refused(saved, name):
    from safetensors.torch import load_file

    write_tensors(saved, **{name: load_file(str(saved / TENSORS))["vector.1"].clone()})
    with pytest.raises(BundleError, match=f"unexpected tensor name '{name}'"):
        Bundle.load(saved)


def test_a_deeply_nested_manifest_is_one_line(saved):
    (saved / MANIFEST).write_text('{"format_version": "1.4", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="nested too deeply"):
        Bundle.load(saved)


def test_a_tensor_file_linked_from_outside_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(saved / TENSORS, outside)
    (saved / TENSORS).symlink_to(outside)
    with pytest.raises(BundleError, match="is a symbolic link"):
        Bundle.load(saved)


def test_a_bundle_read_through_another_adapter_is_refused(saved, tiny_llama):
    raw = json.loads((saved / MANIFEST).read_text())
    raw["adapter"] = "qwen2-vl"
    write_manifest(saved, raw)
    with pytest.raises(BundleError, match=r"adapter: bundle was built through 'qwen2-vl'.*--adapter qwen2-vl"):
        Bundle.load(saved, adapter=tiny_llama[2])


# -- API and CLI misuse ---------------------------------------------------------------------

def test_empty_inputs_and_zero_new_tokens(tiny_llama):
    _, _, adapter = tiny_llama
    steerer = Steerer(adapter, [make_bundle(adapter)])
    assert {k: v.shape for k, v in steerer.gate_scores([]).items()} == {"test": torch.Size([0])}
    assert steerer.generate([]) == []
    with pytest.raises(CrvlmError, match="max_new_tokens must be an integer >= 1, got 0"):
        steerer.generate(["hi"], max_new_tokens=0)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--band", "a,b", "--locator", "fixed"], 1, "--band takes layer numbers separated by commas, got 'a,b'"),
    (["--device", "banana"], 6, "unknown device 'banana'"),
    (["--device", "cuda:0"], 6, "device 'cuda:0' is not available"),
])
def test_cli_misuse_is_one_line_with_its_exit_code(tiny_llama_dir, small_policy, tmp_path, args, code, message):
    if args[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
