"""Train the demo VLM's vision side (CLIP vision tower + LLaVA projector) on synthetic shapes.

    python scripts/train_demo_vlm.py [--steps 4000] [--seed 0]

Writes ``crvlm_sdk/demo/data/demo_vlm/vision.safetensors`` (float16) and ``train_log.txt`` next to
it. The objective needs no back-propagation through the language model: for each picture, the
16 projected image tokens are regressed onto SmolLM2's input embeddings of a sentence that
describes the picture (:meth:`crvlm_sdk.demo.shapes.Scene.description`: "The image shows stars: two
large blue stars. Colour: blue.", padded with spaces), by mean
squared error (relative to the targets' mean square) plus cosine distance. Auxiliary linear
heads on the mean-pooled tower output classify shape, colour, count and size during
training (they are not part of the model and are not saved): they give the tower a direct
signal for the attribute that is hardest to see at 64 pixels, the shape. Pictures are drawn
fresh for every step from per-step seeds, so the tower never sees the same picture twice and
no held-out picture (:data:`crvlm_sdk.demo.vlm.CHECK_SEED` and up) is ever trained on.

Runs on 2 idle CPU cores in about 16 minutes for the default steps (15.4 min for the committed weights).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from crvlm_sdk.demo import shapes
from crvlm_sdk.demo import vlm as demo_vlm

OUT = Path(__file__).resolve().parent.parent / "crvlm_sdk" / "data" / "demo_vlm"
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)  # CLIPImageProcessor's defaults
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


class VisionSide(torch.nn.Module):
    """The trainable part of the demo VLM, named as inside ``LlavaModel`` so weights transfer 1:1.

    ``forward`` is ``LlavaModel.get_image_features`` for this configuration (last encoder
    layer, CLS token dropped, then the projector); a test checks the two agree on the
    assembled model.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.multi_modal_projector(hidden)


def description_embeddings(embed: torch.Tensor, tokenizer: Any, sentences: Sequence[str]) -> torch.Tensor:
    """Training targets: each sentence's input embeddings, padded with spaces to ``demo_vlm.IMAGE_TOKENS``."""
    pad = tokenizer.encode(" ", add_special_tokens=False)
    rows = []
    for sentence in sentences:
        ids = tokenizer.encode(sentence, add_special_tokens=False)
        if len(ids) > demo_vlm.IMAGE_TOKENS:
            raise ValueError(f"description longer than {demo_vlm.IMAGE_TOKENS} tokens: {sentence!r}")
        rows.append(ids + pad * (demo_vlm.IMAGE_TOKENS - len(ids)))
    return embed[torch.tensor(rows)]


def pixels(images: list) -> torch.Tensor:
    """What ``CLIPImageProcessor`` produces for a 64-pixel picture (checked against it at start-up)."""
    arr = torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) for img in images]))
    return ((arr.permute(0, 3, 1, 2) / 255.0) - MEAN) / STD


ATTRIBUTES = {
    "shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS), "count": [1, 2, 3], "size": list(shapes.SIZES),
}


def batch(seed: int, n: int, embed: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    scenes = shapes.make_scenes(seed, n)
    sentences = [scene.description() for _, scene in scenes]
    targets = description_embeddings(embed, tokenizer, sentences)
    labels = {k: torch.tensor([values.index(getattr(s, k)) for _, s in scenes]) for k, values in ATTRIBUTES.items()}
    return pixels([img for img, _ in scenes]), targets, {"sentences": sentences, **labels}


class Heads(torch.nn.Module):
    """Training-only attribute classifiers on the mean-pooled last tower layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, pooled: torch.Tensor, labels: dict) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(head(pooled), labels[k]) for k, head in self.heads.items())


def loss_fn(pred: torch.Tensor, target: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    mse = ((pred - target) ** 2).mean() / scale
    cos = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()
    return mse + cos, cos


@torch.no_grad()
def token_accuracy(model: VisionSide, px: torch.Tensor, target_ids: torch.Tensor, embed_n: torch.Tensor
                   ) -> tuple[float, float]:
    """Nearest-embedding decoding of the image tokens: per-token and whole-sentence accuracy."""
    pred = torch.nn.functional.normalize(model(px), dim=-1)
    ids = (pred @ embed_n.T).argmax(-1)
    return float((ids == target_ids).float().mean()), float((ids == target_ids).all(-1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aux-weight", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(message: str) -> None:
        line = f"[{time.monotonic() - started:7.1f}s] {message}"
        print(line, flush=True)
        log_lines.append(line)

    lm, tokenizer = demo_vlm.load_smollm2()
    embed = lm.get_input_embeddings().weight.detach().clone()
    del lm
    image_token_id = len(tokenizer)  # the <image> token the assembled processor adds next
    from transformers import AutoConfig

    config = demo_vlm.llava_config(AutoConfig.for_model("llama", hidden_size=embed.shape[1]), image_token_id)
    model = VisionSide(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vision side: {n_params / 1e6:.2f} M parameters; config {json.dumps(demo_vlm.VISION_CONFIG)}")

    check_scenes = shapes.make_scenes(demo_vlm.CHECK_SEED + 1, 4)
    expected = demo_vlm.image_processor()([img for img, _ in check_scenes], return_tensors="pt")["pixel_values"]
    gap = float((expected - pixels([img for img, _ in check_scenes])).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"pixel normalisation differs from CLIPImageProcessor by {gap}")

    scale = float((embed**2).mean())
    embed_n = torch.nn.functional.normalize(embed, dim=-1)
    # Held-out monitoring pictures come from seeds training never uses (training uses 0..steps-1).
    val_px, val_t, val_info = batch(demo_vlm.CHECK_SEED + 7, 256, embed, tokenizer)
    val_sent = val_info["sentences"]
    val_ids = (val_t @ embed_n.T).argmax(-1)
    log(f"embedding mean square {scale:.4g}; example target: {val_sent[0]!r}")

    heads = Heads(demo_vlm.VISION_CONFIG["hidden_size"])
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rng = random.Random(args.seed)
    running = 0.0
    for step in range(args.steps):
        model.train()
        px, target, labels = batch(rng.randrange(2**31) % 1_000_000, args.batch_size, embed, tokenizer)
        hidden = model.vision_tower(px, output_hidden_states=True).hidden_states[-1][:, 1:]
        loss, _ = loss_fn(model.multi_modal_projector(hidden), target, scale)
        loss = loss + args.aux_weight * heads(hidden.mean(1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 250 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                val_loss, val_cos = loss_fn(model(val_px), val_t, scale)
            tok, sent = token_accuracy(model, val_px, val_ids, embed_n)
            log(f"step {step + 1}: train loss {running:.4f}, held-out loss {float(val_loss):.4f} "
                f"(cosine distance {float(val_cos):.4f}), nearest-token accuracy {tok:.3f}, "
                f"whole sentence {sent:.3f}")

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    save_file(state, str(args.out / "vision.safetensors"),
              metadata={"seed": str(args.seed), "steps": str(args.steps), "script": "scripts/train_demo_vlm.py"})
    size = (args.out / "vision.safetensors").stat().st_size
    log(f"saved {args.out / 'vision.safetensors'} ({size / 1e6:.1f} MB, float16)")
    (args.out / "train_log.txt").write_text(
        f"python scripts/train_demo_vlm.py --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} "
        f"--seed {args.seed} --aux-weight {args.aux_weight}\n" + "\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
