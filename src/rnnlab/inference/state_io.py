"""Saving and loading states: safetensors tensors + JSON metadata, written atomically.

The metadata records the format version, what the state belongs to (a whole model, with its
config, or a single mixer, with its name and config), a SHA-256 fingerprint of the owner's weights,
the state class of each layer, integer fields and the dtype; a model state's position per row is
the int64 tensor ``seen``. Loading checks all of it against the model given: a state is refused by
a model of the same config but other weights (files of format 1, written before the fingerprint
existed, load unchecked). Files of formats 1 and 2 hold one token count for all rows: they load
when that count is exact (one row, or rows whose attention layers record their own positions) and
are refused otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..layers.attention import AttentionState
from ..layers.base import Mixer
from ..layers.state import State, StateError
from ..models.lm import LM, ModelState, atomic_write

__all__ = ["save_state", "load_state", "load_extra", "weights_fingerprint", "STATE_FORMAT_VERSION"]

STATE_FORMAT_VERSION = 3


def weights_fingerprint(model: LM | Mixer) -> str:
    """SHA-256 of ``model``'s config and every tensor of its state dict (names, dtypes, shapes and
    bytes). Cached on the model until one of its tensors changes (in-place updates included)."""
    key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    cached = model.__dict__.get("_rnnlab_fingerprint")
    if cached is not None and cached[0] == key:
        return cached[1]
    sd = model.state_dict()
    h = hashlib.sha256(json.dumps(_owner(model), sort_keys=True, default=str).encode())
    for name, t in sd.items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    model.__dict__["_rnnlab_fingerprint"] = (key, digest)
    return digest


def _owner(model: LM | Mixer) -> dict:
    if isinstance(model, LM):
        return {"kind": "model", "config": model.config.to_dict()}
    if isinstance(model, Mixer):
        return {"kind": "mixer", "mixer": type(model).__name__, "config": asdict(model.config)}
    raise TypeError(f"model must be an rnnlab LM or Mixer, got {type(model).__name__}")


def save_state(state: ModelState | State, path: str | os.PathLike, model: LM | Mixer,
               extra: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``state`` (of ``model``, a whole LM or one mixer) to ``path`` (safetensors), atomically.
    ``extra`` tensors are stored beside it under ``extra.<name>`` (e.g. a stream's last logits).
    ``dtype`` (e.g. ``torch.bfloat16``) stores the floating tensors cast to it (half the bytes);
    :func:`load_state` casts back on request."""
    owner = _owner(model)
    if owner["kind"] == "model":
        if not isinstance(state, ModelState):
            raise StateError(f"a model's state must be a ModelState, got {type(state).__name__}")
        model.check_state(state, state.seen.shape[0])
        layers, tensors = state.layers, {"seen": state.seen.detach().contiguous().cpu()}
    else:
        model.check_state(state, state.batch_size)
        layers, tensors = (state,), {}
    classes, scalars = [], []
    for i, s in enumerate(layers):
        classes.append(None if s is None else type(s).__name__)
        scalars.append({} if s is None else s.scalars())
        for name, t in ({} if s is None else (s.to(dtype=dtype) if dtype else s).tensors()).items():
            tensors[f"layers.{i}.{name}"] = t.detach().contiguous().cpu()
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t.detach().contiguous().cpu()
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    meta = {"format_version": STATE_FORMAT_VERSION, **owner, "weights_sha256": weights_fingerprint(model),
            "classes": classes, "scalars": scalars, "dtype": dtypes}
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"rnnlab_state": json.dumps(meta)}))


def load_extra(path: str | os.PathLike, name: str, device=None) -> torch.Tensor | None:
    """The ``extra`` tensor ``name`` saved beside a state, or None."""
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
        key = f"extra.{name}"
        return f.get_tensor(key) if key in f.keys() else None


