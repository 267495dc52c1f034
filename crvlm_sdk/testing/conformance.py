"""The adapter conformance kit: what every backbone adapter must get right, as runnable checks.

A :class:`~crvlm_sdk.adapters.base.BackboneAdapter` is small, but each of its answers is load
bearing: the wrong layers steer the vision tower (or nothing), a prompt built differently at
extraction and at generation reads vectors at positions that never occur at inference, an
off-by-one under left padding reads the gate at a pad token, and a fingerprint that changes on
reload makes every bundle unusable. Each check below runs the adapter against a real (tiny)
model and fails with a message that says what was expected and what was found.

Use it from pytest, with your adapter and a tiny model of the class it claims::

    import pytest
    from crvlm_sdk.testing import CONFORMANCE_CHECKS, ConformanceSubject

    @pytest.fixture(scope="session")
    def subject():
        return ConformanceSubject.from_pretrained("tiny-model-dir", adapter="my-adapter")

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
    def test_conformance(subject, check):
        check(subject)

or call :func:`run_conformance` for a summary row (layers path, hidden size, image tokens per
test image, which checks passed). Text-only adapters skip the image parts.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from crvlm_sdk.activations.capture import capture
from crvlm_sdk.activations.hooks import HookSpec, StopForward, hooks_installed, layer_hidden, with_hidden
from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.adapters.batching import text_config
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.plugins.adapters import adapter_for
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager
from crvlm_sdk.types import PromptBatch, Sample

#: questions of different lengths, so left padding differs by row
QUESTIONS = (
    "What is this?",
    "Describe everything you can see in this picture, in as much detail as you can.",
    "Hi",
    "Which colour dominates here?",
    "Is it day or night?",
)
SYSTEM = "Only answer questions about cooking."
PREFIX = "Sorry, I can't"
#: (width, height) of the default test images: square, wide, tall, large — sizes that make
#: dynamic-resolution, tiling and any-res processors expand to different token counts
IMAGE_SIZES = ((32, 32), (64, 32), (100, 60), (60, 90), (200, 120))


class ConformanceError(AssertionError):
    """An adapter does not conform; the message says what was expected and what was found."""


def default_test_images(sizes: Sequence[tuple[int, int]] = IMAGE_SIZES, seed: int = 0) -> list[Any]:
    """Seeded noise images of ``sizes`` (noise, so every pixel and tile carries information)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def _default_reload(path: Path) -> tuple[torch.nn.Module, Any]:
    from crvlm_sdk.models.loading import load_model

    return load_model(path)


