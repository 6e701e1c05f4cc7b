"""Training checkpoints that are whole or absent, never torn.

A run directory holds::

    run/
      checkpoints/
        step_00000500/        config.json, model.safetensors (a loadable model: rnnlab.load_model),
                              trainer.pt (optimiser, step, sampler and RNG state, metrics offset),
                              manifest.json (what is in the directory, with sizes and SHA-256)
        step_00001000/
        latest                the name of the newest complete checkpoint
      metrics.jsonl, loss.png

A checkpoint is written into a hidden temporary directory, every file fsync'd, and renamed into
place in one step; ``latest`` is replaced (atomically) only after that, and older checkpoints
beyond ``keep_last`` are removed last. A crash at any moment leaves ``latest`` naming a complete
checkpoint. Loading checks the manifest: a truncated, torn, edited or foreign checkpoint is refused
by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..models.lm import FORMAT_VERSION, TEMP_PREFIX, LMConfig, atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "run_exists", "remove_stale_temp", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "rnnlab.checkpoint"
CHECKPOINT_VERSION = 1
_FILES = ("config.json", "model.safetensors", "trainer.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, torn, truncated, foreign or for another model)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories of a run, oldest first (by step)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None when the run has none yet."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not name.startswith("step_") or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory")
    return path


def run_exists(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` already holds a training run (checkpoints or metrics)."""
    d = Path(run_dir)
    return (d / "checkpoints" / "latest").is_file() or (d / "metrics.jsonl").is_file()


def remove_stale_temp(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the ``.tmp*`` files and directories that killed processes left in a run directory
    and its ``checkpoints/`` (call it only when no process is writing the run). Returns them."""
    gone = []
    for d in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for stale in d.glob(TEMP_PREFIX + "*") if d.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            gone.append(stale)
    return gone


def save_checkpoint(run_dir: str | os.PathLike, step: int, config: LMConfig, model_state: dict[str, torch.Tensor],
                    trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` of a run and make it the latest; returns its directory.

    ``model_state`` is the full (unsharded) state dict of the model, ``trainer_state`` anything
    ``torch.save`` can write (optimiser state, step, sampler state, ...). ``keep_last`` removes all
    but the newest that many checkpoints afterwards (None keeps all).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = _step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the directory the mode mkdir would
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()
                   if not (config.tie_embeddings and k == "lm_head.weight")}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "model_type": "rnnlab.LM", "config": config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {}
        for f in _FILES:
            os.chmod(tmp / f, 0o666 & ~umask)  # safetensors writes 0600: give the files the mode open() would
            with open(tmp / f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f] = {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
        manifest = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "step": step, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with open(tmp / "manifest.json", "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # left by a run killed after the rename but before `latest` moved on
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / "latest", lambda p: Path(p).write_text(name + "\n"))
    _fsync_dir(root)
    kept = []
    for p in list_checkpoints(run_dir):
        if p.name > name:  # ahead of this one: left by a run that was killed and resumed from earlier
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    if keep_last is not None:
        for old in kept[: max(0, len(kept) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(TEMP_PREFIX + "*"):  # temporaries of killed saves
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[LMConfig, dict[str, torch.Tensor], dict]:
    """Validate and read a checkpoint directory (or a run directory: its latest checkpoint).

    Returns ``(config, model_state, trainer_state)``. Raises :class:`CheckpointError` naming the
    checkpoint and what is wrong when it is missing, truncated, torn, edited or not an rnnlab one.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (no checkpoints/latest)")
        path = latest
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete rnnlab checkpoint: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e}): the checkpoint is torn") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not an rnnlab checkpoint (manifest kind {manifest.get('kind')!r})"
                              if isinstance(manifest, dict) else f"{manifest_path} is not a checkpoint manifest")
    if manifest.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest['version']}; this rnnlab reads <= {CHECKPOINT_VERSION}")
    for f in _FILES:
        want = manifest.get("files", {}).get(f)
        p = path / f
        if want is None or not p.is_file():
            raise CheckpointError(f"checkpoint {path}: {f} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {f} has {size} bytes, the manifest says {want['bytes']} "
                                  "(truncated or torn)")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {f} does not match its SHA-256 in the manifest (corrupted or edited)")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("model_type") != "rnnlab.LM":
        raise CheckpointError(f"checkpoint {path}: config.json is not an rnnlab model config")
    config = LMConfig(**meta["config"])
    model_state = load_file(str(path / "model.safetensors"), device=str(map_location))
    if config.tie_embeddings and "embed.weight" in model_state:
        model_state["lm_head.weight"] = model_state["embed.weight"]
    trainer_state = torch.load(path / "trainer.pt", map_location=map_location, weights_only=True)  # tensors and plain data only
    if trainer_state.get("step") != manifest.get("step"):
        raise CheckpointError(f"checkpoint {path}: trainer.pt is at step {trainer_state.get('step')} but the "
                              f"manifest says {manifest.get('step')} (torn)")
    return config, model_state, trainer_state
