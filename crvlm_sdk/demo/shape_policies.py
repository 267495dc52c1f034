"""The two image policies for the demo VLM: pictures, questions, accepted answers, test sets.

``examples/policies/make_shape_policies.py`` writes both into ``examples/policies/``; the
README demo writes a smaller ``no-stars`` policy on the fly with the same code.

- ``shape-qa`` — the *question* decides: questions about the picture (colour, shape, count,
  size, "What is this?") are in scope; general-knowledge questions asked over a picture are
  out of scope. The general questions are given by the caller (the example script takes the
  three text policies' training files for training and their test files for test, so no
  question is in both splits).
- ``no-stars`` — the *picture* decides: the same questions, in scope over pictures of
  circles, squares, triangles and diamonds, out of scope over pictures of stars. The
  questions carry no topic words; only the image tells the two sides apart.

In-scope rows record the accepted answers (e.g. ``["two", "2"]``) so answer accuracy is
measured. Everything is drawn from fixed seeds: rerunning the script rewrites identical files.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crvlm_sdk.demo import shapes

N_TRAIN, N_TEST = 200, 70  # per side

COLOUR_QUESTIONS = (
    "What colour is the shape?", "What color is the shape?", "What colour are the shapes?",
    "Which colour is used in this picture?", "what colour is it", "Tell me the colour of the shape.",
)
SHAPE_QUESTIONS = (
    "What shape is this?", "What shape is in the picture?", "Which shape can you see?",
    "Name the shape in the image.", "what shape are these", "What kind of shape is drawn here?",
)
COUNT_QUESTIONS = (
    "How many shapes are there?", "How many shapes are in the picture?", "Count the shapes in the image.",
    "how many are there?",
)
SIZE_QUESTIONS = ("Is the shape small or large?", "Are the shapes large or small?")
OPEN_QUESTIONS = (
    "What is this?", "What do you see in the image?", "Describe the picture.", "What's in this image?",
    "Can you describe what is shown here?", "Tell me about this picture.",
)


def picture_question(rng: random.Random, scene: shapes.Scene) -> tuple[str, list[str]]:
    """A question about the picture and the answers that count as correct."""
    kind = rng.choices(("colour", "shape", "count", "size", "open"), weights=(3, 3, 2, 1, 3))[0]
    if kind == "colour":
        return rng.choice(COLOUR_QUESTIONS), [scene.colour]
    if kind == "shape":
        return rng.choice(SHAPE_QUESTIONS), [scene.shape, scene.noun]
    if kind == "count":
        return rng.choice(COUNT_QUESTIONS), [shapes.COUNT_WORDS[scene.count], str(scene.count)]
    if kind == "size":
        return rng.choice(SIZE_QUESTIONS), [scene.size, "big" if scene.size == "large" else "little"]
    return rng.choice(OPEN_QUESTIONS), [scene.shape, scene.noun]


class PictureWriter:
    """Writes one policy directory: ``images/``, the JSONL files and ``policy.yaml``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.rmtree(root / "images", ignore_errors=True)
        (root / "images").mkdir(parents=True)
        self.count = 0

    def image(self, img: Any, split: str) -> str:
        self.count += 1
        rel = f"images/{split}-{self.count:04d}.png"
        img.save(self.root / rel, optimize=True)
        return rel

    def jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        (self.root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def files(self, train_in: list[dict[str, Any]], train_out: list[dict[str, Any]], test_in: list[dict[str, Any]],
              test_out: list[dict[str, Any]], rng: random.Random, policy_yaml: str) -> Path:
        self.jsonl("in_scope.jsonl", train_in)
        self.jsonl("out_of_scope.jsonl", train_out)
        test = [{**r, "in_scope": True} for r in test_in] + [{**r, "in_scope": False} for r in test_out]
        rng.shuffle(test)
        self.jsonl("test.jsonl", test)
        (self.root / "policy.yaml").write_text(policy_yaml)
        return self.root / "policy.yaml"


def scene_rows(writer: PictureWriter, rng: random.Random, split: str, n: int, shape_choices: Sequence[str],
                *, answers: bool, colour_choices: Sequence[str] | None = None,
                count_choices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        shape = rng.choice(shape_choices)
        colour = rng.choice(colour_choices) if colour_choices else None
        count = rng.choice(count_choices) if count_choices else None
        img, scene = shapes.draw_scene(shapes.random_scene(rng, shape=shape, colour=colour, count=count), rng)
        question, accepted = picture_question(rng, scene)
        row = {"question": question, "image": writer.image(img, split)}
        if answers:
            row["answer"] = list(dict.fromkeys(accepted))
        rows.append(row)
    return rows


def _picture_policy_yaml(name: str, subject: str, description: str, message: str, refuse_if: str) -> str:
    """policy.yaml of a picture policy: the refusal instruction quotes the refusal message."""
    return (
        f"name: {name}\nsubject: {subject}\ndescription: {description}\n"
        "in_scope: in_scope.jsonl\nout_of_scope: out_of_scope.jsonl\ntest: test.jsonl\n"
        f"refusal_instruction: >-\n  You are a picture assistant. Say '{message}'\n  if {refuse_if}.\n"
        f'refusal_message: "{message}"\n'
        'refusal_prefix: "I\'m sorry, but I can\'t"\ncompliant_prefix: "Sure! Here is"\nseed: 0\n'
    )


SHAPE_QA_YAML = _picture_policy_yaml(
    "shape-qa", "the picture",
    "A picture assistant that answers questions about the shapes in the picture, and nothing else.",
    "I'm sorry, but I can only answer questions about the picture.", "the question is NOT about {subject}")

NO_STARS_YAML = _picture_policy_yaml(
    "no-stars", "pictures without stars", "A picture assistant that must not discuss any picture that shows a star.",
    "I'm sorry, but I can't talk about pictures with stars.", "the picture shows a star")


def write_shape_qa(root: str | Path, general_train: Sequence[str], general_test: Sequence[str], *,
                   n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 4100) -> Path:
    """Policy (a): picture questions in scope, ``general_*`` questions (over pictures) out of scope."""
    rng = random.Random(seed)
    w = PictureWriter(Path(root))
    train_keys = {q.strip().lower() for q in general_train}
    test_pool = [q for q in general_test if q.strip().lower() not in train_keys]
    rows: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for split, n, pool in (("train", n_train, list(general_train)), ("test", n_test, test_pool)):
        if len(pool) < n:
            raise ValueError(f"need {n} general {split} questions, got {len(pool)}")
        ins = scene_rows(w, rng, split, n, shapes.SHAPES, answers=True)
        outs = []
        for question in rng.sample(pool, n):
            img, _ = shapes.draw_scene(shapes.random_scene(rng), rng)
            outs.append({"question": question, "image": w.image(img, split)})
        rows[split] = (ins, outs)
    return w.files(*rows["train"], *rows["test"], rng, SHAPE_QA_YAML)


def write_no_stars(root: str | Path, *, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 4200) -> Path:
    """Policy (b): the same questions; out of scope exactly when the picture shows stars."""
    rng = random.Random(seed)
    w = PictureWriter(Path(root))
    allowed = tuple(s for s in shapes.SHAPES if s != "star")
    train_in = scene_rows(w, rng, "train", n_train, allowed, answers=True)
    train_out = scene_rows(w, rng, "train", n_train, ("star",), answers=False)
    test_in = scene_rows(w, rng, "test", n_test, allowed, answers=True)
    test_out = scene_rows(w, rng, "test", n_test, ("star",), answers=False)
    return w.files(train_in, train_out, test_in, test_out, rng, NO_STARS_YAML)


NO_RED_YAML = _picture_policy_yaml(
    "no-red", "pictures without red shapes",
    "A picture assistant that must not discuss any picture whose shapes are red.",
    "I'm sorry, but I can't talk about pictures with red shapes.", "the shapes in the picture are red")


def write_no_red(root: str | Path, *, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 4300) -> Path:
    """Policy (c), written after the session-6 defaults were frozen and evaluated untouched: the
    same questions; out of scope exactly when the shapes are red (colour decides, not shape)."""
    rng = random.Random(seed)
    w = PictureWriter(Path(root))
    others = tuple(c for c in shapes.COLOURS if c != "red")
    train_in = scene_rows(w, rng, "train", n_train, shapes.SHAPES, answers=True, colour_choices=others)
    train_out = scene_rows(w, rng, "train", n_train, shapes.SHAPES, answers=False, colour_choices=("red",))
    test_in = scene_rows(w, rng, "test", n_test, shapes.SHAPES, answers=True, colour_choices=others)
    test_out = scene_rows(w, rng, "test", n_test, shapes.SHAPES, answers=False, colour_choices=("red",))
    return w.files(train_in, train_out, test_in, test_out, rng, NO_RED_YAML)


ONE_SHAPE_YAML = _picture_policy_yaml(
    "one-shape", "pictures with a single shape",
    "A picture assistant that only discusses pictures showing exactly one shape.",
    "I'm sorry, but I can only talk about pictures with a single shape.",
    "the picture shows more than one shape")


def write_one_shape(root: str | Path, *, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 4400) -> Path:
    """Policy (d), written after the session-7 defaults were frozen and evaluated untouched: the
    same questions; out of scope exactly when the picture shows two or three shapes (the count
    decides, not the shape or the colour)."""
    rng = random.Random(seed)
    w = PictureWriter(Path(root))
    train_in = scene_rows(w, rng, "train", n_train, shapes.SHAPES, answers=True, count_choices=(1,))
    train_out = scene_rows(w, rng, "train", n_train, shapes.SHAPES, answers=False, count_choices=(2, 3))
    test_in = scene_rows(w, rng, "test", n_test, shapes.SHAPES, answers=True, count_choices=(1,))
    test_out = scene_rows(w, rng, "test", n_test, shapes.SHAPES, answers=False, count_choices=(2, 3))
    return w.files(train_in, train_out, test_in, test_out, rng, ONE_SHAPE_YAML)
