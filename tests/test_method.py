"""Method components: teacher-forced vectors, gate calibration, the sweep, visual alignment."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from crvlm_plugins.aligners import CounterfactualAligner, matched_images
from crvlm_plugins.extractors import MeanDiffExtractor, TeacherForcedExtractor
from crvlm_plugins.gates import FlowGate, ProbeGate
from crvlm_plugins.locators import FixedLocator, SweepLocator
from crvlm_sdk import CrvlmError, Sample
from crvlm_sdk.components import CandidateEvaluator
from crvlm_sdk.evaluation.metrics import mb_score
from crvlm_sdk.types import Candidate

OUT = ["Who won the 1998 World Cup?", "What is the capital of Peru and why is it famous?", "How tall is Everest?"]
IN = ["How do I bake bread?", "What is a roux?", "How long do I boil an egg for a soft yolk?"]
INSTRUCTION = "Only answer questions about cooking."


def _forced_means(model, adapter, prefix, layer, read, system):
    batch = adapter.build_prompts(OUT, system=system, forced_prefix=prefix)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "left padding must be exercised"
    with torch.no_grad():
        hs = model(**batch.inputs, output_hidden_states=True).hidden_states[layer + 1]
    rows = []
    for i in range(len(OUT)):
        s, e = int(batch.prefix_start[i]), int(batch.prefix_end[i])
        rows.append(hs[i, e - 1] if read == "last" else hs[i, s:e].mean(0))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("contrast,read", [("plain", "last"), ("compliant", "mean"), ("compliant", "last")])
def test_teacher_forced_vector_matches_hand_computation(tiny_llama, contrast, read):
    model, _, adapter = tiny_llama
    layer = 1
    vectors = TeacherForcedExtractor().extract(
        adapter, [Sample(q) for q in IN], [Sample(q) for q in OUT], [layer], refusal_instruction=INSTRUCTION,
        refusal_prefix="Sorry, I can't", compliant_prefix="Sure, here", contrast=contrast, read=read,
        batch_size=3, progress=False,
    )
    refusal = _forced_means(model, adapter, "Sorry, I can't", layer, read, INSTRUCTION)
    if contrast == "plain":
        batch = adapter.build_prompts(OUT)
        with torch.no_grad():
            hs = model(**batch.inputs, output_hidden_states=True).hidden_states[layer + 1]
        reference = hs[torch.arange(len(OUT)), batch.last_prompt_index].mean(0)
    else:
        reference = _forced_means(model, adapter, "Sure, here", layer, read, INSTRUCTION)
    torch.testing.assert_close(vectors[layer], refusal - reference, rtol=1e-4, atol=1e-5)


def test_mean_diff_vector(tiny_llama):
    model, _, adapter = tiny_llama
    v = MeanDiffExtractor().extract(adapter, [Sample(q) for q in IN], [Sample(q) for q in OUT], [2],
                                    progress=False)[2]
    means = []
    for qs in (OUT, IN):
        batch = adapter.build_prompts(qs)
        with torch.no_grad():
            hs = model(**batch.inputs, output_hidden_states=True).hidden_states[3]
        means.append(hs[torch.arange(len(qs)), batch.last_prompt_index].mean(0))
    torch.testing.assert_close(v, means[0] - means[1], rtol=1e-4, atol=1e-5)


def test_extractor_option_errors(tiny_llama):
    _, _, adapter = tiny_llama
    with pytest.raises(CrvlmError, match="contrast must be"):
        TeacherForcedExtractor().extract(adapter, [], [Sample("x")], [0], contrast="bogus")
    with pytest.raises(CrvlmError, match="needs out-of-scope samples"):
        TeacherForcedExtractor().extract(adapter, [Sample("x")], [], [0])


def _clouds(separation: float, seed: int = 0, hidden: int = 16):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0)

    def cloud(n: int, sign: int) -> torch.Tensor:
        return torch.randn(n, hidden, generator=g) + sign * separation / 2 * direction

    return cloud


GATES = [ProbeGate, FlowGate]


@pytest.mark.parametrize("gate_cls", GATES)
@pytest.mark.parametrize("target", [0.02, 0.1])
def test_gate_calibration_meets_target_on_separable_data(gate_cls, target):
    cloud = _clouds(separation=8.0)
    gate = gate_cls.untrained(16)
    assert gate.fit(cloud(300, -1), cloud(300, +1))["train_accuracy"] == 1.0
    gate.calibrate(cloud(60, -1), target_over_refusal=target)
    flagged = float((gate.score(cloud(5000, -1)) > 0.5).float().mean())
    caught = float((gate.score(cloud(5000, +1)) > 0.5).float().mean())
    assert flagged <= target
    assert caught > 0.99
    again = gate_cls.from_tensors(gate.tensors(), gate.config())  # threshold survives save/load
    probe = cloud(10, -1)
    assert type(again) is gate_cls
    assert torch.equal(again.score(probe), gate.score(probe))


@pytest.mark.parametrize("gate_cls", GATES)
@pytest.mark.parametrize("target", [0.02, 0.1])
def test_gate_calibration_hits_target_on_overlapping_data(gate_cls, target):
    """When classes overlap, the calibrated threshold lets through about `target` of new in-scope
    rows (1000 calibration rows: with 200 the threshold's own sampling error is about ±40% of a 2%
    target, more than the tolerance)."""
    cloud = _clouds(separation=2.0, seed=1)
    gate = gate_cls.untrained(16)
    gate.fit(cloud(400, -1), cloud(400, +1))
    gate.calibrate(cloud(1000, -1), target_over_refusal=target)
    assert gate.threshold > 0
    flagged = float((gate.score(cloud(20000, -1)) > 0.5).float().mean())
    assert abs(flagged - target) < 0.5 * target


@pytest.mark.parametrize("gate_cls", GATES)
def test_gate_decides_each_row_of_a_batch_alone(gate_cls):
    """A row's score does not depend on the rows batched with it."""
    cloud = _clouds(separation=4.0, seed=2)
    gate = gate_cls.untrained(16)
    gate.fit(cloud(200, -1), cloud(200, +1))
    gate.calibrate(cloud(50, -1))
    batch = torch.cat([cloud(5, -1), cloud(5, +1)])
    together = gate.score(batch)
    alone = torch.cat([gate.score(row[None]) for row in batch])
    torch.testing.assert_close(together, alone)
    assert (together[:5] < 0.5).all() and (together[5:] > 0.5).all()


