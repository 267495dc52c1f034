"""crvlm inside vLLM: refusal bundles chosen per request, steered in vLLM's own batches.

vLLM runs every scheduled request's new tokens as one flat batch. A pre-forward hook on the
model reads the runner's input batch (request ids, where each request's rows start, how many
tokens it has computed, its prompt length) and each request's ``SamplingParams.extra_args``
(``{"crvlm": ["bundle", ...]}``), describes the step to :class:`~crvlm_sdk.serving.core.SteeringCore`,
and forward hooks on the decoder layers let the core read gates and steer. vLLM's decoder
layers return ``(hidden, residual)`` and the residual stream crvlm steers is their sum, so the
hooks steer the sum and hand back ``residual' = steered − hidden``.

What is refused rather than served wrongly, each with one line when the engine is made:

- compiled mode (vLLM's default): compiled graphs skip Python hooks, so ``enforce_eager`` is
  required; a canary forward after loading proves the hooks ran;
- chunked prefill: a prompt's first chunks would run before its gate is read;
- prefix caching: a cached prompt prefix keeps keys and values computed under another
  request's bundles and gate value;

the last two only when a loaded bundle steers the prompt or its gate reads the question's
tokens. Template bundles, and bundles that steer generated tokens only (``steer_prompt =
False``), whose gates read the last prompt token leave every prompt's keys and values as the
unsteered model's, so both stay on.
The pre-pass runs the prompt unsteered up to the last layer a gate reads. Nothing is steered
below the lowest band layer, so the steered pass does not compute those layers again: it takes
their outputs from the pre-pass, whose keys and values for them are already the right ones.
Response shaping (forced opening, stop after n sentences, template answers) is applied per
request by :class:`CrvlmLogitsProcessor`, a vLLM logits processor registered with the engine:
it asks :class:`~crvlm_sdk.serving.core.RequestResponses` which token each refused request
must produce next.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from crvlm_sdk.activations.hooks import StopForward
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.bundle.manifest import MANIFEST, Manifest, read_manifest
from crvlm_sdk.errors import CrvlmError
from crvlm_sdk.serving.core import RequestResponses, Rows, SteeringCore
from crvlm_sdk.steering.response import RowPlan, end_of_sequence_id, sentence_end_ids

#: the steering of this worker process (one model runner per vLLM worker), for the logits processor
_ACTIVE: VllmSteering | None = None

try:  # the logits processor subclasses vLLM's interface; the rest of this module needs no vLLM
    import vllm.v1.sample.logits_processor  # noqa: F401

    _HAS_VLLM = True
except ImportError:
    _HAS_VLLM = False

#: the ``SamplingParams.extra_args`` key (``vllm_xargs`` in the OpenAI server) naming a request's bundles
EXTRA_ARGS_KEY = "crvlm"


def requested_bundles(extra_args: dict[str, Any] | None) -> tuple[str, ...]:
    """The bundle names a request asked for, checked: a list of strings (or one string)."""
    value = (extra_args or {}).get(EXTRA_ARGS_KEY, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CrvlmError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a list of bundle names, got {value!r}")
    return tuple(value)


def check_engine_config(vllm_config: Any, bundles: Sequence[Bundle]) -> None:
    """One line for each engine setting that would make steering ``bundles`` wrong."""
    if not vllm_config.model_config.enforce_eager:
        raise CrvlmError("vLLM compiles the model unless enforce_eager=True, and compiled graphs skip crvlm's "
                         "hooks", hint="start vLLM with enforce_eager=True (--enforce-eager)")
    whole = [b.name for b in bundles if b.manifest.needs_whole_prompt]
    why = f"bundle(s) {whole} steer the prompt or read the question's tokens"
    if whole and vllm_config.scheduler_config.enable_chunked_prefill:
        raise CrvlmError(f"chunked prefill would run a prompt's first chunks before its gate is read ({why})",
                         hint="start vLLM with enable_chunked_prefill=False (--no-enable-chunked-prefill), or "
                              "serve template bundles (crvlm build-bundle --mode template)")
    if whole and vllm_config.cache_config.enable_prefix_caching:
        raise CrvlmError(f"prefix caching would reuse keys and values computed under another request's bundles "
                         f"({why})", hint="start vLLM with enable_prefix_caching=False (--no-enable-prefix-caching), "
                                         "or serve template bundles (crvlm build-bundle --mode template)")
    if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise CrvlmError("crvlm steers a model on one device; tensor and pipeline parallelism are not supported",
                         hint="start vLLM with tensor_parallel_size=1 and pipeline_parallel_size=1")
    if vllm_config.speculative_config is not None:
        raise CrvlmError("speculative decoding is not supported with crvlm bundles",
                         hint="start vLLM without a speculative config")


class VllmSteering:
    """The hooks that connect one vLLM model runner to a :class:`SteeringCore`."""

    def __init__(self, runner: Any, core: SteeringCore, responses: RequestResponses | None = None) -> None:
        self.runner = runner
        self.core = core
        self.responses = responses
        self.model = runner.get_model()
        self.layers = _decoder_layers(self.model)
        self._seen: set[Hashable] = set()
        self._inside = False
        self.forwards = 0  # steered forward calls (the canary checks it moves)
        #: with ``record_gates`` on, each request's gate values by its prompt's token ids (a host
        #: sync per prompt step; for checks, not for serving)
        self.record_gates = False
        self.recorded: dict[tuple[int, ...], dict[str, float]] = {}
        self._prompts_now: list[tuple[Hashable, tuple[int, ...]]] = []
        self._handles: list[Any] = []
        #: layers up to the lowest band layer compute the same in the pre-pass and the steered
        #: pass: the pre-pass keeps the raw outputs the steered pass's hooks read (the last shared
        #: layer's, and any hooked layer's below it), and the steered pass replays them
        self._kept_layers = {layer for layer in core.layers if layer <= core.prepass_shared}  # the shared one is hooked
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._replaying = False
        #: False computes the shared layers twice, as before this reuse existed (for comparison)
        self.replay_shared = True
        self.replayed = 0  # steered passes that reused the pre-pass's shared layers (tests check it)
        self._wrapped: list[tuple[torch.nn.Module, Any]] = []  # (layer, the instance forward it had, if any)

    def install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post_forward))
        for layer in self.core.layers:
            self._handles.append(self.layers[layer].register_forward_hook(self._layer_hook(layer)))
        for index in range(self.core.prepass_shared + 1):
            module = self.layers[index]
            self._wrapped.append((module, vars(module).get("forward")))
            module.forward = self._shared_forward(index, module.forward)  # an instance attribute, undone by remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in reversed(self._wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._wrapped.clear()

    def _shared_forward(self, index: int, forward: Any) -> Any:
        kept = index in self._kept_layers

        def shared(*args: Any, **kwargs: Any) -> Any:
            if self._replaying:
                # the pre-pass ran this layer on the same inputs and wrote its keys and values; a
                # layer below the last kept one hands its inputs on (the next one ignores them)
                if kept:
                    return self._kept[index]
                return (args[1] if len(args) > 1 else kwargs["hidden_states"],
                        args[2] if len(args) > 2 else kwargs.get("residual"))
            out = forward(*args, **kwargs)
            if self._inside and kept and self.replay_shared:
                # copies: the next layer's fused add-norm may update its inputs in place
                self._kept[index] = (out[0].clone(), out[1].clone())
            return out

        return shared

    def _layout(self, num_tokens: int) -> list[Rows]:
        batch = self.runner.input_batch
        n = batch.num_reqs
        starts = self.runner.query_start_loc.cpu[: n + 1].tolist() if n else [0]
        rows, live = [], set()
        for i, req_id in enumerate(batch.req_ids[:n]):
            live.add(req_id)
            count = starts[i + 1] - starts[i]
            if count <= 0 or starts[i] >= num_tokens:
                continue
            params = self.runner.requests[req_id].sampling_params
            names = requested_bundles(getattr(params, "extra_args", None))
            position, prompt = int(batch.num_computed_tokens_cpu[i]), int(batch.num_prompt_tokens[i])
            ids = None
            if names and position < prompt and (self.core.reads_question or self.record_gates):
                ids = torch.from_numpy(batch.token_ids_cpu[i, :prompt].copy())
                if self.record_gates:
                    self._prompts_now.append((req_id, tuple(ids.tolist())))
            rows.append(Rows(req_id, starts[i], count, position, prompt, names, ids))
        for gone in self._seen - live:
            self.core.finish(gone)
            if self.responses is not None:
                self.responses.finish(gone)
        self._seen = live
        return rows

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._inside:
            return
        positions = kwargs.get("positions")
        num_tokens = int(positions.shape[-1]) if positions is not None else int(kwargs["input_ids"].shape[0])
        self._replaying = False
        self._kept.clear()
        needs_prepass = self.core.begin_step(self._layout(num_tokens), num_tokens)
        self.forwards += 1
        if needs_prepass:
            self._inside = True
            try:
                with self.core.prepass(), torch.no_grad():
                    module(*args, **kwargs)  # writes the same KV slots the real pass then overwrites
            except StopForward:
                pass
            finally:
                self._inside = False
            # the shared layers' keys and values are written and their outputs kept: skip them
            self._replaying = self.replay_shared and bool(self._kept_layers) and self._kept_layers <= set(self._kept)
            self.replayed += self._replaying

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._inside:
            return
        self._replaying = False
        self._kept.clear()
        for key, prompt_ids in self._prompts_now:
            self.recorded[prompt_ids] = self.core.p(key)
        self._prompts_now = []

    def _layer_hook(self, layer: int):
        core = self.core
        stop_here = layer == core.prepass_stop

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            hidden, residual = output
            stream = hidden + residual
            steered = core.layer_output(layer, stream)
            if self._inside and stop_here:
                raise StopForward
            return hidden, steered - hidden

        return hook


def _decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise CrvlmError(f"cannot find the decoder layers of vLLM model {type(model).__name__}",
                         hint="crvlm's vLLM integration supports models with model.model.layers (Llama-like)")
    return layers


def prepare(runner: Any, vllm_config: Any, bundle_paths: Sequence[str | Path]) -> VllmSteering:
    """Load and check bundles for one model runner (refusing what would steer wrongly); nothing
    is hooked in yet, so a failed load leaves what is served as it was."""
    bundles = [Bundle.load(path) for path in bundle_paths]
    if not bundles:
        raise CrvlmError("no bundles to serve", hint="name at least one bundle")
    check_engine_config(vllm_config, bundles)
    adapter = served_adapter(runner.model_config)
    load_first_layer(adapter, runner.model_config)
    for bundle in bundles:
        bundle.check_model(adapter, where=f"bundle {bundle.name!r}")
    core = SteeringCore(bundles, question_opener=adapter.question_opener(),
                        skip_ids=frozenset(adapter.image_token_ids()))
    responses = None
    if any(b.manifest.response.shapes for b in bundles):
        responses = _responses(core, bundles, adapter, runner.model_config.get_vocab_size())
    return VllmSteering(runner, core, responses)


def activate(steering: VllmSteering) -> VllmSteering:
    global _ACTIVE
    steering.install()
    _ACTIVE = steering
    return steering


def uninstall(steering: VllmSteering) -> None:
    global _ACTIVE
    steering.remove()
    if _ACTIVE is steering:
        _ACTIVE = None


#: environment variable naming the bundles (``os.pathsep``-separated) the vLLM plugin loads
BUNDLES_ENV = "CRVLM_BUNDLES"


def vllm_plugin() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process): with
    ``CRVLM_BUNDLES`` set, every model runner loads those bundles right after its model, so
    ``vllm serve`` / the OpenAI server steer per request (``vllm_xargs: {"crvlm": [...]}``)."""
    if not os.environ.get(BUNDLES_ENV):
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[type] = [GPUModelRunner]
    with contextlib.suppress(ImportError):
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    for cls in classes:
        if "load_model" in vars(cls) and not getattr(vars(cls)["load_model"], "_crvlm", False):
            cls.load_model = _loading_bundles(vars(cls)["load_model"])


