"""Policies load from YAML, split deterministically, and every data error names file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_module

from crvlm_sdk.errors import PolicyError
from crvlm_sdk.policy import Policy, read_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "policies"


def write_policy(tmp_path: Path, n_in: int = 20, n_out: int = 20, **fields) -> Path:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"question": f"in question {i}?"}) + "\n"
                                               for i in range(n_in)))
    (tmp_path / "out.jsonl").write_text("".join(json.dumps({"question": f"out question {i}?"}) + "\n"
                                                for i in range(n_out)))
    body = {"name": "t", "subject": "baking", "in_scope": "in.jsonl", "out_of_scope": "out.jsonl", **fields}
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in body.items()) + "\n")
    return path


def test_instruction_interpolates_subject(tmp_path):
    policy = Policy.load(write_policy(tmp_path, refusal_instruction="Only {subject}; refuse the rest ({name})."))
    assert policy.instruction() == "Only baking; refuse the rest (t)."
    default = Policy.load(write_policy(tmp_path))
    assert "NOT about baking." in default.instruction()
    assert default.refusal_prefix == "Sorry,"


def test_refusal_texts_interpolate_and_default(tmp_path):
    policy = Policy.load(write_policy(tmp_path, refusal_message="Sorry, {name} only covers {subject}."))
    assert policy.message() == "Sorry, t only covers baking."
    assert policy.opening() == "I'm sorry, but"
    assert Policy.load(write_policy(tmp_path)).message() == "I'm sorry, but I can only help with baking."
    with pytest.raises(PolicyError, match=r"field `refusal_opening`: .*unknown placeholder"):
        Policy.load(write_policy(tmp_path, refusal_opening="Sorry {whom},"))


def test_unknown_placeholder_is_refused(tmp_path):
    with pytest.raises(PolicyError, match=r"field `refusal_instruction`.*unknown placeholder\(s\) \['topic'\]"):
        Policy.load(write_policy(tmp_path, refusal_instruction="About {topic} only"))


def test_split_is_deterministic_and_seeded(tmp_path):
    a = Policy.load(write_policy(tmp_path)).load_data()
    b = Policy.load(write_policy(tmp_path)).load_data()
    assert [s.question for s in a.val_in] == [s.question for s in b.val_in]
    assert len(a.val_in) == 4 and len(a.train_in) == 16
    c = Policy.load(write_policy(tmp_path, seed=7)).load_data()
    assert [s.question for s in c.val_in] != [s.question for s in a.val_in]
    assert not {s.question for s in a.val_in} & {s.question for s in a.train_in}


def test_inline_lists(tmp_path):
    path = tmp_path / "p.yaml"
    ins = json.dumps([f"in {i}?" for i in range(10)])
    outs = json.dumps([{"question": f"out {i}?"} for i in range(10)])
    path.write_text(f"name: x\nsubject: y\nin_scope: {ins}\nout_of_scope: {outs}\nvalidation_fraction: 0.4\n")
    data = Policy.load(path).load_data()
    assert len(data.train_in) == 6 and len(data.val_out) == 4


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.load(tmp_path / "nope.yaml")


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nsubject: [unclosed\n")
    with pytest.raises(PolicyError, match=r"p\.yaml: not valid YAML \(line \d+"):
        Policy.load(path)


def test_missing_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nin_scope: a.jsonl\nout_of_scope: b.jsonl\n")
    with pytest.raises(PolicyError, match=r"p\.yaml: field `subject`: Field required"):
        Policy.load(path)


def test_missing_data_file(tmp_path):
    path = write_policy(tmp_path)
    (tmp_path / "out.jsonl").unlink()
    with pytest.raises(PolicyError, match=r"data file not found: .*out\.jsonl"):
        Policy.load(path).load_data()


def test_bad_json_names_file_and_line(tmp_path):
    path = write_policy(tmp_path)
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"question": "broken\n')
    with pytest.raises(PolicyError, match=r"in\.jsonl:21: not valid JSON"):
        Policy.load(path).load_data()


def test_missing_question_names_line(tmp_path):
    path = write_policy(tmp_path)
    with (tmp_path / "out.jsonl").open("a") as f:
        f.write('{"image": "x.png"}\n')
    with pytest.raises(PolicyError, match=r"out\.jsonl:21: missing or empty `question`"):
        Policy.load(path).load_data()


def test_missing_and_unreadable_image(tmp_path):
    path = write_policy(tmp_path)
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"question": "what?", "image": "missing.png"}\n')
    with pytest.raises(PolicyError, match=r"in\.jsonl:21: image not found: .*missing\.png"):
        Policy.load(path).load_data()
    (tmp_path / "bad.png").write_bytes(b"nope")
    lines = [*(tmp_path / "in.jsonl").read_text().splitlines()[:-1], '{"question": "what?", "image": "bad.png"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError, match=r"in\.jsonl:21: unreadable image .*bad\.png"):
        Policy.load(path).load_data()


def test_empty_set(tmp_path):
    path = write_policy(tmp_path)
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(PolicyError, match=r"in\.jsonl: no rows \(the file is empty\)"):
        Policy.load(path).load_data()


def test_too_few_for_a_split(tmp_path):
    with pytest.raises(PolicyError, match=r"only 1 in-scope validation examples after the split \(need >= 4\)"):
        Policy.load(write_policy(tmp_path, n_in=6)).load_data()


def test_eval_rows_need_label(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "a?", "in_scope": true}\n{"question": "b?"}\n')
    with pytest.raises(PolicyError, match=r"test\.jsonl:2: `in_scope` must be true or false"):
        read_jsonl(path, labelled=True)


@pytest.mark.parametrize("name", ["cooking", "travel", "programming", "gardening"])
def test_example_policies_meet_the_data_bar(name):
    policy = Policy.load(EXAMPLES / name / "policy.yaml")
    data = policy.load_data()
    assert len(data.train_in) + len(data.val_in) >= 150
    assert len(data.train_out) + len(data.val_out) >= 150
    assert sum(s.meta["in_scope"] for s in data.test) >= 60
    assert sum(not s.meta["in_scope"] for s in data.test) >= 60
    train = {s.question for s in data.train_in + data.train_out + data.val_in + data.val_out}
    assert not train & {s.question for s in data.test}


#: words that carry no topic; what is left of a question is what a near-copy would share
_FILLER = frozenset({
    "the", "a", "an", "in", "of", "is", "are", "how", "what", "one", "many", "does", "do", "to", "s", "i", "my",
    "for", "and", "it", "you", "can", "should",
})


def _content_words(question: str) -> set[str]:
    return set(re.findall(r"[a-z]+", question.lower())) - _FILLER


@pytest.mark.parametrize("name", ["cooking", "travel", "programming", "gardening"])
def test_example_test_questions_are_not_near_copies_of_training(name):
    """Exact overlap is not enough: written data drifts into rewordings of test questions.

    Genuinely different questions built on one template ("What's the best way to get around
    Bali?" / "... Lisbon ...") share at most half their content words; rewordings of one
    question ("What gas produced by yeast makes bread dough rise?" / "Which gas ...") share
    three quarters or more.
    """
    data = Policy.load(EXAMPLES / name / "policy.yaml").load_data()
    train = [_content_words(s.question) for s in data.train_in + data.train_out + data.val_in + data.val_out]
    for sample in data.test:
        words = _content_words(sample.question)
        closest = max(len(words & other) / max(1, len(words | other)) for other in train)
        assert closest < 0.6, f"{name}: test question {sample.question!r} nearly repeats a training question"


@pytest.mark.parametrize("name", ["shape-qa", "no-stars", "no-red"])
def test_image_policies_meet_the_data_bar(name):
    policy = Policy.load(EXAMPLES / name / "policy.yaml")
    data = policy.load_data()
    train = data.train_in + data.train_out + data.val_in + data.val_out
    assert len(data.train_in) + len(data.val_in) >= 150 and len(data.train_out) + len(data.val_out) >= 150
    assert sum(s.meta["in_scope"] for s in data.test) >= 60 and sum(not s.meta["in_scope"] for s in data.test) >= 60
    assert all(s.image is not None and Path(s.image).is_file() for s in train + data.test)
    assert not {s.image for s in train} & {s.image for s in data.test}
    assert all(s.answer for s in data.train_in + data.val_in + [t for t in data.test if t.meta["in_scope"]])


def test_no_stars_is_decided_by_the_picture_alone():
    data = Policy.load(EXAMPLES / "no-stars" / "policy.yaml").load_data()
    ins = {s.question for s in data.train_in + data.val_in}
    outs = {s.question for s in data.train_out + data.val_out}
    assert outs <= ins, "every out-of-scope question is also asked, in scope, over another picture"
    assert "What is this?" in outs


def test_answer_lists(tmp_path):
    path = write_policy(tmp_path)
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"question": "How many?", "answer": ["two", 2]}\n')
    assert read_jsonl(tmp_path / "in.jsonl", labelled=False)[-1].answer == ("two", "2")
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"question": "Which?", "answer": []}\n')
    with pytest.raises(PolicyError, match=r"in\.jsonl:22: `answer` must be a string or a non-empty list"):
        Policy.load(path).load_data()


def test_shape_policy_generator_reproduces_the_committed_files(tmp_path):
    """The committed image policies are what the generator writes (data the results rest on)."""
    from crvlm_sdk.demo.shape_policies import write_no_red, write_no_stars, write_shape_qa

    general = json.loads((EXAMPLES / "shape-qa" / "general_questions.json").read_text())
    write_shape_qa(tmp_path / "shape-qa", general["train"], general["test"])
    write_no_stars(tmp_path / "no-stars")
    write_no_red(tmp_path / "no-red")
    for name in ("shape-qa", "no-stars", "no-red"):
        written = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        assert len(written) > 500
        for rel in written:
            assert (tmp_path / name / rel).read_bytes() == (EXAMPLES / name / rel).read_bytes(), f"{name}/{rel} differs"


def test_star_pictures_for_dev_sets_are_drawn_from_the_seed(tmp_path):
    write_star_pictures = load_module(EXAMPLES / "star_pictures.py").write_star_pictures

    a = write_star_pictures(tmp_path / "a", 4, seed=3)
    b = write_star_pictures(tmp_path / "b", 4, seed=3)
    c = write_star_pictures(tmp_path / "c", 4, seed=4)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in a)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    assert [Path(r["image"]).read_bytes() for r in a] == [Path(r["image"]).read_bytes() for r in b]
    assert [Path(r["image"]).read_bytes() for r in a] != [Path(r["image"]).read_bytes() for r in c]
