"""A training run as the command line describes it: model, training and data settings from a
preset, a TOML file and flags (in that order of precedence, flags last), and the data sources.

A TOML file has up to three tables, named after the dataclasses whose fields they set::

    [model]                      # rnnlab.LMConfig
    layout = "gated_deltanet*3,swa(window=256)"
    d_model = 256
    [train]                      # rnnlab.train.TrainConfig
    steps = 2000
    [data]                       # rnnlab.train.run.DataConfig
    data = ["my_texts/"]
    tokenizer = "my_tokenizer_dir"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..configs import apply, load_toml
from ..models.lm import LMConfig
from .trainer import TrainConfig

__all__ = ["DataConfig", "PRESETS", "MODEL_FIELDS", "RunSpec", "resolve", "open_data", "make_sources", "read_run",
           "check_fits", "training_bytes"]


MODEL_FIELDS = ("layout", "n_layers", "d_model", "mlp", "d_ff", "mlp_bias", "mixer_mlp", "norm_eps", "norm_plus_one",
                "embed_scale", "logit_softcap", "tie_embeddings", "init_std")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenised."""

    data: list[str] = field(default_factory=list)  # text files, directories or globs, or one directory made by `rnnlab data prepare`; empty = the standard library's Python source
    tokenizer: str = "bytes"  # "bytes", or a tokenizer.json / a directory holding one (ignored for a prepared directory)
    max_bytes: int = 20_000_000  # read at most this many bytes of text for training (0 = all)
    eval_batches: int = 8  # validation batches per evaluation (batches of train.batch_size / grad_accum sequences)
    seed: int = 0  # seed of the model's initialisation and of the order of training windows
    packing: str = "concat"  # "documents": each document in a window starts from a fresh state (cu_seqlens); "concat": documents run into each other
    bos: bool = False  # open every training and validation window with the tokenizer's beginning-of-sequence token (position 0 always the same token, as in LLM pretraining); eval then starts its streams with it

    def __post_init__(self) -> None:
        if self.packing not in ("concat", "documents"):
            raise ValueError(f"packing must be 'concat' or 'documents', got {self.packing!r}")
        if not isinstance(self.bos, bool):
            raise ValueError(f"bos must be True or False, got {self.bos!r}")
        for name, lo in (("max_bytes", 0), ("eval_batches", 1), ("seed", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {getattr(self, name)!r}")


# Presets set model and training sizes; anything can still be overridden by a file or a flag.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"model": dict(d_model=128, n_layers=4), "train": dict(seq_len=256, batch_size=16, steps=500, lr=3e-3)},
    "small": {"model": dict(d_model=256, n_layers=6), "train": dict(seq_len=512, batch_size=32, steps=3000, lr=2e-3)},
    "base": {"model": dict(d_model=512, n_layers=8), "train": dict(seq_len=1024, batch_size=32, steps=20000, lr=1e-3,
                                                                    min_lr=1e-4, warmup=500)},
}

_SECTIONS = {"model": LMConfig, "train": TrainConfig, "data": DataConfig}


@dataclass
class RunSpec:
    """The settings a preset, a file and flags gave for a run (only those given, per section)."""

    model: dict[str, Any]  # LMConfig fields (without vocab_size, which the tokenizer decides)
    train: dict[str, Any]  # TrainConfig fields
    data: dict[str, Any]  # DataConfig fields


def resolve(preset: str | None, config_file: str | None, flags: dict[str, dict[str, Any]]) -> RunSpec:
    """Merge ``preset`` < ``config_file`` (TOML) < ``flags`` (per section), checking names and types;
    fields none of them gives keep their dataclass defaults (or, when resuming, the run's values)."""
    layers: list[tuple[str, dict]] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        layers.append((f"preset {preset!r}", PRESETS[preset]))
    if config_file:
        raw = load_toml(config_file)
        unknown = set(raw) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"--config {config_file}: unknown table(s) {sorted(unknown)}; use [model], [train], [data]")
        layers.append((f"--config {config_file}", raw))
    layers.append(("command line", flags))
    merged: dict[str, dict[str, Any]] = {k: {} for k in _SECTIONS}
    for where, layer in layers:
        for section, cls in _SECTIONS.items():
            values = layer.get(section, {})
            if not isinstance(values, dict):
                raise ValueError(f"{where}: [{section}] must be a table")
            merged[section].update(apply(cls, values, f"{where} [{section}]"))
    for name in ("vocab_size",):
        if name in merged["model"]:
            raise ValueError("vocab_size is set by the tokenizer; choose the tokenizer in [data] instead")
    for name in ("out_dir", "resume"):
        if name in merged["train"]:
            raise ValueError(f"{name} is set by --out / --resume on the command line, not in [train]")
    return RunSpec(merged["model"], merged["train"], merged["data"])


def _is_prepared(paths: list[str]) -> bool:
    return len(paths) == 1 and (Path(paths[0]) / "meta.json").is_file()


