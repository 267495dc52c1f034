"""`crvlm export llamacpp`: a bundle's additive steering as a llama.cpp control vector."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import make_bundle, needs_smollm2
from typer.testing import CliRunner

from crvlm_plugins.gates import AlwaysGate
from crvlm_sdk.bundle.manifest import ResponseSpec
from crvlm_sdk.cli.app import app
from crvlm_sdk.errors import ExportError
from crvlm_sdk.export.llamacpp import export_llamacpp, read_control_vector, write_control_vector

runner = CliRunner()


def test_each_direction_is_alpha_times_the_bundles_vector(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 3), alpha=2.5, decode_steps=4)
    bundle.save(tmp_path / "bundle")
    written = export_llamacpp(tmp_path / "bundle", tmp_path / "cv.gguf")
    meta, directions = read_control_vector(written.path)
    assert sorted(directions) == [1, 3] == written.layers
    for layer, vector in bundle.vectors.items():
        np.testing.assert_array_equal(directions[layer], (2.5 * vector).numpy().astype(np.float32))
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama"
    assert meta["controlvector.layer_count"] == 2
    assert meta["crvlm.bundle"] == "test"
    assert meta["crvlm.bundle_tensors_sha256"] == bundle.manifest.tensors_sha256 != ""
    assert [d.split(":")[0] for d in meta["crvlm.dropped"]] == ["the gate", "decode_steps 4"]
    assert written.dropped == meta["crvlm.dropped"]


def test_an_always_on_bundle_without_step_limit_loses_nothing(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter, gate=AlwaysGate(), gate_layer=0)
    written = export_llamacpp(bundle, tmp_path / "cv.gguf")
    assert written.dropped == []
    assert "crvlm.dropped" not in read_control_vector(written.path)[0]


def _template(bundle):
    bundle.manifest.response = ResponseSpec(mode="template", message="No.")
    return bundle


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: make_bundle(a, operator="rotation"), "'rotation' operator"),
    (lambda a: make_bundle(a, layers=(0, 1)), "steers layer 0"),
    (lambda a: _template(make_bundle(a)), "fixed message"),
])
def test_what_llamacpp_cannot_run_is_refused_and_nothing_is_written(tiny_llama, tmp_path, change, message):
    _, _, adapter = tiny_llama
    with pytest.raises(ExportError, match=message):
        export_llamacpp(change(adapter), tmp_path / "cv.gguf")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_control_vector_crvlm_wrote(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    first, second = make_bundle(adapter, seed=0), make_bundle(adapter, seed=1)
    target = tmp_path / "cv.gguf"
    export_llamacpp(first, target)
    with pytest.raises(ExportError, match="already exists"):
        export_llamacpp(second, target)
    export_llamacpp(second, target, overwrite=True)
    np.testing.assert_array_equal(read_control_vector(target)[1][1], (2.0 * second.vectors[1]).numpy())

    model = tmp_path / "model.gguf"  # a control vector crvlm did not write
    write_control_vector(model, {1: np.ones(4, dtype=np.float32)})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for other in (model, notes, tmp_path):
        before = other.read_bytes() if other.is_file() else None
        with pytest.raises(ExportError, match=r"not a llama\.cpp control vector crvlm wrote"):
            export_llamacpp(second, other, overwrite=True)
        assert (other.read_bytes() if other.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.gguf", "model.gguf", "notes.txt"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tiny_llama, tmp_path, monkeypatch):
    _, _, adapter = tiny_llama

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_llamacpp(make_bundle(adapter), tmp_path / "cv.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_warns_about_what_is_dropped_and_exits_7_on_what_cannot_be_exported(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    make_bundle(adapter, decode_steps=8).save(tmp_path / "b")
    make_bundle(adapter, operator="rotation").save(tmp_path / "rot")
    ok = runner.invoke(app, ["export", "llamacpp", str(tmp_path / "b"), str(tmp_path / "cv.gguf")])
    assert ok.exit_code == 0, ok.output
    assert "--control-vector" in ok.stdout
    assert "warning" in ok.stderr and "the gate" in ok.stderr and "decode_steps 8" in ok.stderr
    again = runner.invoke(app, ["export", "llamacpp", str(tmp_path / "b"), str(tmp_path / "cv.gguf")])
    assert again.exit_code == 7 and "already exists" in again.stderr
    rotation = runner.invoke(app, ["export", "llamacpp", str(tmp_path / "rot"), str(tmp_path / "r.gguf")])
    assert rotation.exit_code == 7 and "--operator additive" in rotation.stderr
    missing = runner.invoke(app, ["export", "llamacpp", str(tmp_path / "nope"), str(tmp_path / "n.gguf")])
    assert missing.exit_code == 3
    assert not (tmp_path / "r.gguf").exists() and not (tmp_path / "n.gguf").exists()


LLAMA_COMPLETION = shutil.which("llama-completion") or os.environ.get("CRVLM_LLAMA_COMPLETION")


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(LLAMA_COMPLETION is None, reason="no llama.cpp binary: put llama-completion on PATH (or set "
                                                     "CRVLM_LLAMA_COMPLETION) to run the llama.cpp end-to-end test")
def test_llamacpp_with_the_exported_vector_says_what_the_steerer_says(tmp_path):
    """Greedy text from llama.cpp with ``--control-vector`` equals the Steerer's with the bundle
    (an always-on gate and no step limit: what the file carries), on float32 weights; the same
    vector filed one layer up does not (the layer convention is what is tested).

    llama.cpp sums in another order than torch: a strong random push that leaves two tokens
    nearly tied can still flip one after a few tokens, so the push here is moderate.
    """
    from crvlm_sdk.models.loading import find_smollm2_gguf, load_model
    from crvlm_sdk.plugins.adapters import adapter_for
    from crvlm_sdk.steering.steerer import Steerer

    model, tokenizer = load_model("smollm2")
    adapter = adapter_for(model, tokenizer)
    bundle = make_bundle(adapter, gate=AlwaysGate(), gate_layer=0, layers=(6,), alpha=8.0)
    cv = export_llamacpp(bundle, tmp_path / "cv.gguf").path
    _, directions = read_control_vector(cv)
    shifted = tmp_path / "shifted.gguf"  # what an off-by-one layer convention would write
    write_control_vector(shifted, {layer + 1: d for layer, d in directions.items()})
    steerer = Steerer(adapter, [bundle])
    questions = ["What is the capital of France?", "How do I boil an egg?", "Name a famous painter."]
    plain = steerer.generate(questions, steer=False, max_new_tokens=16)
    steered = steerer.generate(questions, max_new_tokens=16)
    assert steered != plain, "the vector must change an answer, or the comparison proves nothing"
    weights = _float32_copy(find_smollm2_gguf(), tmp_path / "smollm2-f32.gguf")
    run = _llamacpp_runner(weights)
    prompts = [adapter.render_prompt(q, has_image=False, system=None) for q in questions]
    assert [run(p, None) for p in prompts] == plain
    assert [run(p, cv) for p in prompts] == steered
    assert [run(p, shifted) for p in prompts] != steered


def _float32_copy(source: Path, target: Path) -> Path:
    """The GGUF with every tensor dequantised to float32, as transformers loads it: llama.cpp
    multiplies quantised weights by 8-bit-quantised activations, which changes a 135M model's
    greedy text on its own, with or without steering."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        writer.add_key_value(name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _llamacpp_runner(weights: Path):
    def run(prompt: str, control_vector: Path | None) -> str:
        # -c 512 and --no-warmup: a 2-core CI-like machine needs no more (and warm-up crashed there)
        command = [LLAMA_COMPLETION, "-m", str(weights), "-p", prompt, "-n", "16", "--temp", "0", "--seed", "0",
                   "-no-cnv", "--no-display-prompt", "--simple-io", "-t", "2", "-c", "512", "--no-warmup"]
        if control_vector is not None:
            command += ["--control-vector", str(control_vector)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
        return done.stdout.strip().removesuffix("[end of text]").strip()

    return run