def test_flow_gate_moves_out_of_scope_rows_along_the_class_difference_and_keeps_in_scope_rows():
    """The flow field's training, read back: out-of-scope rows shift toward the out-of-scope
    class, in-scope rows barely move, and the shift is not normalised (it scales with p)."""
    cloud = _clouds(separation=6.0, seed=3)
    h_in, h_out = cloud(300, -1), cloud(300, +1)
    gate = FlowGate.untrained(16)
    metrics = gate.fit(h_in, h_out)
    assert metrics["train_accuracy"] == 1.0
    d = h_out.mean(0) - h_in.mean(0)
    moved_out, moved_in = gate.shift(cloud(200, +1)), gate.shift(cloud(200, -1))
    cos = torch.nn.functional.cosine_similarity(moved_out, d[None], dim=1)
    assert float(cos.median()) > 0.9
    assert float(moved_out.norm(dim=1).median()) > 0.5 * float(d.norm())
    assert float(moved_in.norm(dim=1).median()) < 0.1 * float(moved_out.norm(dim=1).median())
    with pytest.raises(CrvlmError, match="flow gate tensors"):
        FlowGate.from_tensors({k: v for k, v in gate.tensors().items() if k != "flow_out"}, gate.config())


DEFAULTS = Candidate((6,), 1.0, response={"mode": "steer", "opening": "Sorry,", "stop_sentences": 1,
                                          "message": "No."})


class FakeScorer(CandidateEvaluator):
    """Scores peak at rotation [6] × 1.0 on 8 tokens with opening and one sentence; strength
    1.2 over-refuses; the template ties the best unless told otherwise."""

    def __init__(self, defaults: Candidate = DEFAULTS, template: float = 0.9, strong: float = 0.5) -> None:
        self.defaults, self.template, self.strong = defaults, template, strong
        self.calls: list[list[Candidate]] = []

    def many(self, candidates):
        self.calls.append(list(candidates))
        return [self.score(c) for c in candidates]

    def score(self, c: Candidate) -> dict:
        spec = c.response
        if spec.get("mode") == "template":
            srs = self.template
        elif c.strength == 0:
            srs = 0.5
        else:
            srs = 0.9 - 0.1 * abs(c.band[0] - 6) - abs(c.strength - 1.0) - 0.2 * (c.operator == "additive") \
                - 0.1 * (c.decode_steps != 8) - 0.3 * (spec.get("stop_sentences") != 1) - 0.3 * (not spec["opening"])
        if c.strength > 1.15:
            srs = self.strong
        brs = 0.2 if c.strength > 1.15 else 0.0
        return {"alpha": 2 * c.strength, "srs": srs, "srs_keyword": srs, "brs": brs, "mb": mb_score(srs, brs)}


