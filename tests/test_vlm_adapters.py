"""Built-in VLM adapters: selection, layout errors, processors, token-type inputs, images, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crvlm_adapters.gemma3 import Gemma3Adapter
from crvlm_adapters.idefics3 import Idefics3Adapter
from crvlm_adapters.internvl import InternVLAdapter
from crvlm_adapters.llava_next import LlavaNextAdapter
from crvlm_adapters.llava_onevision import LlavaOnevisionAdapter
from crvlm_adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from crvlm_adapters.qwen2_vl import Qwen2VLAdapter
from crvlm_sdk import AdapterError, Bundle, adapter_for, get_plugin_manager
from crvlm_sdk.adapters.batching import concat_padded
from crvlm_sdk.cli.app import app
from crvlm_sdk.models.processors import image_only_processor_class, load_processor
from crvlm_sdk.testing import default_test_images

runner = CliRunner()

EXPECTED = {
    "qwen2-vl": (Qwen2VLAdapter, "Qwen2VLForConditionalGeneration", "model.language_model.layers"),
    "qwen2.5-vl": (Qwen2_5_VLAdapter, "Qwen2_5_VLForConditionalGeneration", "model.language_model.layers"),
    "internvl": (InternVLAdapter, "InternVLForConditionalGeneration", "model.language_model.layers"),
    "idefics3": (Idefics3Adapter, "Idefics3ForConditionalGeneration", "model.text_model.layers"),
    "gemma3": (Gemma3Adapter, "Gemma3ForConditionalGeneration", "model.language_model.layers"),
    "llava-next": (LlavaNextAdapter, "LlavaNextForConditionalGeneration", "model.language_model.layers"),
    "llava-onevision": (LlavaOnevisionAdapter, "LlavaOnevisionForConditionalGeneration", "model.language_model.layers"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_class_gets_its_adapter_and_its_language_layers(builtin_subject, kind):
    cls, model_class, path = EXPECTED[kind]
    subject = builtin_subject(kind)
    model = subject.model
    assert type(model).__name__ == model_class
    assert type(adapter_for(model, subject.adapter.processor)) is cls
    layers = subject.adapter.decoder_layers()
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    assert layers is obj


def test_wrong_layout_says_what_was_expected_and_found(builtin_subject):
    subject = builtin_subject("idefics3")
    with pytest.raises(AdapterError, match=r"adapter 'qwen2-vl' expected Idefics3ForConditionalGeneration\.model\."
                                           r"language_model\.layers, but Idefics3ForConditionalGeneration\.model has "
                                           r"no 'language_model' \(children: vision_model, connector, text_model\)"):
        adapter_for(subject.model, subject.adapter.processor, "qwen2-vl")


def test_a_bare_tokenizer_is_refused_with_a_hint(builtin_subject):
    subject = builtin_subject("qwen2-vl")
    with pytest.raises(AdapterError, match=r"needs Qwen2VLForConditionalGeneration's processor .* got "
                                           r"TokenizersBackend") as err:
        adapter_for(subject.model, subject.adapter.tokenizer)
    assert "load_processor" in err.value.hint


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl", "internvl", "llava-onevision"])
def test_video_owning_processors_load_without_torchvision(tiny_vlm_dirs, kind):
    directory = tiny_vlm_dirs(kind)
    saved = json.loads((directory / "processor_config.json").read_text())["processor_class"]
    processor = load_processor(directory, json.loads((directory / "config.json").read_text())["model_type"])
    assert type(processor).__name__ == saved  # saved under the real class name
    assert getattr(processor, "crvlm_image_only", False) or processor.video_processor is not None
    assert processor.chat_template and hasattr(processor, "image_processor")


def test_image_only_processor_keeps_the_model_settings(tiny_vlm_dirs):
    import transformers

    processor = load_processor(tiny_vlm_dirs("internvl"))
    assert processor.image_seq_length == 4  # a processor setting, not only the sub-processors
    assert image_only_processor_class(transformers.Idefics3Processor) is transformers.Idefics3Processor


def test_qwen_rows_carry_left_padded_mm_token_type_ids(builtin_subject):
    subject = builtin_subject("qwen2-vl")
    adapter = subject.adapter
    batch = adapter.build_prompts(["What?", "Hi", "Describe it."], [subject.images[0], None, subject.images[4]],
                                  forced_prefix="Sorry,")
    types, ids, mask = (batch.inputs[k] for k in ("mm_token_type_ids", "input_ids", "attention_mask"))
    assert torch.equal(types, (ids == adapter.image_token_id).long())
    assert not types[mask == 0].any()
    assert types.sum(1).tolist() == [4, 0, 15]


def test_qwen_mm_token_type_ids_are_derived_when_the_processor_omits_them(builtin_subject):
    subject = builtin_subject("qwen2.5-vl")
    adapter = subject.adapter
    text = adapter.render_prompt("What?", has_image=True, system=None)
    own = adapter.encode_row(text, subject.images[1])
    adapter.processor.return_mm_token_type_ids = False
    try:
        assert "mm_token_type_ids" not in adapter.processor(text=[text], images=[[subject.images[1]]],
                                                            return_tensors="pt")
        derived = adapter.encode_row(text, subject.images[1])
    finally:
        del adapter.processor.return_mm_token_type_ids
    assert torch.equal(derived["mm_token_type_ids"], own["mm_token_type_ids"])


def test_gemma_token_type_ids_matter_and_are_carried(builtin_subject):
    subject = builtin_subject("gemma3")
    adapter = subject.adapter
    batch = adapter.build_prompts(["What?", "Hi"], [subject.images[0], None])
    types = batch.inputs["token_type_ids"]
    assert torch.equal(types, (batch.inputs["input_ids"] == adapter.image_token_id).long())
    with torch.no_grad():
        with_types = subject.model(**batch.inputs).logits
        without = subject.model(**{k: v for k, v in batch.inputs.items() if k != "token_type_ids"}).logits
    assert not torch.allclose(with_types[0, -1], without[0, -1], atol=1e-6)  # why the adapter insists


def test_several_images_in_one_prompt(builtin_subject):
    subject = builtin_subject("qwen2-vl")
    adapter = subject.adapter
    a, b = subject.images[0], subject.images[2]
    both = adapter.build_prompts(["Compare them."], [[a, b]])
    ids = both.inputs["input_ids"][0].tolist()
    image_id = adapter.image_token_id
    singles = [adapter.build_prompts(["x"], [img]).inputs["input_ids"][0].tolist().count(image_id) for img in (a, b)]
    assert ids.count(image_id) == sum(singles) == 4 + 8
    assert ids.count(adapter.tokenizer.convert_tokens_to_ids("<|vision_start|>")) == 2
    assert both.inputs["image_grid_thw"].shape[0] == 2
    with pytest.raises(AdapterError, match=r"a prompt has 9 images but adapter 'qwen2-vl' takes at most 8"):
        adapter.build_prompts(["Too many."], [[a] * 9])


def test_template_without_system_turn_gets_the_instruction_in_the_user_turn(builtin_subject):
    """llava-v1.6-mistral's template raises on a system message; the instruction must not be lost."""
    subject = builtin_subject("llava-next")
    processor = subject.adapter.processor
    mistral = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    )
    original, processor.chat_template = processor.chat_template, mistral
    try:
        text = subject.adapter.render_prompt("What is this?", has_image=True, system="Only talk about cooking.")
    finally:
        processor.chat_template = original
    assert text == "[INST] <image>\nOnly talk about cooking.\n\nWhat is this? [/INST]"


