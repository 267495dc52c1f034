"""Star pictures outside every policy split, for choosing settings on pictures (a dev set: the
validation split is small and the test split must stay unseen). Used by ``strength_grid.py``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from crvlm_sdk.demo.shape_policies import PictureWriter, scene_rows


def write_star_pictures(root: str | Path, n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` out-of-scope no-stars rows (a picture question over stars) drawn from ``seed``.

    For choosing settings on pictures outside the policy's own splits (a dev set: the
    validation split is small, and the test split must stay unseen). Paths are absolute.
    """
    rng = random.Random(seed)
    w = PictureWriter(Path(root))
    rows = scene_rows(w, rng, "dev", n, ("star",), answers=False)
    return [{**row, "image": str(w.root / row["image"])} for row in rows]
