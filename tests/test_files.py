"""Overwriting only what crvlm wrote, refusing a directory written meanwhile, and cleaning up
after a writer that was killed (issue 14: items 2, 9, 10 and 12)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_bundle

from crvlm_sdk import Bundle
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.evaluation.report import write_marked, write_report
from crvlm_sdk.files import BUNDLE, REPORT, atomic_directory, recover_interrupted


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def bundle(tiny_llama):
    return make_bundle(tiny_llama[2])


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(bundle, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text("print('precious')\n")
    with pytest.raises(CrvlmError, match=r"is not a bundle \(it has no manifest.json\)"):
        bundle.save(source, overwrite=True)
    assert (source / "main.py").read_text() == "print('precious')\n"


def test_overwrite_refuses_a_bundle_holding_foreign_files(bundle, tmp_path):
    path = bundle.save(tmp_path / "b")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(CrvlmError, match=r"holds files a bundle does not \(notes.txt\)"):
        bundle.save(path, overwrite=True)
    assert (path / "notes.txt").is_file() and (path / "manifest.json").is_file()


def test_overwrite_refuses_a_file_and_a_symlink(bundle, tmp_path):
    (tmp_path / "file").write_text("x")
    real = bundle.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    for target in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(CrvlmError, match="is not a bundle directory"):
            bundle.save(target, overwrite=True)
    assert (tmp_path / "file").read_text() == "x" and (real / "manifest.json").is_file()


def test_overwrite_replaces_a_bundle(bundle, tmp_path):
    path = bundle.save(tmp_path / "b")
    bundle.manifest.policy.name = "second"
    bundle.save(path, overwrite=True)
    assert '"name": "second"' in (path / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_directory_written_meanwhile_is_not_replaced(bundle, tmp_path):
    """Two saves to one new path: the second to finish must fail, not replace the first."""
    target = tmp_path / "b"
    with pytest.raises(CrvlmError, match="was created by someone else"), atomic_directory(target, BUNDLE) as tmp:
        (tmp / "manifest.json").write_text("{}")
        bundle.manifest.policy.name = "first"
        bundle.save(target)  # another writer finishes first
    assert '"name": "first"' in (target / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_stale_temporaries_of_dead_writers_are_removed(bundle, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".b.{dead}.abc123.tmp"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".b.{os.getpid()}.def456.tmp"  # a writer in this process: left alone
    live.mkdir()
    bundle.save(tmp_path / "b")
    assert not stale.exists() and live.exists()


def test_a_previous_version_stranded_between_two_renames_comes_back(bundle, tmp_path):
    """Killed after moving the old bundle aside and before renaming the new one in: the next
    writer finds no bundle at the path and the old one hidden; it is put back, not deleted."""
    old = bundle.save(tmp_path / "b")
    stranded = tmp_path / f".b.old-{_dead_pid()}"
    os.replace(old, stranded)
    with pytest.raises(CrvlmError, match="already exists"):
        bundle.save(tmp_path / "b")  # recovery puts the old bundle back; no overwrite asked
    assert (tmp_path / "b" / "manifest.json").is_file() and not stranded.exists()


def _report() -> dict:
    metrics = {"srs": 1.0, "srs_ci": [0.5, 1.0], "srs_keyword": 1.0, "brs": 0.0, "brs_ci": [0.0, 0.5], "mb": 1.0,
               "mb_ci": [0.5, 1.0], "answer_accuracy": None, "answer_accuracy_ci": None, "in_changed": 0,
               "in_degraded": 0, "n_in": 1, "n_out": 1, "passed_n": 1, "passed_same": 1}
    return {"bundle": metrics, "baselines": {},
            "settings": {"policy": "p", "judge": "strict", "max_new_tokens": 8,
                         "response": {"mode": "steer", "opening": "", "stop_sentences": None, "threshold": 0.5}},
            "samples": []}


def test_a_report_is_replaced_only_when_asked_and_whole(tmp_path):
    out = tmp_path / "report"
    write_report(_report(), out, bundle_manifest="{}\n")
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "bundle-manifest.json",
                                               "gate_scores.png", "rates.png"}
    with pytest.raises(CrvlmError, match="already exists"):
        write_report(_report(), out)
    write_report(_report(), out, overwrite=True)
    assert not (out / "bundle-manifest.json").exists()  # the new report, not a mix of two
    with pytest.raises(CrvlmError, match="is not a report"):
        write_report(_report(), tmp_path, overwrite=True)
    assert REPORT.owns("rates.png") and not REPORT.owns("data.jsonl")


def test_a_marked_table_is_replaced_and_the_prose_around_it_kept(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nprose before\n")
    write_marked(doc, "t", "| a |\n| 1 |")
    write_marked(doc, "u", "other")
    doc.write_text(doc.read_text() + "prose after\n")
    write_marked(doc, "t", "| a |\n| 2 $1 \\1 |")  # a block with regex replacement syntax, taken literally
    assert doc.read_text() == ("# Results\n\nprose before\n\n<!-- t:start -->\n| a |\n| 2 $1 \\1 |\n"
                               "<!-- t:end -->\n\n<!-- u:start -->\nother\n<!-- u:end -->\nprose after\n")


_SAVER = """
import sys, time
from crvlm_sdk import Bundle
from crvlm_sdk.evaluation.report import write_marked, write_report
import json
kind, source, target = sys.argv[1:4]
if kind == "bundle":
    bundle = Bundle.load(source)
    print("ready", flush=True)
    while True:
        bundle.save(target, overwrite=True)
else:
    report = json.loads(open(source).read())
    print("ready", flush=True)
    while True:
        write_report(report, __import__("pathlib").Path(target), overwrite=True)
"""


@pytest.mark.parametrize("kind", ["bundle", "report"])
def test_kill_9_at_random_points_leaves_a_complete_artifact_and_no_debris(bundle, tmp_path, kind):
    """A writer killed outright leaves the old or the new complete artifact at the path (a
    previous version stranded between the two renames comes back on the next read or write),
    and the next write removes every temporary it left."""
    import json
    import random
    import time

    target = tmp_path / "out"
    if kind == "bundle":
        big = bundle.replaced()
        big.extra_tensors = {"pad": torch.zeros(4_000_000)}  # 16 MB: writes long enough to be cut
        source = big.save(tmp_path / "src")
        big.save(target)
    else:
        source = tmp_path / "report.json"
        source.write_text(json.dumps(_report()))
        write_report(_report(), target)
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = random.Random(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), kind, str(source), str(target)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        if kind == "bundle":
            assert Bundle.load(target).extra_tensors["pad"].numel() == 4_000_000
        else:
            recover_interrupted(target)
            assert json.loads((target / "report.json").read_text())["settings"]["policy"] == "p"
            assert {p.name for p in target.iterdir()} >= {"report.json", "report.md", "rates.png"}
    if kind == "bundle":
        Bundle.load(source).save(target, overwrite=True)
    else:
        write_report(_report(), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