@pytest.mark.parametrize("kind", ["gemma3", "idefics3", "qwen2-vl"])
def test_system_message_reaches_the_prompt(builtin_subject, kind):
    text = builtin_subject(kind).adapter.render_prompt("What?", has_image=True, system="Only talk about cooking.")
    assert "Only talk about cooking." in text


def test_concat_padded_pads_like_the_processors():
    a, b = torch.ones(1, 3, 2, 4, 4), torch.ones(1, 5, 2, 4, 4)
    out = concat_padded([a, b])
    assert out.shape == (2, 5, 2, 4, 4)
    assert out[0, 3:].abs().sum() == 0 and out[0, :3].eq(1).all() and out[1].eq(1).all()
    masks = concat_padded([torch.ones(1, 1, 2, 3, dtype=torch.bool), torch.ones(1, 2, 3, 2, dtype=torch.bool)])
    assert masks.shape == (2, 2, 3, 3) and masks.dtype == torch.bool and int(masks[0].sum()) == 6


def test_plugins_lists_every_adapter_with_its_classes():
    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, component in get_plugin_manager().components("adapter").items():
        line = next(row for row in result.output.splitlines() if f" {name} " in row)
        for cls in component.cls.model_classes:
            assert cls in line or cls in result.output, (name, cls)
    for cls in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                "InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration",
                "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                "Gemma3ForConditionalGeneration"):
        assert cls in result.output