def test_sweep_stages_choose_the_most_clean_refusals_and_are_deterministic():
    runs = []
    for _ in range(2):
        scorer = FakeScorer()
        runs.append((scorer.calls, SweepLocator().locate(30, scorer, gate_layer=20, seed=0)))
    (calls_a, a), (calls_b, b) = runs
    assert calls_a == calls_b and a.table == b.table
    assert [len(c) for c in calls_a] == [12, 2, 3], "steering, steered tokens, response: one batch each"
    assert a.candidate == replace(DEFAULTS, band=(6,), strength=1.0, operator="rotation", decode_steps=8)
    assert a.band == [6] and a.alpha == pytest.approx(2.0) and a.gate_layer == 20
    assert sum(row["chosen"] for row in a.table) == 1
    assert a.table[0]["strength"] == 0.0, "no steering is a candidate when the response forces an opening"
    steering = [c for c in calls_a[0] if c.strength]
    assert {c.operator for c in steering} == {"rotation", "additive"} and {c.band for c in steering} == {(6,), (9,)}
    assert {c.decode_steps for c in calls_a[1]} == {6, 12}
    last = calls_a[2]
    assert [c.response.get("stop_sentences") for c in last[:1]] == [2] and last[1].response["opening"] == ""
    assert last[2].response["mode"] == "template", "the template answer ties and loses to steering"


def test_sweep_takes_the_template_when_it_refuses_more_cleanly():
    choice = SweepLocator().locate(30, FakeScorer(template=0.95), gate_layer=20)
    assert choice.candidate.response["mode"] == "template"


def test_sweep_keeps_under_the_over_refusal_ceiling():
    choice = SweepLocator().locate(30, FakeScorer(strong=1.0), gate_layer=20)
    assert choice.candidate.strength == 1.0, "strength 1.2 refuses more but over-refuses"
    looser = SweepLocator().locate(30, FakeScorer(strong=1.0), gate_layer=20, brs_ceiling=0.5)
    assert looser.candidate.strength == pytest.approx(1.2)


def test_sweep_leaves_fixed_settings_alone():
    scorer = FakeScorer()
    choice = SweepLocator().locate(30, scorer, gate_layer=20, decode_steps=None, vary_response=())
    assert len(scorer.calls) == 1 and all(c.decode_steps is None for c in scorer.calls[0])
    assert choice.candidate.response == DEFAULTS.response
    pure = FakeScorer(defaults=replace(DEFAULTS, response={"mode": "steer", "opening": "", "stop_sentences": None}))
    SweepLocator().locate(30, pure, gate_layer=20, vary_response=())
    assert all(c.strength > 0 for c in pure.calls[0]), "without an opening, no steering means no refusal"


def test_sweep_grid_follows_a_given_operator():
    scorer = FakeScorer()
    SweepLocator().locate(30, scorer, gate_layer=20, operator="rotation", vary_response=())
    steering = [c for c in scorer.calls[0] if c.strength]
    assert {c.operator for c in steering} == {"rotation"} and max(c.strength for c in steering) == 1.2
    explicit = FakeScorer()
    SweepLocator().locate(30, explicit, gate_layer=20, operator="additive", grid=[(3, (0.2,))], vary_response=())
    assert {(len(c.band), c.strength) for c in explicit.calls[0] if c.strength} == {(3, 0.2)}


def test_sweep_fits_bands_inside_a_small_model():
    scorer = FakeScorer(defaults=replace(DEFAULTS, band=(0,)))
    choice = SweepLocator().locate(2, scorer, gate_layer=1, seed=0)
    tried = [c for call in scorer.calls for c in call]
    assert all(set(c.band) <= {0, 1} for c in tried)
    assert len(tried) == len({repr(c) for c in tried}), "no candidate is scored twice"
    assert set(choice.band) <= {0, 1}


