"""The adapter conformance kit, run the way a third-party adapter author runs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crvlm_pythia_adapter import PythiaAdapter
from crvlm_pythia_adapter.tiny import build_tiny_pythia

from crvlm_sdk import AdapterError, adapter_for, get_plugin_manager
from crvlm_sdk.testing import CONFORMANCE_CHECKS, ConformanceSubject, save_smollm2_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pythia")
    tokenizer_dir = os.environ.get("CRVLM_TOKENIZER_DIR") or save_smollm2_tokenizer(root / "tokenizer")
    return build_tiny_pythia(root / "tiny-pythia", tokenizer_dir)


@pytest.fixture(scope="session")
def subject(model_dir: Path) -> ConformanceSubject:
    # no adapter name: crvlm must find this plugin's adapter through the entry point
    return ConformanceSubject.from_pretrained(model_dir)


def test_adapter_is_discovered_through_the_entry_point(subject):
    assert type(subject.adapter) is PythiaAdapter
    component = get_plugin_manager().components("adapter")["pythia"]
    assert component.provider == "pythia_adapter (crvlm-pythia-adapter)"
    assert component.cls.model_classes == ("GPTNeoXForCausalLM",)


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_conformance(subject, check):
    check(subject)


def test_other_models_get_a_clear_error(subject):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(AdapterError, match=r"expected LlamaForCausalLM\.gpt_neox\.layers"):
        adapter_for(llama, subject.adapter.processor, "pythia")