def open_data(d: DataConfig, cache_dir: str | Path, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
              reuse: bool = False, progress: bool | None = None):
    """(train, validation) :class:`~rnnlab.data.TokenData`: a prepared directory is opened as it is;
    text is tokenised into ``cache_dir`` (by the main process) and memory-mapped; with ``reuse``
    (a resumed run) an existing cache is kept. ``progress``: a bar while tokenising (None: on a
    terminal)."""
    import sys
    from ..data import TokenData, prepare_corpus
    if _is_prepared(d.data):
        src = Path(d.data[0])
    else:
        src = Path(cache_dir)
        if is_main and not (reuse and (src / "meta.json").is_file()):
            show = progress if progress is not None else sys.stderr.isatty()
            prepare_corpus(d.data or None, src, tokenizer=d.tokenizer, max_bytes=d.max_bytes or None, progress=show)
        barrier()
    return TokenData.open(src, "train"), TokenData.open(src, "val")


def make_sources(train_data, val_data, t: TrainConfig, seed: int, rank: int = 0, world_size: int = 1,
                 eval_batches: int = 8, boundaries: bool = False,
                 bos_id: int | None = None) -> tuple[Any, Callable[[], Iterable]]:
    """The training batch source (this rank's share of random windows) and a factory of the
    validation pass (the first ``eval_batches`` batches of consecutive windows); ``boundaries``
    keeps documents apart in both (DataConfig.packing = "documents"); ``bos_id`` opens every
    window of both with that token (DataConfig.bos)."""
    from ..data import RandomWindows, SequentialWindows
    train_src = RandomWindows(train_data, t.micro_batch_size, t.seq_len, seed=seed, rank=rank, world_size=world_size,
                              boundaries=boundaries, bos_id=bos_id)
    return train_src, lambda: SequentialWindows(val_data, t.micro_batch_size, t.seq_len, max_batches=eval_batches,
                                                boundaries=boundaries, bos_id=bos_id)


def read_run(run_dir: str | Path) -> dict:
    """The ``run.json`` of a training run: its data settings, sequence length and tokenizer."""
    import json
    path = Path(run_dir) / "run.json"
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: no run.json (not a directory made by `rnnlab train`)") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("data"), dict):
        raise ValueError(f"{path} has no [data] settings: not a run.json written by `rnnlab train`")
    return run


def training_bytes(m: LMConfig, t: TrainConfig) -> tuple[int, int, int]:
    """A rough estimate of what one training step holds in memory: ``(parameters, bytes for the
    weights, their gradients and AdamW moments (16 per parameter, float32), bytes of activations
    kept for the backward pass)``. Parameters are counted exactly (each kind of block is built once
    on the meta device); activations are taken as (12·D + 3·d_ff) floats per token per block plus
    three copies of the logits, which is within a small factor for every mixer."""
    import torch
    from ..models.lm import Block
    from ..models.registry import get_spec
    kinds: dict[tuple, int] = {}
    for spec in m.blocks:  # blocks that differ only in their depth option have the same size
        depth = None if spec.name == "mlp" else get_spec(spec.name).depth_option
        key = (spec.name, tuple(o for o in spec.options if o[0] != depth))
        kinds[key] = kinds.get(key, 0) + 1
    n = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    with torch.device("meta"):
        for (name, options), count in kinds.items():
            from ..models.layout import BlockSpec
            n += count * sum(p.numel() for p in Block(BlockSpec(name, options), m).parameters())
    tokens = t.micro_batch_size * t.seq_len
    act = 4 * tokens * (m.n_layers * (12 * m.d_model + 3 * m.d_ff) + 3 * m.vocab_size)
    return n, 16 * n, act


def _memory_of(device) -> int | None:
    import os
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no check
            return None
    return None


def check_fits(m: LMConfig, t: TrainConfig, train_data, val_data, device) -> None:
    """Refuse, before any training, a run whose data is shorter than one window or whose estimated
    memory (:func:`training_bytes`) exceeds the device's: the errors name the flags to change."""
    need = t.seq_len + 1
    for name, data in (("training", train_data), ("validation", val_data)):
        if len(data) < need:
            raise ValueError(f"--seq-len {t.seq_len}: the {name} split has {len(data):,} tokens, but one window needs "
                             f"seq_len + 1 = {need:,}; lower --seq-len or give more text with --data")
    total = _memory_of(device)
    if total is None:
        return
    n, state, act = training_bytes(m, t)
    gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    if state > total:
        sizes = f"--d-model {m.d_model}, --n-layers {m.n_layers}, --layout {m.layout!r}" + (
            f", --d-ff {m.d_ff}" if m.d_ff is not None else "")
        raise ValueError(f"{sizes}: the model has {n:,} parameters; their weights, gradients and AdamW moments "
                         f"need about {gib(state)}, more than the {gib(total)} of this {device.type} device")
    if state + act > total:
        raise ValueError(f"--batch-size {t.batch_size} (--grad-accum {t.grad_accum}) x --seq-len {t.seq_len}: the "
                         f"activations of one micro-batch need about {gib(act)} besides {gib(state)} for the model, "
                         f"more than the {gib(total)} of this {device.type} device; lower --batch-size or "
                         "--seq-len, or raise --grad-accum")
