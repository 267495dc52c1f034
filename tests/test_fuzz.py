"""Property-based and fuzz tests (issue 14): whatever is in a bundle, a policy or a command line,
crvlm either works (and steers to finite logits) or raises a ``CrvlmError`` whose message is one
line; the CLI never prints a traceback and exits with a documented code.

Profiles (registered in conftest.py): the default runs in well under two minutes;
``pytest tests/test_fuzz.py --hypothesis-profile=long`` runs 10,000 cases per target.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crvlm_sdk import Bundle, CrvlmError, Steerer
from crvlm_sdk.bundle.manifest import MANIFEST, TENSORS, manifest_digest
from crvlm_sdk.cli.app import app
from crvlm_sdk.policy import Policy, read_jsonl

SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                   deadline=None)
#: exit codes the README documents (0 ok, 1 user error, 2 usage, 3 bundle, 4 adapter, 5 plugin, 6 model)
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    from crvlm_sdk import adapter_for, load_model

    model, processor = load_model(tiny_llama_dir)
    adapter = adapter_for(model, processor)
    root = Path(tempfile.mkdtemp(prefix="crvlm-fuzz-"))
    original = make_bundle(adapter, layers=(1, 2), gate_layer=0).save(root / "original")
    batch = adapter.build_prompts(["What is the capital of France?", "Hi"])
    yield {"model": model, "adapter": adapter, "original": original, "root": root, "batch": batch}
    shutil.rmtree(root, ignore_errors=True)


def _fresh_copy(setup: dict[str, Any]) -> Path:
    target = setup["root"] / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(setup["original"], target)
    return target


def _load_and_steer(setup: dict[str, Any], path: Path) -> None:
    """Load, check against the model and steer one batch; finite logits or a one-line CrvlmError."""
    try:
        bundle = Bundle.load(path, adapter=setup["adapter"])
        steerer = Steerer(setup["adapter"], [bundle])
        with steerer.apply(), torch.no_grad():
            logits = setup["model"](**setup["batch"].inputs).logits
    except CrvlmError as exc:
        _one_line(exc)
        return
    assert bool(torch.isfinite(logits).all()), "a bundle that loads must steer to finite logits"


#: values that break numbers: drawn half the time, so they reach the fields that matter often
EDGE_VALUES = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0, -1, 0.0, "", [], {}, None,
                               True, "x", 2**63])


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value, except inside the fingerprint's long sketch lists (hundreds
    of floats that would otherwise draw most of the edits)."""
    out = [prefix]
    if prefix and prefix[-1] == "first_layer_sketch":
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@SLOW_OK
@given(data=st.data())
def test_fuzzed_manifests_load_and_steer_or_fail_in_one_line(setup, data):
    path = _fresh_copy(setup)
    raw = json.loads((path / MANIFEST).read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        where = data.draw(st.sampled_from(_paths(raw)), label="where")
        value = data.draw(EDGE_VALUES | json_values, label="value")
        if not where:
            raw = value if data.draw(st.booleans(), label="replace whole") else raw
            continue
        parent = raw
        for key in where[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = value
    if isinstance(raw, dict) and data.draw(st.booleans(), label="reseal"):
        raw["manifest_sha256"] = manifest_digest(raw)  # reach the field checks behind the digest
    (path / MANIFEST).write_text(json.dumps(raw))
    _load_and_steer(setup, path)


@SLOW_OK
@given(data=st.data())
def test_flipped_or_truncated_tensor_files_fail_in_one_line(setup, data):
    path = _fresh_copy(setup)
    blob = bytearray((path / TENSORS).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        if blob:
            i = data.draw(st.integers(0, len(blob) - 1), label="byte")
            blob[i] ^= data.draw(st.integers(1, 255), label="mask")
    (path / TENSORS).write_bytes(bytes(blob))
    if data.draw(st.booleans(), label="reseal"):  # a forger who also fixed both digests
        raw = json.loads((path / MANIFEST).read_text())
        raw["tensors_sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
        raw["manifest_sha256"] = manifest_digest(raw)
        (path / MANIFEST).write_text(json.dumps(raw))
    _load_and_steer(setup, path)


@SLOW_OK
@given(lines=st.lists(st.one_of(json_values.map(json.dumps), st.text(max_size=40),
                                st.binary(max_size=40).map(lambda b: b.decode("latin-1"))), max_size=6),
       labelled=st.booleans())
def test_fuzzed_data_lines_are_rows_or_one_line_errors(setup, lines, labelled):
    path = setup["root"] / "rows.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    try:
        rows = read_jsonl(path, labelled=labelled)
    except CrvlmError as exc:
        _one_line(exc)
        assert str(path) in str(exc)
        return
    assert all(r.question.strip() for r in rows)


@SLOW_OK
@given(fields=st.dictionaries(st.sampled_from(["name", "subject", "in_scope", "out_of_scope", "test", "seed",
                                               "refusal_instruction", "refusal_message", "validation_fraction",
                                               "description", "refusal_prefix", "x"]), json_values, max_size=8))
def test_fuzzed_policies_load_or_fail_in_one_line(setup, fields):
    folder = setup["root"] / "policy"
    folder.mkdir(exist_ok=True)
    (folder / "policy.yaml").write_text(json.dumps(fields))  # JSON is YAML
    try:
        Policy.load(folder / "policy.yaml").load_data()
    except CrvlmError as exc:
        _one_line(exc)


CLI_WORDS = ["inspect", "verify", "eval", "generate", "rejudge", "plugins", "build-bundle", "--model", "--bundle",
             "--policy", "--out", "--device", "--dtype", "--json", "--overwrite", "--band", "--strength", "--locator",
             "--gate-features", "--max-new-tokens", "--help", "smollm2-missing", "cpu", "cuda:0", "banana", "float16",
             "a,b", "-1", "0", "3", "nan", "fixed", "[/x]", "", "--", "last+question", "{bundle}", "{model}",
             "{nowhere}", "{file}"]


@SLOW_OK
@given(words=st.lists(st.sampled_from(CLI_WORDS), min_size=1, max_size=7))
def test_random_command_lines_never_print_a_traceback(setup, tiny_llama_dir, words):
    (setup["root"] / "a-file").write_text("x")
    fill = {"{bundle}": str(setup["original"]), "{model}": str(tiny_llama_dir),
            "{nowhere}": str(setup["root"] / "nowhere"), "{file}": str(setup["root"] / "a-file")}
    args = [fill.get(w, w) for w in words]
    if "build-bundle" in args and "--policy" in args:
        args.remove("--policy")  # no real build: the vocabulary holds no policy, keep it that way
    result = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    assert result.exit_code in EXIT_CODES, (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: {type(result.exception).__name__}: {result.exception}")
