"""The adapter conformance kit: every built-in adapter passes it, and it catches broken adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import BUILTIN_ADAPTERS, pip_install_into

from crvlm_adapters.causal_lm import CausalLMAdapter
from crvlm_adapters.internvl import InternVLAdapter
from crvlm_adapters.qwen2_vl import Qwen2VLAdapter
from crvlm_sdk import PluginManager
from crvlm_sdk.testing import (
    CONFORMANCE_CHECKS,
    ConformanceError,
    ConformanceSubject,
    check_fingerprint_stable_across_save_and_load,
    check_layers_are_language_decoder,
    check_positions_under_left_padding,
    check_prompts_identical_for_extraction_and_generation,
    run_conformance,
)
from crvlm_sdk.types import Fingerprint, PromptBatch


def test_every_builtin_adapter_has_a_conformance_fixture():
    builtins = PluginManager()
    builtins.load_builtins()
    assert set(builtins.components("adapter")) == set(BUILTIN_ADAPTERS)


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", BUILTIN_ADAPTERS)
def test_builtin_adapter_conforms(builtin_subject, name, check):
    check(builtin_subject(name))


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision", "qwen2-vl", "internvl", "idefics3"])
def test_test_images_expand_to_different_token_counts(builtin_subject, name):
    """The position checks only mean something if the test images expand to different counts."""
    subject = builtin_subject(name)
    image_id = subject.adapter.image_token_id
    counts = {int((subject.adapter.build_prompts(["?"], [img]).inputs["input_ids"] == image_id).sum())
              for img in subject.images}
    assert len(counts) >= 2, counts


# -- the kit catches what it is meant to catch -------------------------------------------------
class QwenVisionBlocks(Qwen2VLAdapter):
    """What a longest-ModuleList guess gives on Qwen2-VL: the vision tower's blocks."""

    name: ClassVar[str] = "qwen-vision-blocks"
    layers_path: ClassVar[str] = "model.visual.blocks"


class InternVisionLayers(InternVLAdapter):
    name: ClassVar[str] = "internvl-vision-layers"
    layers_path: ClassVar[str] = "model.vision_tower.encoder.layer"


@pytest.mark.parametrize(("kind", "wrong"), [("qwen2-vl", QwenVisionBlocks), ("internvl", InternVisionLayers)])
def test_hooking_the_vision_tower_is_detected(builtin_subject, kind, wrong):
    good = builtin_subject(kind)
    # same count as the decoder on these fixtures, so the layout check alone cannot tell
    adapter = wrong(good.model, good.adapter.processor)
    assert len(adapter.decoder_layers()) == good.adapter.num_layers
    with pytest.raises(ConformanceError, match=r"never ran: they are not the language model's decoder layers"):
        check_layers_are_language_decoder(ConformanceSubject(adapter, images=good.images))


class QwenWithoutTokenTypes(Qwen2VLAdapter):
    """Drops ``mm_token_type_ids``: Qwen2-VL then positions image tokens as text."""

    name: ClassVar[str] = "qwen-no-token-types"
    token_type_inputs: ClassVar[dict[str, int]] = {}

    def encode_row(self, text: str, image: Any) -> dict[str, torch.Tensor]:
        enc = super().encode_row(text, image)
        enc.pop("mm_token_type_ids", None)
        return enc


def test_dropped_processor_input_is_detected(builtin_subject):
    good = builtin_subject("qwen2-vl")
    subject = ConformanceSubject(QwenWithoutTokenTypes(good.model, good.adapter.processor), images=good.images)
    with pytest.raises(ConformanceError, match=r"returns \['mm_token_type_ids'\] but the adapter's batch drops"):
        check_positions_under_left_padding(subject)


class OffByOne(CausalLMAdapter):
    """Reads the token before the last prompt token (a classic left-padding slip)."""

    name: ClassVar[str] = "off-by-one"

    def build_prompts(self, *args: Any, **kwargs: Any) -> PromptBatch:
        batch = super().build_prompts(*args, **kwargs)
        return PromptBatch(batch.inputs, batch.last_prompt_index - 1, batch.prefix_start, batch.prefix_end)


def test_wrong_position_is_detected(builtin_subject):
    good = builtin_subject("causal-lm")
    with pytest.raises(ConformanceError, match=r"without a forced prefix last_prompt_index is \[(\d+, ){3}\d+\], "
                                               r"expected \d+ \(the last column\)"):
        check_positions_under_left_padding(ConformanceSubject(OffByOne(good.model, good.adapter.processor)))


class Drifting(CausalLMAdapter):
    """Renders a different prompt on every call (e.g. a timestamp in the system message)."""

    name: ClassVar[str] = "drifting"
    calls = 0

    def render_prompt(self, question: str, *, has_image: bool, system: str | None) -> str:
        Drifting.calls += 1
        return super().render_prompt(f"{question} #{Drifting.calls}", has_image=has_image, system=system)


def test_prompts_differing_between_extraction_and_generation_are_detected(builtin_subject):
    good = builtin_subject("causal-lm")
    with pytest.raises(ConformanceError, match=r"prompts_identical: .*differs between extraction"):
        check_prompts_identical_for_extraction_and_generation(
            ConformanceSubject(Drifting(good.model, good.adapter.processor))
        )


class Unstable(CausalLMAdapter):
    """Fingerprints the Python object, not the weights."""

    name: ClassVar[str] = "causal-lm"

    def fingerprint(self) -> Fingerprint:
        found = super().fingerprint()
        return found.model_copy(update={"first_layer_sha256": f"{id(self.model):x}"})


def test_unstable_fingerprint_is_detected_and_reported(builtin_subject):
    good = builtin_subject("causal-lm")
    subject = ConformanceSubject(Unstable(good.model, good.adapter.processor), adapter_name="causal-lm")
    with pytest.raises(ConformanceError, match=r"fingerprint changed across save/load: first_layer_sha256"):
        check_fingerprint_stable_across_save_and_load(subject)


def test_run_conformance_collects_every_result(builtin_subject):
    good = builtin_subject("qwen2-vl")
    report = run_conformance(ConformanceSubject(QwenVisionBlocks(good.model, good.adapter.processor),
                                                images=good.images[:2]))
    assert not report.passed
    assert report.layers_path == "model.visual.blocks"
    assert report.results["check_layers_are_language_decoder"].startswith("FAIL: layers_are_language_decoder")
    assert set(report.results) == {c.__name__ for c in CONFORMANCE_CHECKS}


# -- a third-party adapter, from outside the package ----------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "crvlm-pythia-adapter"


@pytest.fixture(scope="session")
def installed_pythia_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example adapter plugin into a private target directory."""
    return pip_install_into(EXAMPLE, tmp_path_factory.mktemp("pythia-site"))


def test_example_adapter_plugin_passes_the_kit_from_outside(installed_pythia_adapter, tokenizer_dir):
    """The example's own test file, run as its author would: kit from crvlm, adapter from the entry point."""
    env = {**os.environ, "PYTHONPATH": str(installed_pythia_adapter), "CRVLM_TOKENIZER_DIR": str(tokenizer_dir),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                         capture_output=True, text=True, env=env, cwd=EXAMPLE)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "7 passed" in run.stdout
    listed = subprocess.run([sys.executable, "-m", "crvlm_sdk.cli", "plugins"], capture_output=True, text=True,
                            env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " pythia " in line)
    assert "GPTNeoXForCausalLM" in row and "crvlm-pythia-adapter" in row