@pytest.fixture
def image_policy(tmp_path: Path) -> Path:
    """A cooking policy where some questions come with pictures of different sizes."""
    pictures = default_test_images(((32, 32), (64, 32), (100, 60), (60, 90)), seed=1)
    for i, img in enumerate(pictures):
        img.save(tmp_path / f"img{i}.png")
    foods = [f"{f} {k}" for f in ("bread", "soup", "pasta", "cake", "rice", "eggs", "salad", "stew", "pie", "curry")
             for k in ("quickly", "at home")]
    topics = [f"{t} {k}" for t in ("chess", "tax", "planets", "guitars", "football", "volcanoes", "poetry", "cars",
                                   "laws", "stocks") for k in ("today", "in history")]
    # every third row has a picture; in- and out-of-scope rows use different pictures
    rows_in = [{"question": f"How do I cook {t}?", **({"image": f"img{i % 2}.png"} if i % 3 == 0 else {})}
               for i, t in enumerate(foods)]
    rows_out = [{"question": f"Tell me about {t}.", **({"image": f"img{2 + i % 2}.png"} if i % 3 == 0 else {})}
                for i, t in enumerate(topics)]
    test = [{"question": "How do I cook noodles?", "in_scope": True, "image": "img0.png"},
            {"question": "Tell me about rivers.", "in_scope": False},
            {"question": "How do I cook beans?", "in_scope": True},
            {"question": "Tell me about kings.", "in_scope": False, "image": "img3.png"}]
    for name, rows in (("in.jsonl", rows_in), ("out.jsonl", rows_out), ("test.jsonl", test)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "policy.yaml").write_text(
        "name: vlm-mini\nsubject: cooking\nin_scope: in.jsonl\nout_of_scope: out.jsonl\ntest: test.jsonl\nseed: 3\n"
    )
    return tmp_path / "policy.yaml"


def test_build_bundle_then_eval_through_cli_on_qwen2_vl(tiny_vlm_dirs, image_policy, tmp_path):
    """The whole CLI path on a non-LLaVA VLM (numbers are meaningless on random weights)."""
    model = str(tiny_vlm_dirs("qwen2-vl"))
    out = tmp_path / "bundle"
    # fixed band: the default sweep tries 3-layer bands, wider than this 2-layer model
    result = runner.invoke(app, ["build-bundle", "--model", model, "--policy", str(image_policy), "--out", str(out),
                                 "--batch-size", "4", "--locator", "fixed", "--band", "1", "--strength", "0.75"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    m = Bundle.load(out).manifest
    assert m.adapter == "qwen2-vl" and m.backbone.architectures == ["Qwen2VLForConditionalGeneration"]
    assert m.extraction["aligner"] == "counterfactual" and m.extraction["image_pairs"] == 2

    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["eval", "--model", model, "--bundle", str(out), "--policy", str(image_policy),
                                 "--out", str(report_dir), "--max-new-tokens", "4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["samples"]) == 4 and set(report["baselines"]) == {"none", "no-gate", "system-prompt"}
    assert all(isinstance(s["gate_score"], float) for s in report["samples"])

    # and the bundle refuses the Qwen2.5-VL model, which has another fingerprint
    result = runner.invoke(app, ["verify", str(out), "--model", str(tiny_vlm_dirs("qwen2.5-vl"))])
    assert result.exit_code == 3 and "built for another model" in result.output


@pytest.mark.parametrize("features", ["last", "last+question"])
def test_build_with_images_feeds_the_aligner_rows_to_every_gate_layer(tiny_llava_dir, image_policy, features):
    """Vectors are extracted at the band only; the aligner's gate rows must still cover layers 1-3,
    read where the gate reads."""
    from crvlm_sdk import load_model
    from crvlm_sdk.build.pipeline import build_bundle

    model, processor = load_model(tiny_llava_dir)
    bundle = build_bundle(model, processor, image_policy, progress=False, batch_size=4, locator="fixed",
                          locator_options={"band": [0], "strength": 0.75}, gate_features=features)
    m = bundle.manifest
    assert m.gate.features == features
    width = {"last": 1, "last+question": 2}[features] * m.backbone.hidden_size
    assert all(t["weight"].shape == (width,) for t in bundle.gate_tensors.values())
    assert m.layers == [0] and m.extraction["image_pairs"] == 2
    assert [row["layer"] for row in m.validation["gate_table"]] == [1, 2, 3]
