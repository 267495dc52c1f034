"""Policies (what is in scope) and their example data, with precise errors.

A policy is a YAML file::

    name: cooking
    subject: cooking
    description: A cooking assistant that answers questions about food preparation.
    in_scope: in_scope.jsonl           # JSONL path relative to this file, or an inline list
    out_of_scope: out_of_scope.jsonl
    refusal_instruction: "Say 'Sorry, I cannot answer that question.' if the question is NOT about {subject}."
    refusal_prefix: "Sorry,"
    refusal_opening: "I'm sorry, but"   # forced at the start of a refused answer ("" = none)
    refusal_message: "I'm sorry, but I can only help with {subject}."   # template mode's answer
    validation: val.jsonl              # optional; otherwise split off the training data
    test: test.jsonl                   # optional; used by `crvlm eval --policy`
    seed: 0

Training rows are ``{"question": ..., "image": "path.png", "answer": ...}`` (image and answer
optional); validation/test rows add ``"in_scope": true|false``. Image paths are relative to
the JSONL file. Every error names the file and, for data, the line.
"""

from __future__ import annotations

import json
import random
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crvlm_sdk.errors import PolicyError, field_error
from crvlm_sdk.types import Sample

DEFAULT_INSTRUCTION = "Say 'Sorry, I cannot answer that question.' if the question is NOT about {subject}."
DEFAULT_OPENING = "I'm sorry, but"
DEFAULT_MESSAGE = "I'm sorry, but I can only help with {subject}."
_PLACEHOLDERS = {"subject", "name", "description"}
MIN_SPLIT = 4  # fewer examples than this per class in a split cannot train or calibrate anything


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    description: str = ""
    in_scope: str | list[str | dict[str, Any]]
    out_of_scope: str | list[str | dict[str, Any]]
    refusal_instruction: str = DEFAULT_INSTRUCTION
    refusal_prefix: str = "Sorry,"
    compliant_prefix: str = "Sure,"
    refusal_opening: str = DEFAULT_OPENING
    refusal_message: str = Field(default=DEFAULT_MESSAGE, min_length=1)
    validation: str | None = None
    test: str | None = None
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0

    #: directory relative paths are resolved against (the YAML file's folder)
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="<inline policy>", exclude=True)

    @field_validator("refusal_instruction", "refusal_message", "refusal_opening")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        names = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        unknown = names - _PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {sorted(unknown)}; use {{subject}}, {{name}} or {{description}}"
            )
        return value

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except RecursionError:
            raise PolicyError(f"{path}: nested too deeply to be a policy") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise PolicyError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise PolicyError(f"{path}: expected a mapping of policy fields, found {type(raw).__name__}")
        try:
            return cls.model_validate({**raw, "base_dir": path.parent, "source": str(path)})
        except ValidationError as exc:
            raise PolicyError(f"{path}: {field_error(exc)}") from None

    def _fill(self, template: str) -> str:
        return template.format(subject=self.subject, name=self.name, description=self.description)

    def instruction(self) -> str:
        """The refusal instruction with ``{subject}`` (and ``{name}``, ``{description}``) filled in."""
        return self._fill(self.refusal_instruction)

    def opening(self) -> str:
        """The forced opening of a refused answer, placeholders filled in."""
        return self._fill(self.refusal_opening)

    def message(self) -> str:
        """The whole answer of a refused row in template mode, placeholders filled in."""
        return self._fill(self.refusal_message)

    def summary(self, n_in: int, n_out: int) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "description": self.description,
                "n_in_scope": n_in, "n_out_of_scope": n_out}

    # -- data -----------------------------------------------------------------------------
    def _rows(self, value: str | list[Any], field: str, *, labelled: bool) -> list[Sample]:
        if isinstance(value, str):
            return read_jsonl(self.base_dir / value, labelled=labelled)
        rows = []
        for i, item in enumerate(value):
            where = f"{self.source}: field `{field}[{i}]`"
            rows.append(_row(item if isinstance(item, dict) else {"question": item}, where, self.base_dir, labelled))
        return rows

    def load_data(self, *, max_samples: int | None = None) -> PolicyData:
        """Training, validation and (if given) test data, split deterministically by ``seed``."""
        ins = self._rows(self.in_scope, "in_scope", labelled=False)
        outs = self._rows(self.out_of_scope, "out_of_scope", labelled=False)
        for rows, field in ((ins, "in_scope"), (outs, "out_of_scope")):
            if not rows:
                raise PolicyError(f"{self.source}: field `{field}` has no examples")
        rng = random.Random(self.seed)
        rng.shuffle(ins)
        rng.shuffle(outs)
        if max_samples is not None:
            ins, outs = ins[:max_samples], outs[:max_samples]
        if self.validation is not None:
            val = read_jsonl(self.base_dir / self.validation, labelled=True)
            val_in = [s for s in val if s.meta["in_scope"]]
            val_out = [s for s in val if not s.meta["in_scope"]]
            train_in, train_out = ins, outs
        else:
            k_in = max(1, round(len(ins) * self.validation_fraction))
            k_out = max(1, round(len(outs) * self.validation_fraction))
            val_in, train_in = ins[:k_in], ins[k_in:]
            val_out, train_out = outs[:k_out], outs[k_out:]
        for rows, what in ((train_in, "in-scope training"), (train_out, "out-of-scope training"),
                           (val_in, "in-scope validation"), (val_out, "out-of-scope validation")):
            if len(rows) < MIN_SPLIT:
                raise PolicyError(
                    f"{self.source}: only {len(rows)} {what} examples after the split (need >= {MIN_SPLIT})",
                    hint="add examples, lower validation_fraction or give a validation file",
                )
        test = read_jsonl(self.base_dir / self.test, labelled=True) if self.test else []
        self._check_distinct(train_in + val_in, train_out + val_out, test)
        return PolicyData(train_in, train_out, val_in, val_out, test)

    def _check_distinct(self, ins: list[Sample], outs: list[Sample], test: list[Sample]) -> None:
        """Refuse data that contradicts itself or leaks: one example twice on a side, on both sides,
        or in the test file as well as in training (each would count twice or teach nothing)."""
        seen: dict[tuple[str, str | None], str] = {}
        for rows, side in ((ins, "in-scope"), (outs, "out-of-scope"), (test, "test")):
            here: set[tuple[str, str | None]] = set()
            for sample in rows:
                key = (" ".join(sample.question.lower().split()), str(sample.image) if sample.image else None)
                shown = sample.question if sample.image is None else f"{sample.question} [{sample.image.name}]"
                if key in here:
                    raise PolicyError(f"{self.source}: the {side} data has {shown!r} twice",
                                      hint="remove the duplicate (case and spacing are ignored)")
                if key in seen:
                    raise PolicyError(f"{self.source}: {shown!r} is in both the {seen[key]} and the {side} data",
                                      hint="an example belongs to one side, and test questions must be new")
                here.add(key)
            seen.update(dict.fromkeys(here, side))


