"""A refusal bundle as a llama.cpp control vector: the part of it llama.cpp can run.

llama.cpp adds a fixed vector to the output of chosen layers of every token of every input
(``--control-vector FILE.gguf``). A control-vector GGUF has architecture ``controlvector`` and
one float32 tensor ``direction.N`` of ``hidden_size`` values per layer; llama.cpp adds
``direction.N`` to the output of decoder layer ``N`` (0-based), which is exactly the layer
whose output crvlm steers as layer ``N``. llama.cpp refuses ``direction.0`` (it reads layers
from 1), so a bundle that steers layer 0 cannot be exported.

What carries over: the additive push ``α·v_l`` at each band layer. What cannot:

- the gate: llama.cpp steers every input, the in-scope questions included;
- ``decode_steps``: llama.cpp steers every generated token, not only the first few;
- response shaping (forced opening, stop after n sentences);
- the rotation operator (it rescales each token, not a fixed addition) and template answers
  (nothing is steered): such bundles are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from crvlm_sdk import __version__
from crvlm_sdk.bundle.artifact import Bundle
from crvlm_sdk.errors import ExportError
from crvlm_sdk.files import FileArtifact, atomic_file

#: the GGUF architecture llama.cpp loads control vectors from
ARCHITECTURE = "controlvector"
#: metadata key that marks a file crvlm wrote (and so may replace with ``overwrite``)
BUNDLE_KEY = "crvlm.bundle"


@dataclass(frozen=True)
class ControlVector:
    """What an export wrote: the file, the layers it steers, and what the bundle did that the
    file cannot (for the warning a user must see)."""

    path: Path
    layers: list[int]
    dropped: list[str]


def control_directions(bundle: Bundle) -> dict[int, np.ndarray]:
    """``{layer: α·v_l}`` as float32, or :class:`ExportError` naming what llama.cpp cannot run."""
    m = bundle.manifest
    if m.response.mode == "template":
        raise ExportError(f"bundle {m.policy.name!r} answers refused questions with a fixed message (response mode "
                          "'template') and steers nothing; llama.cpp has no gate to decide who gets the message",
                          hint="export a bundle built with --mode steer")
    if m.operator != "additive":
        raise ExportError(f"bundle {m.policy.name!r} steers with the {m.operator!r} operator; a llama.cpp control "
                          "vector can only add a fixed vector", hint="build the bundle with --operator additive")
    if 0 in bundle.vectors:
        raise ExportError(f"bundle {m.policy.name!r} steers layer 0; llama.cpp control vectors start at layer 1",
                          hint="build the bundle with a band above layer 0 (--band)")
    return {layer: (m.alpha * vector.float()).numpy().astype(np.float32)
            for layer, vector in sorted(bundle.vectors.items())}


def dropped_features(bundle: Bundle) -> list[str]:
    """What the bundle does that llama.cpp will not, one phrase each."""
    m = bundle.manifest
    out = []
    if m.gate.type != "always":
        out.append("the gate: llama.cpp steers every input, in-scope questions included")
    if m.decode_steps is not None:
        out.append(f"decode_steps {m.decode_steps}: llama.cpp steers every generated token, not only the first "
                   f"{m.decode_steps}")
    if m.response.opening:
        out.append(f"the forced opening {m.response.opening!r}")
    if m.response.stop_sentences is not None:
        out.append(f"the stop after {m.response.stop_sentences} sentence(s)")
    return out


def _is_control_vector(path: Path) -> bool:
    with contextlib.suppress(Exception):  # any unreadable file is simply not ours
        meta, _ = read_control_vector(path)
        return meta.get("general.architecture") == ARCHITECTURE and BUNDLE_KEY in meta
    return False


CONTROL_VECTOR = FileArtifact("llama.cpp control vector", _is_control_vector, ExportError)


def export_llamacpp(bundle: Bundle | str | Path, out: str | Path, *, overwrite: bool = False) -> ControlVector:
    """Write ``bundle``'s steering as a llama.cpp control-vector GGUF (see the module text for
    what is lost). The file is written whole or not at all."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    directions = control_directions(bundle)
    m = bundle.manifest
    target = Path(out)
    CONTROL_VECTOR.check_replaceable(target, overwrite=overwrite)  # before any work
    dropped = dropped_features(bundle)
    metadata: dict[str, Any] = {
        f"{ARCHITECTURE}.model_hint": m.backbone.model_type, BUNDLE_KEY: m.policy.name, "crvlm.version": __version__,
        "crvlm.policy_subject": m.policy.subject, "crvlm.base_model": m.base_model_name_or_path,
        "crvlm.first_layer_sha256": m.backbone.first_layer_sha256,
        "crvlm.bundle_tensors_sha256": m.tensors_sha256,  # set once the bundle is saved
        "crvlm.alpha": float(m.alpha), "crvlm.dropped": dropped}
    with atomic_file(target, CONTROL_VECTOR, overwrite=overwrite) as tmp:
        write_control_vector(tmp, directions, {k: v for k, v in metadata.items() if v not in ("", [])})
    return ControlVector(target, list(directions), dropped)


def write_control_vector(path: str | Path, directions: Mapping[int, np.ndarray],
                         metadata: Mapping[str, str | float | list[str]] | None = None) -> None:
    """A control-vector GGUF: ``direction.N`` per layer, plus string, float and string-list
    metadata."""
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(directions))
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, list(value))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(direction, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_control_vector(path: str | Path) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Metadata and ``{layer: direction}`` of a control-vector GGUF (for tests and checks)."""
    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    directions = {}
    for tensor in reader.tensors:
        group, _, layer = tensor.name.partition(".")
        if group == "direction" and layer.isdigit():
            directions[int(layer)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return meta, directions
