"""Write the image policies for the demo VLM into ``examples/policies/``.

    python examples/policies/make_shape_policies.py

``shape-qa`` (the question decides), ``no-stars`` (the picture's shape decides), ``no-red``
(the picture's colour decides; written after the session-6 defaults were frozen) and
``one-shape`` (how many shapes the picture shows decides; written after the session-7
defaults); see :mod:`crvlm_sdk.demo.shape_policies`. The general-knowledge questions that ``shape-qa`` asks over
pictures are the text policies' questions (training files for training, test files for test)
frozen in ``shape-qa/general_questions.json``: the text policies' data has changed since, and
reading it live made the generator write different files. Fixed seeds: rerunning rewrites
identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from crvlm_sdk.demo.shape_policies import write_no_red, write_no_stars, write_one_shape, write_shape_qa

HERE = Path(__file__).resolve().parent
GENERAL = HERE / "shape-qa" / "general_questions.json"


if __name__ == "__main__":
    general = json.loads(GENERAL.read_text())
    write_shape_qa(HERE / "shape-qa", general["train"], general["test"])
    write_no_stars(HERE / "no-stars")
    write_no_red(HERE / "no-red")
    write_one_shape(HERE / "one-shape")
    print("wrote examples/policies/shape-qa, no-stars, no-red and one-shape")