@dataclass
class PolicyData:
    train_in: list[Sample]
    train_out: list[Sample]
    val_in: list[Sample]
    val_out: list[Sample]
    test: list[Sample]

    @property
    def has_images(self) -> bool:
        return any(s.image is not None for s in self.train_in + self.train_out)


def _row(obj: Any, where: str, base: Path, labelled: bool) -> Sample:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise PolicyError(f"{where}: missing or empty `question`")
    image = obj.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str):
            raise PolicyError(f"{where}: `image` must be a path string")
        image_path = base / image
        if Path(image).is_absolute() or not image_path.resolve().is_relative_to(base.resolve()):
            raise PolicyError(f"{where}: image {image!r} is outside the policy's folder {base}",
                              hint="keep images beside the data file (a relative path without '..')")
        _check_image(image_path, where)
    answer = _answer(obj.get("answer"), where)
    meta: dict[str, Any] = {}
    if labelled:
        label = obj.get("in_scope")
        if not isinstance(label, bool):
            raise PolicyError(f"{where}: `in_scope` must be true or false")
        meta["in_scope"] = label
    return Sample(question=question, image=image_path, answer=answer, meta=meta)


def _answer(value: Any, where: str) -> str | tuple[str, ...] | None:
    """A reference answer, or a list of accepted ones ("two" and "2"); numbers become strings."""
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    raise PolicyError(f"{where}: `answer` must be a string or a non-empty list of strings")


def _check_image(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise PolicyError(f"{where}: image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PolicyError(f"{where}: image {path} is too large ({exc})",
                          hint="resize it; models read a few hundred pixels a side") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise PolicyError(f"{where}: unreadable image {path}: {exc}") from None


def read_jsonl(path: Path, *, labelled: bool) -> list[Sample]:
    """Rows of a JSONL data file; ``labelled`` rows must carry ``in_scope``."""
    if not path.is_file():
        raise PolicyError(f"data file not found: {path}")
    rows = []
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError(f"{where}: not UTF-8 text (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PolicyError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except RecursionError:
                raise PolicyError(f"{where}: nested too deeply to be a data row") from None
            rows.append(_row(obj, where, path.parent, labelled))
    if not rows:
        raise PolicyError(f"{path}: no rows (the file is empty)")
    return rows