def test_sweep_respects_time_budget():
    scorer = FakeScorer()
    choice = SweepLocator().locate(30, scorer, gate_layer=20, time_budget=0.0)
    assert len(scorer.calls) == 1, "the first stage always runs"
    assert all("skipped" in row for row in choice.table if row["stage"] != "steering")


def test_sweep_tries_every_candidate_without_a_budget(monkeypatch):
    import plugins.locators as locators

    clock = iter(range(0, 10**6, 10**4))  # every evaluation "takes" hours
    monkeypatch.setattr(locators.time, "monotonic", lambda: next(clock))
    choice = SweepLocator().locate(30, FakeScorer(), gate_layer=20)
    assert len(choice.table) == 17 and not any("skipped" in row for row in choice.table)


def test_fixed_locator():
    scorer = FakeScorer()
    choice = FixedLocator().locate(30, scorer, gate_layer=3, band=[7, 5, 6], strength=0.5)
    assert choice.band == [5, 6, 7] and choice.candidate is None
    assert scorer.calls == [[replace(DEFAULTS, band=(5, 6, 7), strength=0.5)]], "the build's other settings"
    with pytest.raises(CrvlmError, match="needs `band` and `strength`"):
        FixedLocator().locate(30, FakeScorer(), gate_layer=3)


@pytest.mark.parametrize("operator", [None, "additive", "rotation"])
def test_sweep_names_every_layer_it_may_choose(operator):
    """The build extracts vectors only at these layers: a band outside them would have none."""
    scorer = FakeScorer()
    SweepLocator().locate(30, scorer, gate_layer=20, operator=operator)
    tried = {layer for call in scorer.calls for c in call for layer in c.band}
    assert SweepLocator().candidate_layers(30, operator=operator) == sorted(tried)
    assert max(tried) < 15, "early-middle layers: a capture pass can stop halfway"


def test_fixed_locator_names_its_band():
    assert FixedLocator().candidate_layers(30, band=[7, 5, 6], strength=0.5) == [5, 6, 7]
    assert FixedLocator().candidate_layers(30) is None
    assert FixedLocator().candidate_layers(30, band=[40]) is None  # locate reports the bad band


def _colour_images(tmp_path, names):
    from PIL import Image

    paths = []
    for i, name in enumerate(names):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(path)
        paths.append(path)
    return paths


def test_counterfactual_pairs_are_matched_and_reproducible(tmp_path):
    outs = [Sample("q", p) for p in _colour_images(tmp_path, ["o1", "o2", "o3", "o4"])]
    ins = [Sample("q", p) for p in _colour_images(tmp_path, ["i1", "i2"])] + [Sample("text only")]
    pairs = matched_images(ins, outs, seed=3)
    assert len(pairs) == 2  # equal-size sets: the smaller side decides
    assert pairs == matched_images(list(reversed(ins)), list(reversed(outs)), seed=3)  # not list order
    assert {str(i) for _, i in pairs} == {str(tmp_path / "i1.png"), str(tmp_path / "i2.png")}


def test_counterfactual_aligner_on_tiny_llava(tiny_llava_dir, tmp_path):
    from crvlm_sdk import adapter_for, load_model

    model, processor = load_model(tiny_llava_dir)
    adapter = adapter_for(model, processor)
    outs = [Sample("What is it?", p) for p in _colour_images(tmp_path, ["o1", "o2", "o3"])]
    ins = [Sample("What is it?", p) for p in _colour_images(tmp_path, ["i1", "i2", "i3"])]
    result = CounterfactualAligner().align(adapter, ins, outs, {1: torch.zeros(32), 2: torch.zeros(32)},
                                           refusal_instruction="Refuse.", refusal_prefix="Sorry,", progress=False)
    assert set(result["directions"]) == {1, 2}
    assert result["gate_in"][1].shape == (3, 32) and result["gate_out"][2].shape == (3, 32)
    assert len(result["pairs"]) == 3
    # no images -> no-op
    assert CounterfactualAligner().align(adapter, [Sample("a")], [Sample("b")], {1: torch.zeros(32)},
                                         progress=False) == {}
