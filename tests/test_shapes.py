"""Synthetic pictures: reproducible from a seed, and described truthfully."""

from __future__ import annotations

import random

import numpy as np
import pytest

from crvlm_sdk.demo import shapes


def test_same_seed_same_pictures_and_different_seed_different_pictures() -> None:
    a = shapes.make_scenes(7, 5)
    b = shapes.make_scenes(7, 5)
    c = shapes.make_scenes(8, 5)
    assert [s for _, s in a] == [s for _, s in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, c, strict=True))


@pytest.mark.parametrize("colour", list(shapes.COLOURS))
def test_the_described_colour_is_the_dominant_non_background_colour(colour: str) -> None:
    rng = random.Random(3)
    for _ in range(3):
        scene = shapes.Scene(shape=rng.choice(shapes.SHAPES), colour=colour, count=1, size="large",
                             background="white", position=None)
        img, _ = shapes.draw_scene(scene, rng)
        px = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        background = np.array(shapes.BACKGROUNDS["white"], dtype=np.float32)
        fg = px[np.linalg.norm(px - background, axis=1) > 60]
        assert len(fg) > 40, "the shape must be visible"
        mean = fg.mean(0)
        nearest = min(shapes.COLOURS, key=lambda c: float(np.linalg.norm(mean - np.array(shapes.COLOURS[c]))))
        assert nearest == colour


def test_descriptions_and_positions() -> None:
    scene = shapes.Scene(shape="star", colour="red", count=3, size="small", background="grey", position=None)
    assert scene.description() == "The image shows stars: three small red stars. Colour: red."
    one = shapes.Scene(shape="circle", colour="blue", count=1, size="large", background="grey", position=None)
    assert one.description() == "The image shows circle: a large blue circle. Colour: blue."
    _, drawn = shapes.draw_scene(one, random.Random(0))
    assert drawn.position in {"left", "right", "top", "bottom", "centre"}
    _, many = shapes.draw_scene(scene, random.Random(0))
    assert many.position is None


def test_shapes_do_not_overlap() -> None:
    # Three large shapes must stay countable: check that they form three separate blobs.
    rng = random.Random(11)
    scene = shapes.Scene(shape="square", colour="blue", count=3, size="large", background="white", position=None)
    for _ in range(5):
        img, _ = shapes.draw_scene(scene, rng)
        px = np.asarray(img, dtype=np.float32)
        mask = np.linalg.norm(px - np.array(shapes.BACKGROUNDS["white"]), axis=2) > 80
        assert _count_blobs(mask) == 3


def _count_blobs(mask: np.ndarray) -> int:
    """4-connected components of at least 20 pixels (noise specks are smaller)."""
    seen = np.zeros_like(mask)
    blobs = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        blobs += size >= 20
    return blobs
