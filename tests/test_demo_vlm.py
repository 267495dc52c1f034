"""The demo VLM: assembled offline from the GGUF and the committed vision weights, and it looks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_module, make_bundle, needs_smollm2
from safetensors.torch import load_file

from crvlm_sdk import Bundle, adapter_for, load_model
from crvlm_sdk.demo import vlm as demo_vlm
from crvlm_sdk.errors import BundleError, CrvlmError

pytestmark = needs_smollm2


@pytest.fixture(scope="session")
def demo_dir(fixtures_dir: Path) -> Path:
    return demo_vlm.build_demo_model(fixtures_dir / "demo-vlm")


@pytest.fixture(scope="session")
def demo(demo_dir: Path):
    model, processor = load_model(demo_dir)
    return model, processor


@pytest.fixture(scope="session")
def smollm2():
    return demo_vlm.load_smollm2()


def test_committed_weights_are_small_float16_and_complete() -> None:
    path = demo_vlm.weights_path()
    assert path.stat().st_size <= 20 * 2**20
    state = load_file(str(path))
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert any(k.startswith("vision_tower.") for k in state)
    assert any(k.startswith("multi_modal_projector.") for k in state)
    assert (path.parent / "train_log.txt").read_text().startswith("python scripts/train_demo_vlm.py")


def test_loads_with_the_auto_classes(demo_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(demo_dir)
    processor = AutoProcessor.from_pretrained(demo_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert processor.tokenizer.convert_tokens_to_ids(demo_vlm.IMAGE_TOKEN) == model.config.image_token_id
    assert processor.chat_template


def test_language_model_is_smollm2_unchanged(demo, smollm2) -> None:
    """Text-only logits equal those of the GGUF SmolLM2 over its whole vocabulary."""
    model, _ = demo
    lm, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = lm(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert got.shape[-1] == expected.shape[-1] + 1  # the <image> token
    torch.testing.assert_close(got[..., :-1], expected, rtol=0, atol=1e-4)


def test_training_module_computes_llava_image_features(demo) -> None:
    """What the training script optimised is exactly what the assembled model feeds the LM."""
    model, processor = demo
    training = load_module(Path(__file__).resolve().parents[1] / "scripts" / "train_demo_vlm.py")
    side = training.VisionSide(model.config)
    side.load_state_dict({k: v.float() for k, v in load_file(str(demo_vlm.weights_path())).items()})
    side.eval()
    from crvlm_sdk.demo import shapes

    images = [img for img, _ in shapes.make_scenes(demo_vlm.CHECK_SEED + 99, 3)]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
        got = side(pixels)
    assert got.shape == (3, demo_vlm.IMAGE_TOKENS, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_answers_about_the_picture_and_not_without_it(demo) -> None:
    model, processor = demo
    seen = demo_vlm.check_answers(model, processor, n=24)
    blank = demo_vlm.check_answers(model, processor, n=24, blank=True)
    assert seen["colour"] >= 0.8 and seen["shape"] >= 0.8, seen
    assert blank["colour"] <= 0.5 and blank["shape"] <= 0.5, blank


def test_refuses_to_overwrite(demo_dir: Path) -> None:
    with pytest.raises(CrvlmError, match="already exists"):
        demo_vlm.build_demo_model(demo_dir)


def test_bundle_for_the_demo_vlm_is_refused_by_other_models(demo, smollm2, tmp_path: Path,
                                                            tiny_llava_dir: Path) -> None:
    model, processor = demo
    bundle = make_bundle(adapter_for(model, processor), layers=(6,), gate_layer=3)
    path = bundle.save(tmp_path / "bundle")
    Bundle.load(path, adapter=adapter_for(model, processor))  # its own model is fine
    other, other_processor = load_model(tiny_llava_dir)
    with pytest.raises(BundleError, match="built for another model"):
        Bundle.load(path, adapter=adapter_for(other, other_processor))
    # Same language-model weights, different architecture: SmolLM2 as a plain causal LM.
    lm, tokenizer = smollm2
    with pytest.raises(BundleError, match="built for another model"):
        Bundle.load(path, adapter=adapter_for(lm, tokenizer))


def test_cli_refuses_to_overwrite_with_one_line(demo_dir: Path) -> None:
    from typer.testing import CliRunner

    from crvlm_sdk.cli.app import app

    result = CliRunner().invoke(app, ["demo-model", "--out", str(demo_dir)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "Traceback" not in result.output


def test_assembling_the_demo_prints_no_third_party_noise(tmp_path: Path) -> None:
    """No GGUF or shard-writing bars, no torchvision notice: crvlm's own lines only."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "demo-model", "--out", str(tmp_path / "vlm")],
                          capture_output=True, text=True, check=True)
    printed = done.stdout + done.stderr
    for noise in ("it/s", "torchvision", "de-quantizing", "Writing model shards", "Loading weights"):
        assert noise not in printed, (noise, printed)
    assert "demo VLM written to" in printed
