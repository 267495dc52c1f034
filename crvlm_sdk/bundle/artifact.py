"""The refusal bundle: ``manifest.json`` + ``tensors.safetensors`` in one directory.

Loading never unpickles anything: tensors come from safetensors, metadata from JSON validated
by pydantic, and the tensor file's sha256 is checked against the manifest before it is
parsed. Saving writes into a sibling temporary directory and renames it into place, so a
crash leaves either the old bundle or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from crvlm_sdk.adapters.base import BackboneAdapter
from crvlm_sdk.bundle.card import MODEL_CARD, model_card
from crvlm_sdk.bundle.gates import LayerGates
from crvlm_sdk.bundle.manifest import (
    MANIFEST,
    TENSORS,
    GateSpec,
    Manifest,
    Operator,
    PolicySummary,
    ResponseSpec,
    read_manifest,
)
from crvlm_sdk.components import Gate
from crvlm_sdk.errors import BundleError, CrvlmError
from crvlm_sdk.files import BUNDLE, atomic_directory, recover_interrupted
from crvlm_sdk.plugins.manager import PluginManager, get_plugin_manager

#: a layer number as crvlm writes it in tensor names: ASCII digits, no leading zero
_LAYER = re.compile(r"0|[1-9][0-9]*")

#: the most a bundle may add to one activation (α × the largest vector entry): float16 ends at
#: 65504, and a push far past the residual stream's own scale only makes NaN or noise
MAX_STEER = 1e4


@dataclass
class Bundle:
    """Steering vectors per layer, a gate, and the manifest that describes them."""

    manifest: Manifest
    vectors: dict[int, torch.Tensor]
    #: per gate layer, that layer's gate parameters
    gate_tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.policy.name

    @classmethod
    def create(
        cls,
        *,
        adapter: BackboneAdapter,
        policy: PolicySummary | Mapping[str, Any],
        vectors: Mapping[int, torch.Tensor],
        gate: Gate | LayerGates,
        gate_layer: int | None = None,
        alpha: float,
        operator: Operator = "additive",
        decode_steps: int | None = None,
        response: ResponseSpec | None = None,
        extraction: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        extra_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> Bundle:
        """Assemble a bundle for ``adapter``'s model, fingerprinting it.

        ``gate`` is one gate read at ``gate_layer``, or :class:`LayerGates` (no ``gate_layer``).
        """
        if isinstance(gate, LayerGates):
            if gate_layer is not None:
                raise BundleError("gate_layer is given by LayerGates; pass it only with a single Gate")
            gates = gate
        elif gate_layer is None:
            raise BundleError("a single gate needs gate_layer (the layer it reads)")
        else:
            gates = LayerGates({gate_layer: gate})
        summary = policy if isinstance(policy, PolicySummary) else PolicySummary(**policy)
        manifest = Manifest(
            policy=summary,
            backbone=adapter.fingerprint(),
            base_model_name_or_path=str(getattr(adapter.model.config, "_name_or_path", "") or ""),
            base_model_revision=getattr(adapter.model.config, "_commit_hash", None),
            adapter=adapter.name,
            layers=sorted(int(k) for k in vectors),
            alpha=float(alpha),
            operator=operator,
            decode_steps=decode_steps,
            response=response or ResponseSpec(),
            gate=GateSpec(type=gates.name, layers=gates.layers, features=gates.features,
                          params=sorted(next(iter(gates.gates.values())).tensors()),
                          configs=[g.config() for g in gates.gates.values()]),
            extraction=dict(extraction or {}),
            validation=dict(validation or {}),
        )
        bundle = cls(
            manifest=manifest,
            vectors={int(k): v.detach().float().cpu().contiguous() for k, v in vectors.items()},
            gate_tensors={layer: {k: v.detach().float().cpu().contiguous() for k, v in g.tensors().items()}
                          for layer, g in gates.gates.items()},
            extra_tensors={k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()},
        )
        bundle.check("<new bundle>")
        return bundle

    # -- consistency ----------------------------------------------------------------------
    def check(self, where: str) -> None:
        """Raise :class:`BundleError` if tensors and manifest disagree or hold NaN/inf."""
        m = self.manifest
        if not m.layers:
            raise BundleError(f"{where}: field `layers` is empty")
        if sorted(set(m.layers)) != m.layers:
            raise BundleError(f"{where}: field `layers` must be sorted and unique, got {m.layers}")
        if any(layer < 0 or layer >= m.backbone.num_layers for layer in m.layers):
            raise BundleError(f"{where}: field `layers` {m.layers} outside 0..{m.backbone.num_layers - 1}")
        if m.gate.layers[-1] >= m.backbone.num_layers:
            raise BundleError(f"{where}: field `gate.layers` {m.gate.layers} reaches past num_layers "
                              f"{m.backbone.num_layers}")
        if set(self.vectors) != set(m.layers):
            raise BundleError(
                f"{where}: vectors for layers {sorted(self.vectors)} but field `layers` says {m.layers}"
            )
        for layer, vec in self.vectors.items():
            if tuple(vec.shape) != (m.backbone.hidden_size,):
                raise BundleError(
                    f"{where}: tensor `vector.{layer}` has shape {tuple(vec.shape)}, "
                    f"expected ({m.backbone.hidden_size},)"
                )
            if not bool(torch.isfinite(vec).all()):
                raise BundleError(f"{where}: tensor `vector.{layer}` contains NaN or inf")
        if sorted(self.gate_tensors) != m.gate.layers:
            raise BundleError(f"{where}: gate tensors for layers {sorted(self.gate_tensors)} but field "
                              f"`gate.layers` says {m.gate.layers}")
        for layer, tensors in self.gate_tensors.items():
            if sorted(tensors) != sorted(m.gate.params):
                raise BundleError(f"{where}: gate tensors {sorted(tensors)} at layer {layer} but field "
                                  f"`gate.params` says {m.gate.params}")
            for name, tensor in tensors.items():
                if not bool(torch.isfinite(tensor).all()):
                    raise BundleError(f"{where}: tensor `{self._gate_key(layer, name)}` contains NaN or inf")
        if not (m.alpha == m.alpha and abs(m.alpha) != float("inf")):
            raise BundleError(f"{where}: field `alpha` is not finite")
        for layer, vec in self.vectors.items():
            largest = abs(m.alpha) * float(vec.abs().max()) if vec.numel() else 0.0
            if largest > MAX_STEER:
                raise BundleError(f"{where}: field `alpha` × tensor `vector.{layer}` adds up to {largest:.3g} to one "
                                  f"activation (more than {MAX_STEER:g}: no model survives that)",
                                  hint="rebuild the bundle; vectors are unit length and α is a few residual norms")

    def replaced(self, *, name: str | None = None,
                 gate_tensors: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                 **manifest_fields: Any) -> Bundle:
        """A copy with some manifest fields changed (``name``: the policy name), tensors shared.

        Evaluation variants and sweep candidates are built this way; the copy is checked like
        any new bundle.
        """
        update = dict(manifest_fields)
        if name is not None:
            update["policy"] = self.manifest.policy.model_copy(update={"name": name})
        manifest = Manifest.model_validate(self.manifest.model_copy(update=update).model_dump())
        tensors = self.gate_tensors if gate_tensors is None else gate_tensors
        bundle = replace(self, manifest=manifest,
                         gate_tensors={layer: dict(t) for layer, t in tensors.items()})
        bundle.check(f"<variant {bundle.name}>")
        return bundle

    def gate(self, plugins: PluginManager | None = None) -> LayerGates:
        """Instantiate the bundle's gate (one plugin instance per layer it reads), checked once on
        a probe batch: it must take the features the bundle reads and give one finite score per
        row in [0, 1], or the bundle is refused here rather than inside a forward hook."""
        spec = self.manifest.gate
        cls = (plugins or get_plugin_manager()).get("gate", spec.type)
        width = self.manifest.backbone.hidden_size * (2 if spec.features == "last+question" else 1)
        gates = {}
        for layer, config in zip(spec.layers, spec.configs, strict=True):
            what = f"the {spec.type!r} gate at layer {layer}"
            try:
                gate = cls.from_tensors(self.gate_tensors[layer], config)
                p = gate.score(torch.zeros(2, width))
            except BundleError:
                raise
            except CrvlmError as exc:
                raise BundleError(f"bundle {self.name!r}: {what}: {exc}", hint=exc.hint) from None
            except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
                raise BundleError(f"bundle {self.name!r}: {what} cannot read {width} features "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                  hint="its tensors do not fit the model's hidden size") from None
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != (2,):
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise BundleError(f"bundle {self.name!r}: {what} returned {shape} for 2 rows; a gate returns "
                                  "one score per row, shape (rows,)")
            if not bool((torch.isfinite(p) & (p >= 0) & (p <= 1)).all()):
                raise BundleError(f"bundle {self.name!r}: {what} scores {p.tolist()}, not probabilities in [0, 1]")
            gates[layer] = gate
        return LayerGates(gates, spec.features)

    # -- disk -----------------------------------------------------------------------------
    def _gate_key(self, layer: int, name: str) -> str:
        """``gate.<name>`` for a gate read at one layer (as before format 1.3), else ``gate.<layer>.<name>``."""
        return f"gate.{name}" if len(self.manifest.gate.layers) == 1 else f"gate.{layer}.{name}"

    def _tensor_dict(self) -> dict[str, torch.Tensor]:
        out = {f"vector.{layer}": vec for layer, vec in self.vectors.items()}
        out.update({self._gate_key(layer, k): v for layer, t in self.gate_tensors.items() for k, v in t.items()})
        out.update({f"extra.{k}": v for k, v in self.extra_tensors.items()})
        return out

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write atomically to ``path`` (a directory): manifest, tensors and a ``README.md`` model
        card. An existing directory is replaced only with ``overwrite`` and only if it is a bundle."""
        self.check("<bundle being saved>")
        target = Path(path)
        with atomic_directory(target, BUNDLE, overwrite=overwrite) as tmp:  # refuses a target it may not replace
            blob = save_safetensors(self._tensor_dict(), metadata={"format": "crvlm-bundle"})
            self.manifest.tensors_sha256 = hashlib.sha256(blob).hexdigest()
            (tmp / TENSORS).write_bytes(blob)
            (tmp / MANIFEST).write_text(self.manifest.to_json())
            (tmp / MODEL_CARD).write_text(model_card(self.manifest, target.name))
        return target

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """:meth:`save` under the name the Hugging Face ecosystem (PEFT adapters) uses."""
        return self.save(path, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, adapter: BackboneAdapter | None = None,
                        check_fingerprint: bool = True) -> Bundle:
        """:meth:`load` under the name the Hugging Face ecosystem (PEFT adapters) uses."""
        return cls.load(path, adapter=adapter, check_fingerprint=check_fingerprint)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        adapter: BackboneAdapter | None = None,
        check_fingerprint: bool = True,
    ) -> Bundle:
        """Read and validate a bundle; with ``adapter``, also check it fits that model."""
        root = Path(path)
        if not root.is_dir():
            recover_interrupted(root)  # a writer killed between its two renames left it aside
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} is not a directory")
        for name in (MANIFEST, TENSORS):
            if (root / name).is_symlink():
                raise BundleError(f"{root / name} is a symbolic link; a bundle's files must be its own",
                                  hint="copy the file into the bundle directory")
        manifest = read_manifest(root / MANIFEST)
        tensor_path = root / TENSORS
        if not tensor_path.is_file():
            raise BundleError(f"{tensor_path} is missing", hint="a bundle is manifest.json + tensors.safetensors")
        blob = tensor_path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != manifest.tensors_sha256:
            raise BundleError(
                f"{tensor_path}: sha256 {digest[:16]}... does not match field `tensors_sha256` "
                f"{manifest.tensors_sha256[:16]}... in {MANIFEST} (file modified or truncated)"
            )
        try:
            tensors = load_safetensors(blob)
        except (SafetensorError, ValueError) as exc:
            raise BundleError(f"{tensor_path}: not a readable safetensors file ({exc})") from None
        vectors: dict[int, torch.Tensor] = {}
        gate_layers = manifest.gate.layers
        gate_tensors: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in gate_layers}
        extra: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            group, _, rest = key.partition(".")
            if group == "vector" and _LAYER.fullmatch(rest):
                if int(rest) in vectors:
                    raise BundleError(f"{tensor_path}: two tensors for `vector.{int(rest)}`")
                vectors[int(rest)] = tensor.float()
            elif group == "gate" and rest and len(gate_layers) == 1:
                gate_tensors[gate_layers[0]][rest] = tensor.float()
            elif group == "gate" and rest.partition(".")[0] in {str(layer) for layer in gate_layers}:
                layer, _, param = rest.partition(".")
                gate_tensors[int(layer)][param] = tensor.float()
            elif group == "extra" and rest:
                extra[rest] = tensor
            else:
                raise BundleError(f"{tensor_path}: unexpected tensor name {key!r}")
        bundle = cls(manifest=manifest, vectors=vectors, gate_tensors=gate_tensors, extra_tensors=extra)
        bundle.check(str(root))
        if adapter is not None:
            bundle.check_model(adapter, where=str(root), check_fingerprint=check_fingerprint)
        return bundle

    def check_model(self, adapter: BackboneAdapter, *, where: str = "bundle", check_fingerprint: bool = True) -> None:
        """Refuse a model the bundle was not built for, naming every differing field."""
        found = adapter.fingerprint()
        diffs = self.manifest.backbone.differences(found)
        if self.manifest.adapter and self.manifest.adapter != adapter.name:
            diffs.append(f"adapter: bundle was built through {self.manifest.adapter!r}, the model is read through "
                         f"{adapter.name!r} (pass --adapter {self.manifest.adapter})")
        if not check_fingerprint:
            # Shapes must still agree or steering would fail or silently broadcast.
            diffs = [d for d in diffs if d.split(":")[0] in ("hidden_size", "num_layers")]
        if diffs:
            raise BundleError(
                f"{where} was built for another model: " + "; ".join(diffs),
                hint="rebuild the bundle for this model (crvlm build-bundle)",
            )


