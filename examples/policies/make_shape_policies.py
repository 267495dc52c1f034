"""Write the two image policies for the demo VLM into ``examples/policies/``.

    python examples/policies/make_shape_policies.py

``shape-qa`` (the question decides) and ``no-stars`` (the picture decides); see
:mod:`crvlm_sdk.shape_policies`. The general-knowledge questions that ``shape-qa`` asks over
pictures are the text policies' questions: their training files for training, their test
files for test. Fixed seeds: rerunning rewrites identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from crvlm_sdk.shape_policies import write_no_stars, write_shape_qa

HERE = Path(__file__).resolve().parent
TEXT_POLICIES = ("cooking", "travel", "programming")


def questions(names: tuple[str, ...]) -> list[str]:
    seen: dict[str, str] = {}
    for policy in TEXT_POLICIES:
        for name in names:
            for line in (HERE / policy / name).read_text().splitlines():
                if line.strip():
                    q = json.loads(line)["question"]
                    seen.setdefault(q.strip().lower(), q)
    return sorted(seen.values())


if __name__ == "__main__":
    write_shape_qa(HERE / "shape-qa", questions(("in_scope.jsonl", "out_of_scope.jsonl")), questions(("test.jsonl",)))
    write_no_stars(HERE / "no-stars")
    print("wrote examples/policies/shape-qa and examples/policies/no-stars")