def load_state(path: str | os.PathLike, model: LM | Mixer, device=None,
               dtype: torch.dtype | None = None) -> ModelState | State:
    """Read a state written by :func:`save_state` for ``model``; checks that it belongs to it (its
    config and the fingerprint of its weights). ``dtype`` casts the floating tensors (None: as saved).

    Raises FileNotFoundError, or StateError for a corrupted file, another model's state (another
    config or other weights) or a shape that does not fit.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no state file at {path!s}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("rnnlab_state")
        tensors = load_file(str(path), device=str(device or "cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise StateError(f"{path!s} is not a readable state file (corrupted or not safetensors): {e}") from None
    if raw is None:
        raise StateError(f"{path!s} is a safetensors file but holds no rnnlab state metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise StateError(f"{path!s}: its rnnlab state metadata is not valid JSON (corrupted file)") from None
    if meta.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise StateError(f"{path!s} has state format {meta['format_version']}; this rnnlab reads <= {STATE_FORMAT_VERSION}")
    owner = _owner(model)
    if meta["kind"] != owner["kind"] or meta.get("mixer") != owner.get("mixer"):
        what = meta.get("mixer", "a whole model")
        raise StateError(f"{path!s} holds the state of {what}, not of this {type(model).__name__}")
    if meta["config"] != json.loads(json.dumps(owner["config"])):
        diff = {k: (meta["config"].get(k), v) for k, v in json.loads(json.dumps(owner["config"])).items()
                if meta["config"].get(k) != v}
        raise StateError(f"{path!s} was saved from a model with another config (saved vs this model: {diff})")
    if "weights_sha256" in meta and meta["weights_sha256"] != weights_fingerprint(model):
        raise StateError(f"{path!s} was saved from a model with the same config but other weights; a state only "
                         "continues the weights that made it (load those weights, or start a new stream)")
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() and k.startswith("layers.") else t
                   for k, t in tensors.items()}
    ref = model.init_state(1, device="meta")
    refs = ref.layers if owner["kind"] == "model" else (ref,)
    layers = []
    for i, (cls_name, scal, r) in enumerate(zip(meta["classes"], meta["scalars"], refs)):
        if cls_name is None:
            layers.append(None)
            continue
        if type(r).__name__ != cls_name:
            raise StateError(f"{path!s}: layer {i} state is a {cls_name}, the model expects a {type(r).__name__}")
        parts = {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"layers.{i}.")}
        layers.append(type(r).from_parts(parts, scal))
    if owner["kind"] == "mixer":
        model.check_state(layers[0], layers[0].batch_size)
        return layers[0]
    state = ModelState(tuple(layers), _seen(path, meta, tensors, layers))
    model.check_state(state, state.seen.shape[0])
    return state


def _seen(path, meta: dict, tensors: dict[str, torch.Tensor], layers: list) -> torch.Tensor:
    """The position of each row of a model state file: its ``seen`` tensor (format 3); in older
    files one count, read only where it is exact."""
    version = meta.get("format_version", 0)
    rows = next((s.batch_size for s in layers if s is not None), None)
    if version >= 3:
        seen = tensors.get("seen")
        if seen is None or seen.dtype != torch.int64 or seen.dim() != 1 or rows not in (None, seen.shape[0]):
            got = "none" if seen is None else f"{seen.dtype} {tuple(seen.shape)}"
            raise StateError(f"{path!s}: the positions 'seen' must be an int64 tensor of {rows} rows, got {got} "
                             "(corrupted file)")
        return seen
    device = next((t.device for t in tensors.values()), None)
    if rows in (None, 1):  # one row: the count is its position
        return torch.tensor([meta.get("tokens_seen") or 0], dtype=torch.int64, device=device)
    for s in layers:  # attention layers of those files record each row's position
        if isinstance(s, AttentionState):
            return s.seen.clone()
    raise StateError(f"{path!s} has state format {version}: one token count for its {rows} rows, "
                     "which may have sat at different positions, so it cannot be read exactly; save the state "
                     "again with this rnnlab (format 3 keeps a position per row) or load one-row states")
