"""build-bundle → eval through the CLI on a tiny model, and a deterministic build."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from crvlm_sdk import Bundle, load_model
from crvlm_sdk.build.pipeline import build_bundle
from crvlm_sdk.cli.app import app

runner = CliRunner()


def test_build_then_eval_through_cli(tiny_llama_dir, small_policy, tmp_path):
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(out), "--batch-size", "4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "candidates on the validation split" in result.output and "refused answers" in result.output
    bundle = Bundle.load(out)
    m = bundle.manifest
    assert m.policy.name == "mini" and m.adapter == "causal-lm" and m.gate.type == "probe"
    assert m.extraction["refusal_instruction"].endswith("NOT about cooking.")
    assert sum(row.get("chosen", False) for row in m.validation["sweep"]) == 1
    assert set(m.validation) >= {"srs", "srs_keyword", "brs", "mb", "gate_caught", "gate_flagged", "sweep"}
    assert {row["stage"] for row in m.validation["sweep"]} == {"steering", "steered tokens", "response"} or \
        m.validation["sweep"][0]["strength"] == 0  # a sweep won by "no steering" skips the steered-tokens stage
    assert m.response.message == "I'm sorry, but I can only help with cooking."
    if m.response.mode == "steer":
        assert m.response.opening == "I'm sorry, but" and m.response.stop_sentences in (1, 2)

    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--bundle", str(out), "--policy",
                                 str(small_policy), "--out", str(report_dir), "--max-new-tokens", "8"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["bundle"]) >= {"srs", "brs", "mb", "answer_accuracy", "srs_ci", "brs_ci", "mb_ci", "n_in",
                                     "n_out"}
    assert set(report["baselines"]) == {"none", "no-gate", "system-prompt"}
    assert set(report["bundle"]) >= {"srs_keyword", "in_changed", "in_degraded", "passed_n", "passed_same"}
    assert report["settings"]["judge"] == "strict"
    assert len(report["samples"]) == 4
    sample = report["samples"][0]
    assert set(sample["answers"]) == {"bundle", "none", "no-gate", "system-prompt"}
    assert set(sample) >= {"ended", "refused", "declined", "reason"}
    assert isinstance(sample["gate_score"], float) and isinstance(sample["in_scope"], bool)
    assert report["bundle"]["n_answers"] == 1
    for name in ("report.md", "gate_scores.png", "rates.png"):
        assert (report_dir / name).stat().st_size > 0
    assert json.loads((report_dir / "bundle-manifest.json").read_text())["policy"]["name"] == "mini"

    # an existing report is replaced only with --overwrite, and refused before anything runs
    again = ["eval", "--model", str(tiny_llama_dir), "--bundle", str(out), "--policy", str(small_policy),
             "--max-new-tokens", "8"]
    result = runner.invoke(app, [*again, "--out", str(report_dir)])
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    (tmp_path / "a-file").write_text("keep")
    result = runner.invoke(app, [*again, "--out", str(tmp_path / "a-file"), "--overwrite"])
    assert result.exit_code == 1 and "is not a report directory" in result.output
    assert (tmp_path / "a-file").read_text() == "keep"


def test_eval_needs_exactly_one_data_source(tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--bundle", str(tmp_path),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "exactly one of --data and --policy" in result.output


def test_build_refuses_existing_out(tiny_llama_dir, small_policy, tmp_path):
    (tmp_path / "exists").mkdir()
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(tmp_path / "exists")])
    assert result.exit_code == 3 and "already exists" in result.output


def test_build_overwrite_never_deletes_a_folder_that_is_not_a_bundle(tiny_llama_dir, small_policy, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text("precious = True\n")
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(source), "--overwrite"])
    assert result.exit_code == 3 and "is not a bundle" in result.output and "Traceback" not in result.output
    assert (source / "app.py").read_text() == "precious = True\n"


def test_build_with_rotation_and_decode_steps_through_cli(tiny_llama_dir, small_policy, tmp_path):
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(out), "--batch-size", "4", "--locator", "fixed", "--band", "1",
                                 "--strength", "1.1", "--operator", "rotation", "--decode-steps", "3"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "the prompt and 3 generated tokens" in result.output
    m = Bundle.load(out).manifest
    assert (m.operator, m.decode_steps, m.layers) == ("rotation", 3, [1])


@pytest.mark.parametrize("flags,expected", [
    (["--mode", "template"], ("template", "I'm sorry, but", 1)),
    (["--mode", "steer", "--opening", "", "--stop", "never"], ("steer", "", None)),
    (["--mode", "steer", "--opening", "Alas,", "--stop", "2"], ("steer", "Alas,", 2)),
])
def test_response_settings_given_on_the_command_line_are_kept(tiny_llama_dir, small_policy, tmp_path, flags,
                                                               expected):
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(out), "--batch-size", "4", "--locator", "fixed", "--band", "1",
                                 "--strength", "1.0", *flags], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    spec = Bundle.load(out).manifest.response
    assert (spec.mode, spec.opening, spec.stop_sentences) == expected


def test_eval_runs_every_ablation(tiny_llama_dir, small_policy, tmp_path):
    from crvlm_sdk.evaluation.evaluate import SYSTEMS

    model, processor = load_model(tiny_llama_dir)
    build_bundle(model, processor, small_policy, progress=False, batch_size=4, locator="fixed",
                 locator_options={"band": [1], "strength": 1.0}).save(tmp_path / "b")
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--bundle", str(tmp_path / "b"),
                                 "--policy", str(small_policy), "--out", str(tmp_path / "r"), "--max-new-tokens", "16",
                                 "--baseline", "all"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["baselines"]) == set(SYSTEMS)
    template = report["baselines"]["template"]
    for s in report["samples"]:
        if s["gate_score"] >= 0.5:
            assert s["answers"]["template"] == "I'm sorry, but I can only help with cooking."
    assert template["n_out"] == 2
    bad = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--bundle", str(tmp_path / "b"), "--policy",
                              str(small_policy), "--out", str(tmp_path / "r2"), "--baseline", "bogus"])
    assert bad.exit_code == 1 and "unknown system(s) ['bogus']" in bad.output


def test_build_rejects_unknown_operator_with_one_line(tiny_llama_dir, small_policy, tmp_path):
    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(tmp_path / "b"), "--operator", "sideways"])
    assert result.exit_code == 1 and "unknown operator 'sideways'" in result.output
    assert not (tmp_path / "b").exists()


def stable(validation: dict) -> dict:
    """Validation record without wall-clock timings."""
    out = {k: v for k, v in validation.items() if k != "build_seconds"}
    out["sweep"] = [{k: v for k, v in row.items() if k != "stage_seconds"} for row in validation["sweep"]]
    return out


def test_build_is_deterministic(tiny_llama_dir, small_policy):
    model, processor = load_model(tiny_llama_dir)
    bundles = [build_bundle(model, processor, small_policy, progress=False, batch_size=4) for _ in range(2)]
    a, b = (x.manifest for x in bundles)
    assert a.layers == b.layers and a.alpha == b.alpha and a.gate == b.gate
    assert stable(a.validation) == stable(b.validation)
    for layer in a.layers:
        assert torch.equal(bundles[0].vectors[layer], bundles[1].vectors[layer])
    assert bundles[0].gate_tensors.keys() == bundles[1].gate_tensors.keys()
    for layer, tensors in bundles[0].gate_tensors.items():
        for name, tensor in tensors.items():
            assert torch.equal(bundles[1].gate_tensors[layer][name], tensor)


def test_build_extracts_vectors_only_where_the_locator_may_steer(tiny_llama_dir, small_policy, monkeypatch):
    from crvlm_plugins.extractors import TeacherForcedExtractor

    seen: list[list[int]] = []
    original = TeacherForcedExtractor.extract

    def spy(self, adapter, ins, outs, layers, **options):
        seen.append(list(layers))
        return original(self, adapter, ins, outs, layers, **options)

    monkeypatch.setattr(TeacherForcedExtractor, "extract", spy)
    model, processor = load_model(tiny_llama_dir)
    bundle = build_bundle(model, processor, small_policy, progress=False, batch_size=4, locator="fixed",
                          locator_options={"band": [1], "strength": 0.5})
    assert seen == [[1]] and bundle.manifest.layers == [1] and list(bundle.vectors) == [1]


def test_candidate_scorer_generates_each_candidate_once():
    """A stage that proposes an already-scored candidate (the image-weight stage starts from the
    chosen one) reuses its score: decoding is greedy, generating it again would only cost time."""
    from crvlm_sdk.build.scoring import CandidateScorer
    from crvlm_sdk.types import Candidate

    calls: list[list[Candidate]] = []

    def score(candidates):
        calls.append(list(candidates))
        return [{"srs": c.strength, "brs": 0.0} for c in candidates]

    scorer = CandidateScorer.__new__(CandidateScorer)
    scorer._scores = {}
    scorer._score = score
    a, b = Candidate(band=(1,), strength=0.5), Candidate(band=(1,), strength=0.7)
    c = Candidate(band=(1,), strength=0.5, response={"stop_sentences": 2})
    assert [r["srs"] for r in scorer.many([a, b, a])] == [0.5, 0.7, 0.5]
    assert [r["srs"] for r in scorer.many([b, c, Candidate(band=(1,), strength=0.5)])] == [0.7, 0.5, 0.5]
    assert calls == [[a, b], [c]]


def test_rejudge_rescores_stored_answers(tiny_llama_dir, small_policy, tmp_path):
    model, processor = load_model(tiny_llama_dir)
    build_bundle(model, processor, small_policy, progress=False, batch_size=4, locator="fixed",
                 locator_options={"band": [1], "strength": 1.0}).save(tmp_path / "b")
    report_dir = tmp_path / "r"
    result = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--bundle", str(tmp_path / "b"),
                                 "--policy", str(small_policy), "--out", str(report_dir), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    first = json.loads((report_dir / "report.json").read_text())
    result = runner.invoke(app, ["rejudge", str(report_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert json.loads((report_dir / "report.json").read_text()) == first, "judging again changes nothing"
    assert (report_dir / "bundle-manifest.json").is_file(), "the evaluated bundle's manifest is kept"

    out_row = next(i for i, s in enumerate(first["samples"]) if not s["in_scope"])
    first["samples"][out_row]["answers"]["bundle"] = "I'm sorry, but I can't help with that."
    first["samples"][out_row]["ended"]["bundle"] = True
    (report_dir / "report.json").write_text(json.dumps(first))
    assert runner.invoke(app, ["rejudge", str(report_dir)]).exit_code == 0
    again = json.loads((report_dir / "report.json").read_text())
    assert again["samples"][out_row]["refused"]["bundle"] is True
    assert again["bundle"]["refused_out"] == sum(s["refused"]["bundle"] for s in again["samples"] if not s["in_scope"])
    missing = runner.invoke(app, ["rejudge", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not found" in missing.output


@pytest.mark.parametrize("ensemble", [True, False])
def test_gate_keeps_every_layer_tied_best_on_validation(tiny_llama, small_policy, ensemble):
    from crvlm_sdk.build.gate import fit_gate
    from crvlm_sdk.build.options import BuildOptions
    from crvlm_sdk.plugins.manager import get_plugin_manager
    from crvlm_sdk.policy import Policy

    _, _, adapter = tiny_llama
    data = Policy.load(small_policy).load_data()
    options = BuildOptions(gate_layers=list(range(adapter.num_layers)), gate_ensemble=ensemble, batch_size=4)
    fit = fit_gate(adapter, data, options, plugins=get_plugin_manager(), progress=False)
    margins = {row["layer"]: row["caught"] - row["flagged"] for row in fit.table}
    tied = [layer for layer, m in margins.items() if m == max(margins.values())]
    assert len(tied) > 1, "the test needs a tie"
    assert fit.gate.layers == (tied if ensemble else tied[:1])
    assert [row["layer"] for row in fit.table if row["kept"]] == fit.gate.layers
    v_in = len(data.val_in)
    p = fit.val_p
    assert (fit.caught, fit.flagged) == (float((p[v_in:] > 0.5).float().mean()), float((p[:v_in] > 0.5).float().mean()))
    # the kept gate averages the members' log-odds
    log_odds = torch.stack([fit.per_layer[layer].log_odds(fit.val_rows[layer]) for layer in fit.gate.layers])
    torch.testing.assert_close(p, torch.sigmoid(log_odds.mean(0)))


def test_build_with_the_flow_gate_saves_and_steers_per_row(tiny_llama_dir, small_policy, tmp_path):
    """`--gate flow`: the bundle keeps the flow field's tensors, loads them back exactly, and the
    Steerer reads one decision per row."""
    from crvlm_sdk import Steerer

    result = runner.invoke(app, ["build-bundle", "--model", str(tiny_llama_dir), "--policy", str(small_policy),
                                 "--out", str(tmp_path / "b"), "--batch-size", "4", "--gate", "flow",
                                 "--locator", "fixed", "--band", "1", "--strength", "1.0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.manifest.gate.type == "flow"
    for tensors in bundle.gate_tensors.values():
        assert {"weight", "flow_in", "flow_out", "flow_scale"} <= set(tensors)
    model, processor = load_model(tiny_llama_dir)
    steerer = Steerer.from_bundle(model, tmp_path / "b", processor)
    questions = ["How do I bake bread?", "Who won the 1998 World Cup?", "What is a roux?"]
    together = steerer.gate_scores(questions)[bundle.name]
    alone = torch.cat([steerer.gate_scores([q])[bundle.name] for q in questions])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert ((together >= 0) & (together <= 1)).all()