def _loading_bundles(load_model: Any) -> Any:
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = load_model(self, *args, **kwargs)
        if getattr(self, "_crvlm_steering", None) is None:
            paths = [p for p in os.environ.get(BUNDLES_ENV, "").split(os.pathsep) if p]
            self._crvlm_steering = activate(prepare(self, self.vllm_config, paths))
        return out

    wrapped._crvlm = True  # type: ignore[attr-defined]
    return wrapped


class CrvlmWorkerExtension:
    """Mixed into vLLM's worker (``LLM(..., worker_extension_cls=WORKER_EXTENSION)``); its methods
    run in every worker through ``collective_rpc``."""

    def crvlm_load(self, bundle_paths: Sequence[str]) -> dict[str, Any]:
        steering = prepare(self.model_runner, self.vllm_config, bundle_paths)  # type: ignore[attr-defined]
        self.crvlm_unload()
        self._crvlm = activate(steering)
        return {"bundles": steering.core.names, "layers": steering.core.layers}

    def crvlm_unload(self) -> None:
        """Remove crvlm's hooks (the model is served as plain vLLM until the next load)."""
        steering = getattr(self, "_crvlm", None)
        if steering is not None:
            uninstall(steering)
            self._crvlm = None

    def crvlm_record_gates(self) -> dict[tuple[int, ...], dict[str, float]]:
        """Start recording each request's gate values; returns (and clears) those recorded so far."""
        steering = self._crvlm
        if steering is None:
            raise CrvlmError("no bundles are loaded")
        steering.record_gates = True
        recorded, steering.recorded = steering.recorded, {}
        return recorded

    def crvlm_forwards(self) -> int:
        steering = getattr(self, "_crvlm", None)
        return 0 if steering is None else steering.forwards

    def crvlm_replayed(self) -> int:
        """Steered passes so far that reused the pre-pass's outputs of the layers below the band."""
        steering = getattr(self, "_crvlm", None)
        return 0 if steering is None else steering.replayed


