"""Adapter selection, layout checks and prompt construction."""

from __future__ import annotations

import pytest
import torch

from crvlm_adapters.causal_lm import CausalLMAdapter
from crvlm_adapters.llava import LlavaAdapter
from crvlm_sdk import AdapterError, CrvlmError, adapter_for, load_model


def test_automatic_selection(tiny_llama_dir, tiny_llava_dir):
    for directory, expected in ((tiny_llama_dir, CausalLMAdapter), (tiny_llava_dir, LlavaAdapter)):
        model, processor = load_model(directory)
        assert type(adapter_for(model, processor)) is expected


def test_llava_layers_are_the_language_decoder(tiny_llava_dir):
    model, processor = load_model(tiny_llava_dir)
    adapter = adapter_for(model, processor)
    layers = adapter.decoder_layers()
    assert layers is model.model.language_model.layers
    assert adapter.num_layers == model.config.text_config.num_hidden_layers
    assert adapter.hidden_size == model.config.text_config.hidden_size
    vision_modules = set(map(id, model.model.vision_tower.modules()))
    assert not any(id(m) in vision_modules for layer in layers for m in layer.modules())


def test_unknown_model_lists_installed_adapters():
    class Mystery(torch.nn.Module):
        pass

    with pytest.raises(AdapterError, match=r"no adapter claims Mystery; installed adapters: llava .*causal-lm"):
        adapter_for(Mystery(), None)


def test_forced_adapter_with_wrong_layout_says_what_was_expected(tiny_llama_dir):
    model, processor = load_model(tiny_llama_dir)
    with pytest.raises(AdapterError, match=r"expected LlamaForCausalLM\.model\.language_model\.layers, "
                                          r"but LlamaForCausalLM\.model has no 'language_model'"):
        adapter_for(model, processor, "llava")


def test_images_on_text_only_model_are_refused(tiny_llama):
    _, _, adapter = tiny_llama
    from PIL import Image

    with pytest.raises(AdapterError, match="text-only"):
        adapter.build_prompts(["What is this?"], [Image.new("RGB", (8, 8))])


def test_missing_image_file_names_the_file(tiny_llava_dir, tmp_path):
    model, processor = load_model(tiny_llava_dir)
    adapter = adapter_for(model, processor)
    with pytest.raises(CrvlmError, match=r"image not found: .*nope\.png"):
        adapter.build_prompts(["What is this?"], [tmp_path / "nope.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CrvlmError, match=r"unreadable image .*bad\.png"):
        adapter.build_prompts(["What is this?"], [bad])


def test_system_message_and_generation_prompt(tiny):
    _, _, adapter = tiny
    text = adapter.render_prompt("Hello?", has_image=False, system="Only talk about cooking.")
    assert "Only talk about cooking." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_image_tokens_expand_to_patch_count(tiny_llava_dir):
    model, processor = load_model(tiny_llava_dir)
    adapter = adapter_for(model, processor)
    from PIL import Image

    batch = adapter.build_prompts(["What?", "What?"], [Image.new("RGB", (64, 64)), None])
    image_id = model.config.image_token_id
    counts = (batch.inputs["input_ids"] == image_id).sum(1).tolist()
    assert counts == [16, 0]  # (32 / 8)² patches, CLS dropped
    assert batch.inputs["pixel_values"].shape[0] == 1


def test_fingerprint_is_stable_across_save_and_load(tiny_llama_dir, tmp_path):
    model, processor = load_model(tiny_llama_dir)
    first = adapter_for(model, processor).fingerprint()
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again, proc = load_model(tmp_path / "copy")
    assert adapter_for(again, proc).fingerprint() == first


def test_load_model_errors(tmp_path):
    from crvlm_sdk import ModelLoadError

    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(tmp_path, gguf_file="x.gguf")
