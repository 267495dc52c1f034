"""Refusal metrics with 95% intervals.

SRS = refusal rate on out-of-scope questions, BRS = refusal rate on in-scope questions,
MB = harmonic mean of SRS and 1 − BRS. With a judge that tells clean refusals from broken
ones, SRS counts only clean refusals (what a refused user can be shown) while BRS counts every
answer that declines, clean or not (an in-scope user refused with a loop was still refused);
the keyword SRS, which counts any declining opening, is kept beside it.

Rates get Wilson score intervals (well-behaved at 0 and 1, unlike the normal approximation);
MB, a function of two rates, gets a percentile bootstrap with a fixed seed so reports are
reproducible.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def mb_score(srs: float, brs: float) -> float:
    keep = 1.0 - brs
    return 0.0 if srs + keep == 0 else 2 * srs * keep / (srs + keep)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def answer_matches(answer: str, reference: str | Sequence[str]) -> bool:
    """Normalised contains-match: some reference's words appear, in order, in the answer."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    text = f" {normalise(answer)} "
    return any(ref and f" {ref} " in text for ref in map(normalise, refs))


@dataclass
class Metrics:
    srs: float
    brs: float
    mb: float
    answer_accuracy: float | None
    srs_ci: tuple[float, float]
    brs_ci: tuple[float, float]
    mb_ci: tuple[float, float]
    answer_accuracy_ci: tuple[float, float] | None
    n_in: int
    n_out: int
    n_answers: int
    refused_in: int
    refused_out: int
    correct: int
    #: refusal rate on out-of-scope rows counting any declining opening (None if not given)
    srs_keyword: float | None = None
    srs_keyword_ci: tuple[float, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def compute_metrics(
    refused: Sequence[bool],
    in_scope: Sequence[bool],
    correct: Sequence[bool | None] | None = None,
    *,
    declined: Sequence[bool] | None = None,
    keyword: Sequence[bool] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Metrics:
    """``refused`` (clean refusals) gives SRS, ``declined`` (default: ``refused``) gives BRS and
    ``keyword`` the keyword SRS."""
    scope = np.asarray(in_scope, dtype=bool)
    r_out = np.asarray(refused, dtype=bool)[~scope]
    r_in = np.asarray(refused if declined is None else declined, dtype=bool)[scope]
    n_out, n_in = len(r_out), len(r_in)
    srs = float(r_out.mean()) if n_out else 0.0
    brs = float(r_in.mean()) if n_in else 0.0
    rng = np.random.default_rng(seed)
    if n_out and n_in:
        s = rng.binomial(n_out, srs, bootstrap) / n_out
        b = rng.binomial(n_in, brs, bootstrap) / n_in
        mbs = np.array([mb_score(x, y) for x, y in zip(s, b, strict=True)])
        mb_ci = (float(np.percentile(mbs, 2.5)), float(np.percentile(mbs, 97.5)))
    else:
        mb_ci = (0.0, 1.0)
    graded = [c for c, s in zip(correct or [], scope, strict=False) if s and c is not None]
    acc = float(np.mean(graded)) if graded else None
    k_out = np.asarray(keyword, dtype=bool)[~scope] if keyword is not None else None
    return Metrics(
        srs=srs, brs=brs, mb=mb_score(srs, brs), answer_accuracy=acc,
        srs_ci=wilson(int(r_out.sum()), n_out), brs_ci=wilson(int(r_in.sum()), n_in), mb_ci=mb_ci,
        answer_accuracy_ci=wilson(int(sum(graded)), len(graded)) if graded else None,
        n_in=n_in, n_out=n_out, n_answers=len(graded), refused_in=int(r_in.sum()), refused_out=int(r_out.sum()),
        correct=int(sum(graded)),
        srs_keyword=float(k_out.mean()) if k_out is not None and n_out else None,
        srs_keyword_ci=wilson(int(k_out.sum()), n_out) if k_out is not None else None,
    )