@dataclass
class ConformanceSubject:
    """An adapter bound to a model and processor, plus what the checks need to exercise it.

    ``reload`` loads a directory written by ``save_pretrained`` (default
    :func:`crvlm_sdk.load_model`); ``adapter_name`` re-selects the adapter for the reloaded model.
    """

    adapter: BackboneAdapter
    images: list[Any] = field(default_factory=default_test_images)
    questions: Sequence[str] = QUESTIONS
    reload: Callable[[Path], tuple[torch.nn.Module, Any]] = _default_reload
    plugins: PluginManager | None = None
    adapter_name: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        adapter: str | None = None,
        plugins: PluginManager | None = None,
        images: list[Any] | None = None,
        reload: Callable[[Path], tuple[torch.nn.Module, Any]] | None = None,
    ) -> ConformanceSubject:
        """Load ``path`` (as users do) and pick ``adapter`` by name, or the one that claims the model."""
        loader = reload or _default_reload
        model, processor = loader(Path(path))
        backbone = adapter_for(model, processor, adapter, plugins=plugins)
        return cls(backbone, images=images if images is not None else default_test_images(), reload=loader,
                   plugins=plugins, adapter_name=adapter)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def uses_images(self) -> bool:
        return bool(self.adapter.supports_images and self.images)

    def row_images(self, n: int) -> list[Any]:
        """Images for ``n`` rows: every test image in turn, one text-only row in each batch."""
        if not self.uses_images:
            return [None] * n
        out: list[Any] = []
        pictures = iter(self.images * (n // len(self.images) + 1))
        for i in range(n):
            out.append(None if i == 2 else next(pictures))
        return out


# -- helpers ------------------------------------------------------------------------------
def _fail(check: str, message: str) -> NoReturn:
    raise ConformanceError(f"{check}: {message}")


def layers_path(adapter: BackboneAdapter) -> str:
    """Dotted path from the model to the adapter's decoder layers (for reports)."""
    layers = adapter.decoder_layers()
    names = {id(module): name for name, module in adapter.model.named_modules()}
    if id(layers) in names:
        return names[id(layers)]
    first = names.get(id(layers[0]), "?")
    return first.rsplit(".", 1)[0] if "." in first else first


def _last_logits(adapter: BackboneAdapter, batch: PromptBatch) -> torch.Tensor:
    """``(B, V)`` logits at the last position (only that row of the LM head is computed where supported)."""
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(adapter.model.forward).parameters else {}
    with torch.inference_mode():
        return adapter.model(**batch.inputs, use_cache=False, **extra).logits[:, -1].float()


def _row(batch: PromptBatch, i: int) -> dict[str, torch.Tensor]:
    """Row ``i``'s sequence tensors without its left padding."""
    ids = batch.inputs["input_ids"]
    start = int(batch.inputs["attention_mask"][i].argmax())
    return {k: v[i, start:] for k, v in batch.inputs.items() if v.shape == ids.shape}


def _read_layers(adapter: BackboneAdapter, batch: PromptBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``h_l`` for every token of ``batch`` (float32) at each of ``layers``, in one forward."""
    seen: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen[layer] = layer_hidden(output).float()
            if layer == deepest:
                raise StopForward

        return hook

    blocks = adapter.decoder_layers()
    with hooks_installed([HookSpec(blocks[layer], make_hook(layer)) for layer in layers]), torch.inference_mode(), \
            contextlib.suppress(StopForward):
        adapter.model(**batch.inputs, use_cache=False)
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        _fail("positions", f"decoder layers {missing} did not run")
    return seen


# -- the checks ---------------------------------------------------------------------------
def check_layers_are_language_decoder(subject: ConformanceSubject) -> dict[str, Any]:
    """The layers run once each, in order, on the text tokens, and writing to them moves the logits.

    A vision-tower block does not run on a text-only prompt, and on an image prompt it sees
    patches, not the ``(batch, tokens, hidden)`` residual stream of the language model — either
    way this check fails, which is how hooking the vision tower is detected.
    """
    name = "layers_are_language_decoder"
    adapter = subject.adapter
    layers = list(adapter.decoder_layers())
    text_layers = int(getattr(text_config(adapter.model), "num_hidden_layers", len(layers)))
    if not layers:
        _fail(name, "decoder_layers() is empty")
    if len(layers) != adapter.num_layers or len(layers) != text_layers:
        _fail(name, f"expected {text_layers} layers (text config num_hidden_layers), "
                    f"decoder_layers() has {len(layers)} and num_layers says {adapter.num_layers}")
    hidden = adapter.hidden_size
    questions = list(subject.questions[:3])
    batches = {"text-only": adapter.build_prompts(questions)}
    if subject.uses_images:
        batches["image"] = adapter.build_prompts(questions, subject.row_images(3))
    for kind, batch in batches.items():
        calls: list[tuple[int, tuple[int, ...]]] = []
        specs = [HookSpec(layer, lambda m, a, o, i=i, calls=calls: calls.append((i, tuple(layer_hidden(o).shape))))
                 for i, layer in enumerate(layers)]
        with hooks_installed(specs):
            base = _last_logits(adapter, batch)
        order = [i for i, _ in calls]
        if order != list(range(len(layers))):
            missing = sorted(set(range(len(layers))) - set(order))
            if missing:
                _fail(name, f"on a {kind} prompt, layers {missing} never ran: they are not the language model's "
                            f"decoder layers (a vision tower's blocks only run on images)")
            _fail(name, f"on a {kind} prompt the layers ran in the order {order}, expected 0..{len(layers) - 1}")
        expected = (batch.batch_size, batch.seq_len, hidden)
        for i, shape in calls:
            if shape != expected:
                _fail(name, f"on a {kind} prompt layer {i} output has shape {shape}, expected {expected} "
                            f"(batch, prompt tokens, text hidden size): not a language decoder layer")
        for i, layer in enumerate(layers):
            # random, not constant: a constant shift lies in LayerNorm's null space and vanishes
            shift = 4.0 * torch.randn(hidden, generator=torch.Generator().manual_seed(i))

            def add(module: torch.nn.Module, args: tuple, output: Any, shift: torch.Tensor = shift) -> Any:
                h = layer_hidden(output)
                return with_hidden(output, h + shift.to(device=h.device, dtype=h.dtype))

            with hooks_installed([HookSpec(layer, add)]):
                moved = _last_logits(adapter, batch)
            if torch.allclose(moved, base, atol=1e-5, rtol=0):
                _fail(name, f"adding to layer {i}'s output did not change the logits on a {kind} prompt")
    return {"layers_path": layers_path(adapter), "num_layers": len(layers), "hidden_size": hidden}


def check_prompts_identical_for_extraction_and_generation(subject: ConformanceSubject) -> dict[str, Any]:
    """Extraction (capture) and generation (Steerer.generate) feed the model the same prompt.

    Compared at two points of the first forward of each: the token-level inputs the model
    receives, and the residual stream entering the first decoder layer — which includes the
    merged image features, so it also holds when ``generate`` encodes the images ahead of the
    forward (transformers 5.2x passes ``mm_encoder_outputs`` instead of pixels there). Also:
    the teacher-forced prompt is the generation prompt followed by exactly the forced prefix's
    tokens, with the same image inputs.
    """
    name = "prompts_identical"
    adapter = subject.adapter
    n = 4
    # capture batches shortest-first; given in that order, both phases see the same rows
    pairs = sorted(zip(subject.questions[:n], subject.row_images(n), strict=True), key=lambda p: len(p[0]))
    questions, images = [q for q, _ in pairs], [img for _, img in pairs]
    recorded: dict[str, dict[str, torch.Tensor]] = {}
    phase = {"name": ""}

    def record_inputs(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if phase["name"] not in recorded:  # the first forward of each phase: the prompt
            ids = kwargs.get("input_ids")
            recorded[phase["name"]] = {k: v.detach().cpu().clone() for k, v in kwargs.items()
                                       if isinstance(v, torch.Tensor) and ids is not None and v.shape == ids.shape}

    def record_stream(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen = recorded[phase["name"]]
        if "<residual stream>" not in seen:
            h = kwargs.get("hidden_states", args[0] if args else None)
            seen["<residual stream>"] = h.detach().float().cpu().clone()

    from crvlm_sdk.steering.steerer import Steerer

    bundle = random_bundle(adapter, gate_layer=0, band=[adapter.num_layers - 1])
    steerer = Steerer(adapter, [bundle], plugins=subject.plugins)
    specs = [HookSpec(adapter.model, record_inputs, kind="pre", with_kwargs=True),
             HookSpec(adapter.decoder_layers()[0], record_stream, kind="pre", with_kwargs=True)]
    with hooks_installed(specs):
        phase["name"] = "extraction"
        # the whole prompt in one pass (share_prefix=False): this compares prompts, not the
        # shared-prefix shortcut, which capture checks against full passes itself
        capture(adapter, [Sample(q, img) for q, img in zip(questions, images, strict=True)], [0], system=SYSTEM,
                batch_size=n, progress=False, share_prefix=False)
        phase["name"] = "generation"
        steerer.generate(questions, images, system=SYSTEM, max_new_tokens=1)
    if set(recorded) != {"extraction", "generation"}:
        _fail(name, f"expected an extraction and a generation forward, recorded {sorted(recorded)}")
    extract, generate = recorded["extraction"], recorded["generation"]
    if "<residual stream>" not in extract or "<residual stream>" not in generate:
        _fail(name, "decoder layer 0 did not run in both extraction and generation")
    keys = sorted(k for k in extract if not k.startswith("<"))
    for key in keys:
        if key not in generate:
            _fail(name, f"extraction passes {key!r} but generation does not")
        a, b = extract[key], generate[key]
        if a.shape != b.shape or not torch.equal(a, b):
            _fail(name, f"{key!r} differs between extraction {tuple(a.shape)} and generation {tuple(b.shape)}")
    a, b = extract["<residual stream>"], generate["<residual stream>"]
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
        _fail(name, f"the embeddings entering decoder layer 0 differ between extraction {tuple(a.shape)} and "
                    f"generation {tuple(b.shape)} (image features or tokens differ)")

    plain = adapter.build_prompts(questions, images, system=SYSTEM)
    forced = adapter.build_prompts(questions, images, system=SYSTEM, forced_prefix=PREFIX)
    prefix_ids = adapter.encode_text(PREFIX)
    for i in range(n):
        a, b = _row(plain, i), _row(forced, i)
        for key, row in a.items():
            head = b[key][: row.shape[0]]
            if not torch.equal(head, row):
                _fail(name, f"row {i}: the teacher-forced prompt's {key!r} does not start with the generation prompt")
        tail = b["input_ids"][a["input_ids"].shape[0]:].tolist()
        if tail != prefix_ids:
            _fail(name, f"row {i}: forced tokens are {tail}, expected the prefix's {prefix_ids}")
    for key, value in plain.inputs.items():
        if value.shape != plain.inputs["input_ids"].shape and not torch.equal(value, forced.inputs[key]):
            _fail(name, f"image input {key!r} differs between the plain and the teacher-forced prompts")
    return {"keys": keys}


def check_positions_under_left_padding(subject: ConformanceSubject) -> dict[str, Any]:
    """Every row of a left-padded batch reads the same token and activation as the row alone.

    The batch mixes every test image (so every image-token count the processor produces), a
    text-only row and, where the adapter takes several, a two-image row; a forced prefix
    follows each prompt. For each row: the tokens equal the row encoded alone, the padding is
    masked, ``last_prompt_index`` is the last prompt token, ``prefix_start:prefix_end`` holds
    exactly the prefix tokens, and ``h`` at both positions (first and last layer) matches the
    unpadded single-row forward.
    """
    name = "positions_under_left_padding"
    adapter = subject.adapter
    _check_processor_inputs_kept(subject, name)
    image_rows: list[Any] = list(subject.images) if subject.uses_images else []
    rows: list[Any] = [*image_rows, None] if image_rows else [None] * 4  # text only: 4 prompt lengths
    if subject.uses_images and adapter.max_images > 1 and len(subject.images) >= 2:
        rows.append([subject.images[0], subject.images[1]])
    questions = [subject.questions[i % len(subject.questions)] for i in range(len(rows))]
    batch = adapter.build_prompts(questions, rows if subject.uses_images else None, forced_prefix=PREFIX)
    prefix_ids = adapter.encode_text(PREFIX)
    plain = adapter.build_prompts(questions, rows if subject.uses_images else None)
    # Left padding puts every prompt's end in the last column; a forced prefix follows it directly.
    width = plain.seq_len
    if plain.last_prompt_index.tolist() != [width - 1] * len(rows):
        _fail(name, f"without a forced prefix last_prompt_index is {plain.last_prompt_index.tolist()}, expected "
                    f"{width - 1} (the last column) for every left-padded row")
    if (batch.prefix_start - 1).tolist() != batch.last_prompt_index.tolist() or \
            batch.prefix_end.tolist() != [batch.seq_len] * len(rows):
        _fail(name, f"last_prompt_index {batch.last_prompt_index.tolist()}, prefix_start "
                    f"{batch.prefix_start.tolist()} and prefix_end {batch.prefix_end.tolist()} do not delimit a "
                    f"forced prefix that follows the prompt and ends the sequence")
    image_id = adapter.image_token_id
    layers = sorted({0, adapter.num_layers - 1})
    batched = _read_layers(adapter, batch, layers)
    mask = batch.inputs["attention_mask"]
    counts: list[int] = []
    for i, (question, image) in enumerate(zip(questions, rows, strict=True)):
        single = adapter.build_prompts([question], [image] if subject.uses_images else None, forced_prefix=PREFIX)
        length = single.seq_len
        offset = batch.seq_len - length
        if mask[i, :offset].any() or not mask[i, offset:].all():
            _fail(name, f"row {i}: attention mask does not mark exactly the {offset} left pad tokens")
        for key, value in _row(single, 0).items():
            if key in batch.inputs and not torch.equal(batch.inputs[key][i, offset:], value):
                _fail(name, f"row {i}: batched {key!r} differs from the row encoded alone")
        expected_last = offset + int(single.last_prompt_index[0])
        if int(batch.last_prompt_index[i]) != expected_last:
            _fail(name, f"row {i}: last_prompt_index is {int(batch.last_prompt_index[i])}, expected {expected_last}")
        start, end = int(batch.prefix_start[i]), int(batch.prefix_end[i])
        if batch.inputs["input_ids"][i, start:end].tolist() != prefix_ids:
            _fail(name, f"row {i}: tokens at prefix_start:prefix_end are "
                        f"{batch.inputs['input_ids'][i, start:end].tolist()}, expected {prefix_ids}")
        if image is not None and image_id is not None:
            count = int((single.inputs["input_ids"] == image_id).sum())
            if count == 0:
                _fail(name, f"row {i}: no image token ({image_id}) in a prompt with an image")
            counts.append(count)
        alone_by_layer = _read_layers(adapter, single, layers)
        for layer in layers:
            alone = alone_by_layer[layer]
            for what, pos_b, pos_s in (("last prompt token", expected_last, int(single.last_prompt_index[0])),
                                       ("last forced token", end - 1, int(single.prefix_end[0]) - 1)):
                diff = float((batched[layer][i, pos_b] - alone[0, pos_s]).abs().max())
                scale = float(alone[0, pos_s].abs().max()) + 1e-6
                if diff > 1e-3 * scale + 1e-4:
                    _fail(name, f"row {i} ({_describe(image)}): h at the {what}, layer {layer}, differs from the "
                                f"unpadded row by {diff:.3g} (scale {scale:.3g}) — positions or masks are wrong "
                                f"under left padding")
    return {"image_tokens": counts[: len(image_rows)], "multi_image_tokens": counts[len(image_rows):]}


def _describe(image: Any) -> str:
    if image is None:
        return "text only"
    if isinstance(image, (list, tuple)):
        return f"{len(image)} images"
    return f"{image.size[0]}×{image.size[1]} image"


def _check_processor_inputs_kept(subject: ConformanceSubject, name: str) -> None:
    """Every input the model's own processor returns for a prompt reaches the batch."""
    adapter = subject.adapter
    processor = adapter.processor
    if not (subject.uses_images and callable(processor) and hasattr(processor, "image_processor")):
        return
    text = adapter.render_prompt(subject.questions[0], has_image=True, system=None)
    own = processor(text=[text], images=[[subject.images[0]]], return_tensors="pt")
    batch = adapter.build_prompts([subject.questions[0]], [subject.images[0]])
    dropped = sorted(k for k, v in own.items() if isinstance(v, torch.Tensor) and k not in batch.inputs)
    if dropped:
        _fail(name, f"the processor returns {dropped} but the adapter's batch drops them")


def random_bundle(adapter: BackboneAdapter, *, gate_layer: int | Sequence[int] = 0, band: Sequence[int] = (1, 2),
                  alpha: float = 4.0, seed: int = 0, name: str | None = None, operator: str = "additive",
                  decode_steps: int | None = None, questions: Sequence[str] = QUESTIONS) -> Bundle:
    """A bundle of random unit vectors and soft probe gates whose scores differ by row.

    Each probe standardises with statistics of real prompts at its layer, so even on a tiny
    random model (where rows differ only slightly) the gate's ``p`` varies clearly by row. A
    sequence of gate layers gives a gate read at several layers.
    """
    layers = [gate_layer] if isinstance(gate_layer, int) else list(gate_layer)
    g = torch.Generator().manual_seed(seed)
    hidden = adapter.hidden_size
    stats = capture(adapter, [Sample(q) for q in questions], layers, keep=True, progress=False)
    probe = get_plugin_manager().get("gate", "probe")
    gates = {}
    for layer in layers:
        h = stats.rows(layer)
        if h.dim() != 2 or h.shape[0] != len(questions) or h.shape[1] != hidden:
            _fail("bundle", f"reading layer {layer} at the last prompt token gave activations of shape "
                            f"{tuple(h.shape)}, expected ({len(questions)}, {hidden})")
        tensors = {"weight": torch.randn(hidden, generator=g), "bias": torch.zeros(()), "mean": h.mean(0),
                   "std": h.std(0).clamp_min(1e-6)}
        gates[layer] = probe.from_tensors(tensors, {"temperature": 4.0})
    vectors = {layer: torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0) for layer in band}
    return Bundle.create(adapter=adapter, policy={"name": name or f"conformance-{layers[0]}", "subject": "testing"},
                         vectors=vectors, gate=LayerGates(gates), alpha=alpha, operator=operator,
                         decode_steps=decode_steps)


def check_cached_generation_equals_uncached(subject: ConformanceSubject) -> dict[str, Any]:
    """Steered greedy generation gives the same tokens with and without the KV cache.

    Run twice: with the gate read in the same pass (gate layer below the band) and with the
    unsteered gate pre-pass (gate layer at the top of the band); each must also differ from
    unsteered generation, or the comparison would prove nothing.
    """
    from crvlm_sdk.steering.steerer import Steerer

    name = "cached_equals_uncached"
    adapter = subject.adapter
    last = adapter.num_layers - 1
    questions = list(subject.questions[:4])
    images = subject.row_images(4) if subject.uses_images else None
    configs = {"in-pass gate": (0, list(range(1, last + 1)) or [0]), "pre-pass gate": (last, list(range(last + 1)))}
    out: dict[str, Any] = {}
    plain = None
    for label, (gate_layer, band) in configs.items():
        steerer = Steerer(adapter, [random_bundle(adapter, gate_layer=gate_layer, band=band)],
                          plugins=subject.plugins)
        kwargs = {"max_new_tokens": 4, "system": SYSTEM}
        cached = steerer.generate_detailed(questions, images, use_cache=True, **kwargs)
        uncached = steerer.generate_detailed(questions, images, use_cache=False, **kwargs)
        if plain is None:
            plain = steerer.generate_detailed(questions, images, steer=False, system=SYSTEM, max_new_tokens=1)
        if cached.texts != uncached.texts:
            _fail(name, f"{label}: steered generation with KV cache {cached.texts} differs from without "
                        f"{uncached.texts}")
        if not torch.allclose(cached.first_logits, uncached.first_logits, atol=1e-4, rtol=1e-4):
            _fail(name, f"{label}: first-step logits differ with and without KV cache")
        if torch.allclose(cached.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4):
            _fail(name, f"{label}: steering did not change the logits, so the comparison proves nothing")
        out[label] = cached.texts
    return out


def check_fingerprint_stable_across_save_and_load(subject: ConformanceSubject) -> dict[str, Any]:
    """Fingerprint and prompts survive ``save_pretrained`` + reload (and a bfloat16 copy); a changed weight does not."""
    name = "fingerprint_roundtrip"
    adapter = subject.adapter
    first = adapter.fingerprint()
    if first != adapter.fingerprint():
        _fail(name, "two fingerprints of the same model differ")
    images = subject.row_images(3) if subject.uses_images else None
    questions = list(subject.questions[:3])
    before = adapter.build_prompts(questions, images, system=SYSTEM)
    with tempfile.TemporaryDirectory(prefix="crvlm-conformance-") as tmp:
        path = Path(tmp)
        adapter.model.save_pretrained(path)
        adapter.processor.save_pretrained(path)
        model, processor = subject.reload(path)
        again = adapter_for(model, processor, subject.adapter_name or adapter.name, plugins=subject.plugins)
        found = again.fingerprint()
        if found.first_layer_sha256 != first.first_layer_sha256:  # same dtype: the hash itself must hold
            _fail(name, f"fingerprint changed across save/load: first_layer_sha256 {first.first_layer_sha256[:12]}"
                        f" became {found.first_layer_sha256[:12]}")
        if first.differences(found):
            _fail(name, "fingerprint changed across save/load: " + "; ".join(first.differences(found)))
        after = again.build_prompts(questions, images, system=SYSTEM)
        for key, value in before.inputs.items():
            if key not in after.inputs or not torch.equal(value, after.inputs[key]):
                _fail(name, f"the reloaded processor builds a different {key!r} (chat template or image "
                            f"settings lost in save/load)")
        for dtype in (torch.bfloat16, torch.float16):
            model.to(dtype)
            if first.differences(again.fingerprint()):
                _fail(name, f"fingerprint of a {dtype} copy differs from the float32 model's: "
                            + "; ".join(first.differences(again.fingerprint())))
        with torch.no_grad():
            param = next(p for p in again.decoder_layers()[0].parameters() if p.is_floating_point())
            param.add_(0.05)
        if not first.differences(again.fingerprint()):
            _fail(name, "a changed first-layer weight kept the same fingerprint")
    return {"first_layer_sha256": first.first_layer_sha256[:12]}


#: the checks, in the order :func:`run_conformance` runs them (parametrise tests over this)
CONFORMANCE_CHECKS: tuple[Callable[[ConformanceSubject], dict[str, Any]], ...] = (
    check_layers_are_language_decoder,
    check_prompts_identical_for_extraction_and_generation,
    check_positions_under_left_padding,
    check_cached_generation_equals_uncached,
    check_fingerprint_stable_across_save_and_load,
)


@dataclass
class ConformanceReport:
    """One adapter's results: a summary row plus each check's outcome."""

    model_class: str
    adapter: str
    layers_path: str
    hidden_size: int
    image_tokens: list[int]
    results: dict[str, str]

    @property
    def passed(self) -> bool:
        return all(r == "pass" for r in self.results.values())


def run_conformance(subject: ConformanceSubject) -> ConformanceReport:
    """Run every check, collecting failures instead of stopping at the first."""
    results: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    for check in CONFORMANCE_CHECKS:
        try:
            details[check.__name__] = check(subject)
            results[check.__name__] = "pass"
        except ConformanceError as exc:
            results[check.__name__] = f"FAIL: {exc}"
        except Exception as exc:  # a broken adapter can fail anywhere; report it, run the rest
            results[check.__name__] = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    positions = details.get("check_positions_under_left_padding", {})
    return ConformanceReport(
        model_class=type(subject.model).__name__,
        adapter=subject.adapter.name,
        layers_path=layers_path(subject.adapter),
        hidden_size=subject.adapter.hidden_size,
        image_tokens=list(positions.get("image_tokens", [])),
        results=results,
    )
