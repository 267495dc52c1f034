"""Method components: teacher-forced vectors, gate calibration, the sweep, visual alignment."""

from __future__ import annotations

import pytest
import torch

from crvlm_plugins.aligners import CounterfactualAligner, matched_images
from crvlm_plugins.extractors import MeanDiffExtractor, TeacherForcedExtractor
from crvlm_plugins.gates import ProbeGate
from crvlm_plugins.locators import FixedLocator, SweepLocator
from crvlm_sdk import CrvlmError, Sample

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


@pytest.mark.parametrize("target", [0.02, 0.1])
def test_gate_calibration_meets_target_on_separable_data(target):
    cloud = _clouds(separation=8.0)
    gate = ProbeGate.untrained(16)
    assert gate.fit(cloud(300, -1), cloud(300, +1))["train_accuracy"] == 1.0
    gate.calibrate(cloud(60, -1), target_over_refusal=target)
    flagged = float((gate.score(cloud(5000, -1)) > 0.5).float().mean())
    caught = float((gate.score(cloud(5000, +1)) > 0.5).float().mean())
    assert flagged <= target
    assert caught > 0.99
    again = ProbeGate.from_tensors(gate.tensors(), gate.config())  # threshold survives save/load
    probe = cloud(10, -1)
    assert torch.equal(again.score(probe), gate.score(probe))


@pytest.mark.parametrize("target", [0.02, 0.1])
def test_gate_calibration_hits_target_on_overlapping_data(target):
    """When classes overlap, the calibrated threshold lets through about `target` of new in-scope rows."""
    cloud = _clouds(separation=2.0, seed=1)
    gate = ProbeGate.untrained(16)
    gate.fit(cloud(400, -1), cloud(400, +1))
    gate.calibrate(cloud(200, -1), target_over_refusal=target)
    assert gate.threshold > 0
    flagged = float((gate.score(cloud(20000, -1)) > 0.5).float().mean())
    assert abs(flagged - target) < 0.5 * target


def _fake_evaluate(calls):
    def evaluate(band, strength):
        calls.append((tuple(band), strength))
        # peaks at band [6], strength 0.75; wider bands over-refuse
        mb = 1.0 - abs(band[0] - 6) * 0.05 - abs(strength - 0.75)
        return {"alpha": strength * 2, "srs": mb, "brs": 0.0 if len(band) == 1 else 0.2, "mb": mb}

    return evaluate


def test_sweep_picks_best_under_ceiling_and_is_deterministic():
    runs = []
    for _ in range(2):
        calls: list = []
        choice = SweepLocator().locate(30, _fake_evaluate(calls), gate_layer=20, seed=0)
        runs.append((calls, choice))
    (calls_a, a), (calls_b, b) = runs
    assert calls_a == calls_b and a.table == b.table
    assert a.band == [6] and a.alpha == pytest.approx(1.5) and a.gate_layer == 20
    assert sum(row["chosen"] for row in a.table) == 1
    assert all(len(row["band"]) in (1, 3) for row in a.table)


def test_sweep_grid_follows_the_operator():
    calls: list = []
    SweepLocator().locate(30, _fake_evaluate(calls), gate_layer=20, operator="rotation")
    assert {len(band) for band, _ in calls} == {1} and max(s for _, s in calls) == 1.2
    explicit: list = []
    SweepLocator().locate(30, _fake_evaluate(explicit), gate_layer=20, operator="rotation", grid=[(3, (0.2,))])
    assert {(len(band), s) for band, s in explicit} == {(3, 0.2)}


def test_sweep_fits_bands_inside_a_small_model():
    calls: list = []
    choice = SweepLocator().locate(2, _fake_evaluate(calls), gate_layer=1, seed=0)
    assert all(set(band) <= {0, 1} for band, _ in calls)
    assert len(calls) == len({(tuple(band), strength) for band, strength in calls})  # no repeats
    assert set(choice.band) <= {0, 1}


def test_sweep_respects_time_budget():
    calls: list = []
    choice = SweepLocator().locate(30, _fake_evaluate(calls), gate_layer=20, time_budget=0.0)
    assert len(calls) == 1  # the first candidate always runs
    assert sum("skipped" in row for row in choice.table) == len(choice.table) - 1


def test_sweep_tries_every_candidate_without_a_budget(monkeypatch):
    import plugins.locators as locators

    clock = iter(range(0, 10**6, 10**4))  # every evaluation "takes" hours
    monkeypatch.setattr(locators.time, "monotonic", lambda: next(clock))
    calls: list = []
    choice = SweepLocator().locate(30, _fake_evaluate(calls), gate_layer=20)
    assert len(calls) == len(choice.table) == 18 and not any("skipped" in row for row in choice.table)


def test_fixed_locator():
    calls: list = []
    choice = FixedLocator().locate(30, _fake_evaluate(calls), gate_layer=3, band=[7, 5, 6], strength=0.5)
    assert choice.band == [5, 6, 7] and calls == [((5, 6, 7), 0.5)]
    with pytest.raises(CrvlmError, match="needs `band` and `strength`"):
        FixedLocator().locate(30, _fake_evaluate([]), gate_layer=3)


@pytest.mark.parametrize("operator", ["additive", "rotation"])
def test_sweep_names_every_layer_it_may_choose(operator):
    """The build extracts vectors only at these layers: a band outside them would have none."""
    calls: list = []
    SweepLocator().locate(30, _fake_evaluate(calls), gate_layer=20, operator=operator)
    tried = {layer for band, _ in calls for layer in band}
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