def served_adapter(model_config: Any) -> Any:
    """crvlm's adapter for the served model, over a weightless (meta-device) copy of it: the chat
    template, tokenizer and special-token ids are what the build used, so question spans,
    forced tokens and sentence ends match the Steerer's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from crvlm_sdk.plugins.adapters import adapter_for

    config = AutoConfig.from_pretrained(model_config.model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.generation_config = _generation_config(model_config.model)
    return adapter_for(skeleton, AutoTokenizer.from_pretrained(model_config.tokenizer))


def load_first_layer(adapter: Any, model_config: Any) -> None:
    """Give the weightless copy its first decoder layer from the served checkpoint, so the
    bundles' backbone fingerprints are checked against the weights vLLM serves (vLLM fuses
    them, so they are read from the checkpoint files, under the names transformers uses)."""
    from safetensors import safe_open

    first = adapter.decoder_layers()[0]
    prefix = next(name for name, module in adapter.model.named_modules() if module is first) + "."
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(_checkpoint_dir(model_config.model).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = handle.get_tensor(key)
    if not tensors:
        raise CrvlmError(f"no weights named {prefix}* in the safetensors files of {model_config.model}; crvlm "
                         "cannot check the bundles were built for the served model",
                         hint="serve a transformers checkpoint (safetensors) of the model the bundles were built for")
    first.to_empty(device="cpu")
    try:
        first.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CrvlmError(f"the first layer of {model_config.model} does not load into {type(first).__name__}: "
                         f"{str(exc).splitlines()[0]}") from None


def _checkpoint_dir(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))


def _generation_config(path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: end-of-sequence comes from the tokenizer
        return GenerationConfig()


def _responses(core: SteeringCore, bundles: Sequence[Bundle], adapter: Any, vocab: int) -> RequestResponses:
    """Forced tokens, sentence ends and end-of-sequence, chosen as the Steerer chooses them."""
    eos = end_of_sequence_id(adapter.model, adapter, None)
    plans = [RowPlan.of(bundle.manifest.response, adapter, eos) for bundle in bundles]
    return RequestResponses(core, plans, sentence_end_ids(adapter, vocab), eos)


def _logits_processor_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


#: the bundle names this process's engine serves, for checking requests as they arrive (None:
#: not known here, e.g. a worker process; the engine then refuses unknown names itself)
_SERVED_NAMES: set[str] | None = None


def served_names() -> set[str] | None:
    """The served bundle names: those :func:`load_bundles` loaded, or those named by
    ``CRVLM_BUNDLES`` (``crvlm serve``)."""
    global _SERVED_NAMES
    if _SERVED_NAMES is None and os.environ.get(BUNDLES_ENV):
        _SERVED_NAMES = {read_manifest(Path(p) / MANIFEST).policy.name
                         for p in os.environ[BUNDLES_ENV].split(os.pathsep) if p}
    return _SERVED_NAMES


class CrvlmLogitsProcessor(_logits_processor_base() if _HAS_VLLM else object):  # type: ignore[misc]
    """Forces each refused request's opening or template answer and ends it after its sentences
    (vLLM calls it for every row of every step; rows of requests that named no bundle, or whose
    gate passed them, are left alone). It also checks each request's bundle names when the
    request arrives, so a bad name is that request's error (HTTP 400), not the engine's."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        try:
            names = requested_bundles(getattr(sampling_params, "extra_args", None))
        except CrvlmError as exc:
            raise ValueError(str(exc)) from None
        served = served_names()
        unknown = sorted(set(names) - served) if served is not None else []
        if unknown:
            raise ValueError(f"unknown crvlm bundles {unknown}; this server has {sorted(served or ())}")

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        #: batch index -> that request's running list of output token ids
        self.outputs: dict[int, list[int]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.outputs.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            if requested_bundles(getattr(params, "extra_args", None)):
                self.outputs[index] = output
            else:
                self.outputs.pop(index, None)
        for a, b, direction in batch_update.moved:
            first, second = self.outputs.pop(a, None), self.outputs.pop(b, None)
            if first is not None:
                self.outputs[b] = first
            if second is not None and direction.name == "SWAP":
                self.outputs[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        steering = _ACTIVE
        if not self.outputs:
            return logits
        if steering is None:
            raise CrvlmError("requests name crvlm bundles, but no bundles are loaded in this vLLM worker",
                             hint="load bundles (crvlm serve --bundle, steered_llm, or collective_rpc('crvlm_load'))")
        if steering.responses is None:
            return logits
        if steering.forwards == 0:
            raise CrvlmError("crvlm's hooks did not run in vLLM's forward pass (a compiled or captured graph?)",
                             hint="start vLLM with enforce_eager=True (--enforce-eager)")
        req_ids = steering.runner.input_batch.req_ids
        for index, output in self.outputs.items():
            if index >= logits.shape[0] or index >= len(req_ids):
                continue
            token = steering.responses.next_token(req_ids[index], output)
            if token is not None:
                logits[index] = float("-inf")
                logits[index, token] = 0.0
        return logits


WORKER_EXTENSION = f"{__name__}.CrvlmWorkerExtension"
LOGITS_PROCESSOR = f"{__name__}:CrvlmLogitsProcessor"

#: engine settings crvlm needs (see the module text): pass them to ``vllm.LLM`` or ``vllm serve``
ENGINE_SETTINGS: dict[str, Any] = {"enforce_eager": True, "enable_chunked_prefill": False,
                                   "enable_prefix_caching": False}


def engine_settings(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The settings of :data:`ENGINE_SETTINGS` that bundles with these manifests need: bundles
    that leave every prompt's keys and values alone keep vLLM's chunked prefill and prefix caching."""
    if any(m.needs_whole_prompt for m in manifests):
        return dict(ENGINE_SETTINGS)
    return {"enforce_eager": True}


def prompt_token_ids(adapter: Any, questions: Sequence[str]) -> list[list[int]]:
    """Each question's prompt as the Steerer tokenizes it (chat template, no padding), for
    ``vllm.inputs.TokensPrompt``: both engines then see exactly the same tokens."""
    batch = adapter.build_prompts(questions)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def load_bundles(llm: Any, bundles: Sequence[str | Path]) -> list[str]:
    """Load (or replace) the bundles an engine made by :func:`steered_llm` serves; returns their
    names. A refused load keeps the bundles already served."""
    global _SERVED_NAMES
    names = llm.collective_rpc("crvlm_load", args=([str(Path(b)) for b in bundles],))[0]["bundles"]
    _SERVED_NAMES = set(names)
    return names


def steered_llm(model: str | Path, bundles: Sequence[str | Path], **engine_args: Any) -> Any:
    """A ``vllm.LLM`` with crvlm's worker extension and ``bundles`` loaded, checked by a canary
    request that must pass through the hooks."""
    from vllm import LLM, SamplingParams

    processors = [*engine_args.pop("logits_processors", []), LOGITS_PROCESSOR]
    manifests = [read_manifest(Path(b) / MANIFEST) for b in bundles]
    settings = {**engine_settings(manifests), **engine_args, "worker_extension_cls": WORKER_EXTENSION,
                "logits_processors": processors}
    llm = LLM(str(model), **settings)
    names = load_bundles(llm, bundles)
    before = llm.collective_rpc("crvlm_forwards")[0]
    llm.generate(["canary"], SamplingParams(max_tokens=1, extra_args={EXTRA_ARGS_KEY: names[:1]}), use_tqdm=False)
    if llm.collective_rpc("crvlm_forwards")[0] <= before:
        raise CrvlmError("crvlm's hooks did not run in vLLM's forward pass (a compiled or captured graph?)",
                         hint="start vLLM with enforce_eager=True")
    return llm
