"""Prompt construction shared by every adapter: batching, forced prefixes, left padding.

One builder serves extraction, gating, generation and evaluation, so the token positions a
vector was extracted at are the ones the gate and the Steerer later see. Rows are encoded one
at a time by the model's own processor (so each model's image-token expansion applies) and
collated here: sequence tensors are left-padded, everything else (pixels, image sizes, grids)
is concatenated along the batch dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crvlm_sdk.errors import AdapterError, CrvlmError
from crvlm_sdk.types import ImageInput, PromptBatch

if TYPE_CHECKING:
    from crvlm_sdk.adapters.base import BackboneAdapter


def text_config(model: torch.nn.Module) -> Any:
    """The language model's config (the config itself for text-only models)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def load_image(image: ImageInput) -> Any:
    """A PIL RGB image from a path or an image; one-line error naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CrvlmError(f"image {path} is too large ({exc})", hint="resize it first") from None
    except FileNotFoundError:
        raise CrvlmError(f"image not found: {path}", hint="paths in data files are relative to the file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CrvlmError(f"unreadable image {path}: {exc}") from None


def _per_row(value: str | Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * n
    rows = list(value)
    if len(rows) != n:
        raise CrvlmError(f"{what}: got {len(rows)} entries for {n} questions")
    return rows


def row_images(image: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    """One prompt's images as a list: ``None`` -> none, one image -> one, a list -> several."""
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-row image tensors along dim 0, zero-padding any other dim that differs.

    Processors whose image tensors carry a per-row count (LLaVA-NeXT's any-res patches,
    Idefics3's tiles and their pixel masks) pad a batch with zeros to its largest row; the
    models drop those all-zero entries. Rows encoded one at a time are padded the same way here.
    """
    if len({t.shape[1:] for t in tensors}) <= 1:
        return torch.cat(tensors, dim=0)
    if len({t.dim() for t in tensors}) != 1:
        raise CrvlmError(f"cannot batch image inputs of shapes {[tuple(t.shape) for t in tensors]}")
    target = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad.extend([0, target[d - 1] - t.shape[d]])
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded, dim=0)


def build_prompt_batch(
    adapter: BackboneAdapter,
    questions: Sequence[str],
    images: Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
    *,
    system: str | Sequence[str | None] | None = None,
    forced_prefix: str | None = None,
) -> PromptBatch:
    """Encode ``questions`` (each over no image, one, or a list of several) as one left-padded batch."""
    if isinstance(questions, str):
        questions = [questions]
    n = len(questions)
    if n == 0:
        raise CrvlmError("no questions given")
    image_rows = list(images) if images is not None else [None] * n
    if len(image_rows) != n:
        raise CrvlmError(f"images: got {len(image_rows)} entries for {n} questions")
    if any(row_images(img) for img in image_rows) and not adapter.supports_images:
        raise AdapterError(
            f"adapter {adapter.name!r} is text-only but images were given",
            hint="use a vision-language model, or drop the images",
        )
    systems = _per_row(system, n, "system")
    prefix_ids = adapter.encode_text(forced_prefix) if forced_prefix else []
    seq_keys, max_images = adapter.sequence_keys, adapter.max_images

    rows: list[dict[str, torch.Tensor]] = []
    prompt_lens: list[int] = []
    for question, image, sys_msg in zip(questions, image_rows, systems, strict=True):
        pictures = row_images(image)
        if len(pictures) > max_images:
            raise AdapterError(
                f"a prompt has {len(pictures)} images but adapter {adapter.name!r} takes at most {max_images}",
                hint="give one image per question, or use a model that takes several",
            )
        if len(pictures) > 1:
            # Only adapters declaring max_images > 1 see this keyword (older adapters never do).
            text = adapter.render_prompt(question, has_image=True, system=sys_msg, num_images=len(pictures))
            enc = adapter.encode_row(text, [load_image(p) for p in pictures])
        else:
            text = adapter.render_prompt(question, has_image=bool(pictures), system=sys_msg)
            enc = adapter.encode_row(text, load_image(pictures[0]) if pictures else None)
        enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        prompt_lens.append(int(enc["input_ids"].shape[1]))
        if prefix_ids:
            extra = torch.tensor([prefix_ids], dtype=enc["input_ids"].dtype)
            for key in seq_keys:
                if key not in enc:
                    continue
                fill = extra if key == "input_ids" else torch.full_like(extra, 1 if key == "attention_mask" else 0)
                enc[key] = torch.cat([enc[key], fill.to(enc[key].dtype)], dim=1)
        rows.append(enc)

    total = [int(r["input_ids"].shape[1]) for r in rows]
    width = max(total)
    inputs: dict[str, torch.Tensor] = {}
    keys = list(dict.fromkeys(key for r in rows for key in r))
    for key in keys:
        if key in seq_keys:
            pad = adapter.pad_token_id if key == "input_ids" else 0
            padded = []
            for r, t in zip(rows, total, strict=True):
                row = r[key][0] if key in r else torch.zeros(t, dtype=torch.long)
                padded.append(torch.cat([row.new_full((width - t,), pad), row]))
            inputs[key] = torch.stack(padded)
        else:
            # Image tensors exist only for rows with images; the model pairs them with the
            # image tokens in order, so concatenating the rows that have them is correct.
            inputs[key] = concat_padded([r[key] for r in rows if key in r])
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.stack(
            [torch.cat([torch.zeros(width - t, dtype=torch.long), torch.ones(t, dtype=torch.long)]) for t in total]
        )
    offsets = torch.tensor([width - t for t in total])
    plen = torch.tensor(prompt_lens)
    return PromptBatch(
        inputs=inputs,
        last_prompt_index=offsets + plen - 1,
        prefix_start=offsets + plen,
        prefix_end=torch.full((n,), width),
    )


#: Inputs that run along the token dimension and therefore get left-padded.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


#: stands in for the question when a prompt is rendered to find where questions begin
_SENTINEL = "Xq7Sentinel"


def question_opener(adapter: BackboneAdapter) -> tuple[int, ...]:
    """Token ids that open the user's turn (e.g. ``<|im_start|>user\\n``), found from the chat
    template alone: the tokens every rendering ends with just before the question, whatever the
    system message. Empty when the template puts nothing constant there.

    The gate's question features average the tokens after the last occurrence of this sequence,
    so the build and the Steerer (which sees only ``input_ids``) find the same span. The last
    token is dropped: it may merge with the question's first characters when tokenized together.
    """
    renders = []
    for system in (None, "You are a helpful assistant.", "Answer briefly."):
        try:
            text = adapter.render_prompt(_SENTINEL, has_image=False, system=system)
        except Exception:  # templates that reject a system message are skipped
            continue
        if _SENTINEL in text:
            renders.append(adapter.encode_text(text[: text.index(_SENTINEL)]))
    if len(renders) < 2:
        return ()
    common = 0
    while all(len(r) > common and r[-1 - common] == renders[0][-1 - common] for r in renders):
        common += 1
    return tuple(renders[0][len(renders[0]) - common : len(renders[0]) - 1]) if common > 1 else ()
