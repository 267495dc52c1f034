"""Bundles round-trip bit-exactly and every kind of damage is refused with a precise message."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_bundle, write_manifest, write_tensors

from crvlm_plugins.gates import AlwaysGate
from crvlm_sdk import Bundle, BundleError, BundleWarning, CrvlmError, adapter_for, hookimpl, load_model
from crvlm_sdk.bundle.manifest import MANIFEST, TENSORS


def edit_manifest(path, **changes) -> None:
    """Rewrite the bundle's manifest with top-level ``changes`` (None deletes a key)."""
    raw = json.loads((path / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    write_manifest(path, raw)


@pytest.fixture
def saved(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 2, 3), gate_layer=0)
    path = bundle.save(tmp_path / "bundle")
    return bundle, path, adapter


def test_roundtrip_is_bit_exact(saved):
    bundle, path, adapter = saved
    loaded = Bundle.load(path, adapter=adapter)
    assert loaded.manifest == bundle.manifest
    assert loaded.vectors.keys() == bundle.vectors.keys()
    for layer, vec in bundle.vectors.items():
        assert torch.equal(loaded.vectors[layer], vec)
    for name, tensor in bundle.gate_tensors[0].items():
        assert torch.equal(loaded.gate_tensors[0][name], tensor)
    h = {0: torch.randn(5, adapter.hidden_size)}
    assert torch.equal(loaded.gate().score(h), bundle.gate().score(h))
    assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"], "no temporary files left behind"


def test_flipped_byte_in_tensors_is_refused(saved):
    _, path, _ = saved
    data = bytearray((path / TENSORS).read_bytes())
    data[-3] ^= 0x01
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tensors\.safetensors: sha256 .* does not match field `tensors_sha256`"):
        Bundle.load(path)


@pytest.mark.parametrize("name", [MANIFEST, TENSORS])
def test_missing_file_is_refused(saved, name):
    _, path, _ = saved
    (path / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is missing"):
        Bundle.load(path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        Bundle.load(tmp_path / "nope")


def test_malformed_json_is_refused(saved):
    _, path, _ = saved
    (path / MANIFEST).write_text('{"format_version": "1.0",')
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON \(line 1"):
        Bundle.load(path)


def test_wrong_field_type_names_the_field(saved):
    _, path, _ = saved
    gate = json.loads((path / MANIFEST).read_text())["gate"]
    edit_manifest(path, gate={**gate, "layers": ["deep"]})
    with pytest.raises(BundleError, match=r"field `gate\.layers\.0`"):
        Bundle.load(path)


def test_format_1_2_gate_at_one_layer_still_loads(saved):
    bundle, path, adapter = saved
    gate = json.loads((path / MANIFEST).read_text())["gate"]
    old = {"type": gate["type"], "layer": gate["layers"][0], "params": gate["params"], "config": gate["configs"][0]}
    edit_manifest(path, format_version="1.2", gate=old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        loaded = Bundle.load(path, adapter=adapter)
    assert loaded.manifest.gate == bundle.manifest.gate
    h = {0: torch.randn(5, adapter.hidden_size)}
    assert torch.equal(loaded.gate().score(h), bundle.gate().score(h))


def test_gate_read_at_several_layers_round_trips(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(3,), gate_layer=(0, 2))
    path = bundle.save(tmp_path / "b")
    loaded = Bundle.load(path, adapter=adapter)
    assert loaded.manifest.gate.layers == [0, 2] and len(loaded.manifest.gate.configs) == 2
    assert sorted(loaded.gate_tensors) == [0, 2]
    for layer in (0, 2):
        for name, tensor in bundle.gate_tensors[layer].items():
            assert torch.equal(loaded.gate_tensors[layer][name], tensor)
    h = {0: torch.randn(5, adapter.hidden_size), 2: torch.randn(5, adapter.hidden_size)}
    assert torch.equal(loaded.gate().score(h), bundle.gate().score(h))


def test_gate_tensors_missing_a_layer_are_refused(tiny_llama, tmp_path):
    _, _, adapter = tiny_llama
    path = make_bundle(adapter, layers=(3,), gate_layer=(0, 2)).save(tmp_path / "b")
    gate = json.loads((path / MANIFEST).read_text())["gate"]
    edit_manifest(path, gate={**gate, "layers": [0, 1, 2], "configs": [*gate["configs"], gate["configs"][0]]})
    with pytest.raises(BundleError, match=r"gate tensors \[\] at layer 1 but field `gate\.params` says"):
        Bundle.load(path)


def test_missing_field_names_the_field(saved):
    _, path, _ = saved
    edit_manifest(path, alpha=None)
    with pytest.raises(BundleError, match=r"field `alpha`: Field required"):
        Bundle.load(path)


def test_layers_disagreeing_with_tensors_is_refused(saved):
    _, path, _ = saved
    edit_manifest(path, layers=[1, 2])
    with pytest.raises(BundleError, match=r"vectors for layers \[1, 2, 3\] but field `layers` says \[1, 2\]"):
        Bundle.load(path)


def test_newer_major_format_is_refused(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="2.0")
    with pytest.raises(BundleError, match=r"bundle format 2\.0 is newer"):
        Bundle.load(path)


def test_newer_minor_format_with_unknown_keys_warns(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="1.7", shiny_new_field={"x": 1})
    with pytest.warns(BundleWarning, match=r"unknown manifest keys \['shiny_new_field'\] \(written by a newer crvlm\)"):
        Bundle.load(path)


def test_format_1_0_bundle_without_decode_steps_steers_every_token(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="1.0", decode_steps=None)  # None deletes the key
    assert "decode_steps" not in json.loads((path / MANIFEST).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        assert Bundle.load(path).manifest.decode_steps is None


def test_response_settings_round_trip(tiny_llama, tmp_path):
    from crvlm_sdk.bundle.manifest import ResponseSpec

    _, _, adapter = tiny_llama
    spec = ResponseSpec(opening="I'm sorry, but", stop_sentences=1, message="No.", threshold=0.6)
    path = make_bundle(adapter).replaced(response=spec).save(tmp_path / "b")
    assert Bundle.load(path).manifest.response == spec


def test_format_1_1_bundle_without_response_steers_only(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="1.1", response=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        spec = Bundle.load(path).manifest.response
    assert (spec.mode, spec.opening, spec.stop_sentences, spec.shapes) == ("steer", "", None, False)


def test_template_without_message_is_a_field_error(saved):
    _, path, _ = saved
    edit_manifest(path, response={"mode": "template", "message": ""})
    with pytest.raises(BundleError, match="field `response`: Value error, template mode needs a non-empty `message`"):
        Bundle.load(path)


def test_unknown_response_setting_from_a_newer_minor_format_warns(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="1.9", response={"mode": "steer", "tone": "warm"})
    with pytest.warns(BundleWarning, match=r"\['response.tone'\]"):
        Bundle.load(path)


def test_negative_decode_steps_is_a_field_error(saved):
    _, path, _ = saved
    edit_manifest(path, decode_steps=-1)
    with pytest.raises(BundleError, match="field `decode_steps`"):
        Bundle.load(path)


def test_a_bundle_that_steers_no_token_is_a_field_error(saved):
    _, path, _ = saved
    edit_manifest(path, decode_steps=0, steer_prompt=False)
    with pytest.raises(BundleError, match="`steer_prompt` false with `decode_steps` 0 steers no token"):
        Bundle.load(path)


def test_format_1_4_bundle_steers_its_prompt(saved):
    _, path, _ = saved
    edit_manifest(path, format_version="1.4", steer_prompt=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        assert Bundle.load(path).manifest.steer_prompt is True


def test_known_keys_load_without_warning(saved):
    _, path, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        Bundle.load(path)


def test_bundle_for_another_model_is_refused(saved, tiny_llama_other_dir):
    _, path, _ = saved
    model, processor = load_model(tiny_llama_other_dir)
    other = adapter_for(model, processor)
    with pytest.raises(BundleError, match="was built for another model: first-layer weights: the model"):
        Bundle.load(path, adapter=other)


def test_bundle_for_another_architecture_is_refused(saved, tiny_llava_dir):
    _, path, _ = saved
    model, processor = load_model(tiny_llava_dir)
    with pytest.raises(BundleError, match="model_type: bundle has 'llama', model has 'llava'"):
        Bundle.load(path, adapter=adapter_for(model, processor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fingerprint_is_dtype_independent(tiny_llama, dtype):
    """fp32 -> fp16 -> bf16 rounds 545 of the tiny Llama's first-layer weights differently from
    fp32 -> bf16, so an exact hash of rounded weights refused fp16 copies of the same model."""
    model, _, adapter = tiny_llama
    before = adapter.fingerprint()
    model.to(dtype)
    try:
        assert before.differences(adapter.fingerprint()) == []
        assert adapter.fingerprint().differences(before) == []
    finally:
        model.to(torch.float32)


def test_a_float32_bundle_loads_on_a_float16_model(saved):
    _, path, adapter = saved
    adapter.model.to(torch.float16)
    try:
        assert Bundle.load(path, adapter=adapter).manifest.backbone.first_layer_sketch
    finally:
        adapter.model.to(torch.float32)


def test_fingerprint_tells_changed_weights_apart(tiny_llama):
    _, _, adapter = tiny_llama
    before = adapter.fingerprint()
    weight = adapter.decoder_layers()[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.05)  # a fine-tune that moved one matrix by 5%
        diffs = before.differences(adapter.fingerprint())
        assert len(diffs) == 1 and diffs[0].startswith("first-layer weights:"), diffs
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_fingerprint_of_an_older_bundle_is_compared_by_hash(tiny_llama):
    _, _, adapter = tiny_llama
    found = adapter.fingerprint()
    old = found.model_copy(update={"first_layer_sketch": None})
    assert old.differences(found) == []
    changed = old.model_copy(update={"first_layer_sha256": "0" * 64})
    assert [d.split(":")[0] for d in changed.differences(found)] == ["first_layer_sha256"]


def test_nan_vector_is_refused(tiny_llama):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter)
    bundle.vectors[1][0] = float("nan")
    with pytest.raises(BundleError, match=r"tensor `vector\.1` contains NaN"):
        bundle.check("x")


def test_save_refuses_to_overwrite_unless_asked(saved):
    bundle, path, _ = saved
    with pytest.raises(BundleError, match="already exists"):
        bundle.save(path)
    bundle.manifest.alpha = 7.5
    bundle.save(path, overwrite=True)
    assert Bundle.load(path).manifest.alpha == 7.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"]


def test_failed_save_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    _, _, adapter = tiny_llama
    bundle = make_bundle(adapter)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("crvlm_sdk.bundle.manifest.Manifest.model_dump_json", boom)
    with pytest.raises(OSError, match="disk full"):
        bundle.save(tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_writes_a_model_card_and_loads_like_peft(tiny_llama, tiny_llama_dir, tmp_path):
    from crvlm_sdk import Steerer

    model, processor, adapter = tiny_llama
    bundle = make_bundle(adapter, layers=(1, 2), gate_layer=(0, 3)).replaced(
        validation={"srs": 0.95, "brs": 0.02, "n_in": 40, "n_out": 40, "judge": "strict", "gate_caught": 0.97,
                    "gate_flagged": 0.01})
    assert bundle.manifest.base_model_name_or_path == str(tiny_llama_dir)
    path = bundle.save_pretrained(tmp_path / "card")
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: crvlm\nbase_model: ")
    for expected in ("# crvlm refusal bundle: test", "| gate | probe at layers 0, 3 |", "layers [1, 2]",
                     "clean refusals 0.950", "Steerer.from_pretrained(model, \"card\", processor)"):
        assert expected in card, expected
    loaded = Bundle.from_pretrained(path, adapter=adapter)
    assert loaded.manifest == bundle.manifest
    steerer = Steerer.from_pretrained(model, path, processor)
    assert steerer.bundle_names == ["test"]
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "manifest.json", "tensors.safetensors"]


# -- hardening (issue 14 #4, #5): values and shapes that reached the model as NaN or a raw error


def _raw(path):
    return json.loads((path / MANIFEST).read_text())


@pytest.mark.parametrize(("key", "value", "message"), [
    ("threshold", float("nan"), "gate config `threshold` must be a finite number"),
    ("temperature", "warm", "gate config `temperature` must be a finite number"),
    ("temperature", 0.0, "temperature must be > 0"),
])
def test_bad_gate_settings_are_refused_with_exit_3(saved, key, value, message):
    _, path, _ = saved
    raw = _raw(path)
    raw["gate"]["configs"][0][key] = value
    write_manifest(path, raw)
    with pytest.raises(BundleError, match=message):
        Bundle.load(path).gate()


def test_an_all_zero_gate_std_is_refused(saved):
    _, path, adapter = saved
    write_tensors(path, **{"gate.std": torch.zeros(adapter.hidden_size)})
    with pytest.raises(BundleError, match="`std` has entries <= 0"):
        Bundle.load(path).gate()


def test_a_wrong_shaped_gate_weight_is_refused_before_any_forward(saved):
    _, path, adapter = saved
    write_tensors(path, **{"gate.weight": torch.zeros(adapter.hidden_size + 3)})
    with pytest.raises(BundleError, match=r"probe gate tensors have shapes weight \(35,\)"):
        Bundle.load(path).gate()


@pytest.mark.parametrize("case", ["huge vector", "huge alpha"])
def test_absurd_steering_is_refused_at_load(saved, case):
    _, path, adapter = saved
    if case == "huge vector":
        write_tensors(path, **{"vector.1": torch.full((adapter.hidden_size,), 3e38)})
    else:
        raw = _raw(path)
        raw["alpha"] = 1e30
        write_manifest(path, raw)
    with pytest.raises(BundleError, match=r"adds up to .* to one activation"):
        Bundle.load(path)


class _OddGate(AlwaysGate):
    """A plugin gate whose output is set per test."""

    name = "odd"
    output = "nan"

    def score(self, h):
        rows = h.shape[0]
        return {"nan": torch.full((rows,), float("nan")), "two": torch.full((rows,), 2.0),
                "column": torch.zeros(rows, 1), "scalar": torch.tensor(0.5)}[self.output]


@pytest.mark.parametrize(("output", "message"), [
    ("nan", r"scores \[nan, nan\], not probabilities"),
    ("two", r"scores \[2.0, 2.0\], not probabilities"),
    ("column", r"returned \(2, 1\) for 2 rows"),
    ("scalar", r"returned \(\) for 2 rows"),
])
def test_a_plugin_gate_with_bad_output_is_refused_when_the_steerer_is_made(tiny_llama, output, message):
    from crvlm_sdk import PluginManager, Steerer

    _, _, adapter = tiny_llama
    manager = PluginManager()
    manager.load_builtins()

    class Plugin:
        @staticmethod
        @hookimpl
        def crvlm_gates():
            return [_OddGate]

    manager.register(Plugin(), name="odd-plugin")
    _OddGate.output = output
    bundle = make_bundle(adapter, gate=_OddGate(), gate_layer=0)
    with pytest.raises(BundleError, match=message):
        Steerer(adapter, [bundle], plugins=manager)


def test_a_gate_that_turns_nan_on_some_rows_steers_nothing_there(tiny_llama):
    """Validation at construction sees a probe batch; at run time a NaN score counts as 0."""
    from crvlm_sdk.bundle.gates import LayerGates

    class Flaky(AlwaysGate):
        name = "flaky"

        def score(self, h):
            return torch.where(h[:, 0] > 1e9, torch.ones(h.shape[0]), torch.full((h.shape[0],), float("nan")))

    gates = LayerGates({0: Flaky()})
    p = gates.read(0, torch.zeros(3, 4), torch.zeros(3))
    assert p.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(CrvlmError, match=r"returned \(3, 1\) for 3 rows"):
        LayerGates({0: _column_gate()}).read(0, torch.zeros(3, 4), torch.zeros(3))


def _column_gate():
    gate = _OddGate()
    gate.output = "column"
    return gate
