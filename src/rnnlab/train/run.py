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

__all__ = ["DataConfig", "PRESETS", "MODEL_FIELDS", "RunSpec", "resolve", "open_data", "make_sources"]


MODEL_FIELDS = ("layout", "n_layers", "d_model", "mlp", "d_ff", "mixer_mlp", "norm_eps", "tie_embeddings", "init_std")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenised."""

    data: list[str] = field(default_factory=list)  # text files, directories or globs, or one directory made by `rnnlab data prepare`; empty = the standard library's Python source
    tokenizer: str = "bytes"  # "bytes", or a tokenizer.json / a directory holding one (ignored for a prepared directory)
    max_bytes: int = 20_000_000  # read at most this many bytes of text for training (0 = all)
    eval_batches: int = 8  # validation batches per evaluation (batches of train.batch_size / grad_accum sequences)
    seed: int = 0  # seed of the model's initialisation and of the order of training windows

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.eval_batches < 1:
            raise ValueError(f"max_bytes must be >= 0 and eval_batches >= 1, got {self.max_bytes}, {self.eval_batches}")


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
              reuse: bool = False):
    """(train, validation) :class:`~rnnlab.data.TokenData`: a prepared directory is opened as it is;
    text is tokenised into ``cache_dir`` (by the main process) and memory-mapped; with ``reuse``
    (a resumed run) an existing cache is kept."""
    from ..data import TokenData, prepare_corpus
    if _is_prepared(d.data):
        src = Path(d.data[0])
    else:
        src = Path(cache_dir)
        if is_main and not (reuse and (src / "meta.json").is_file()):
            prepare_corpus(d.data or None, src, tokenizer=d.tokenizer, max_bytes=d.max_bytes or None)
        barrier()
    return TokenData.open(src, "train"), TokenData.open(src, "val")


def make_sources(train_data, val_data, t: TrainConfig, seed: int, rank: int = 0, world_size: int = 1,
                 eval_batches: int = 8) -> tuple[Any, Callable[[], Iterable]]:
    """The training batch source (this rank's share of random windows) and a factory of the
    validation pass (the first ``eval_batches`` batches of consecutive windows)."""
    from ..data import RandomWindows, SequentialWindows
    train_src = RandomWindows(train_data, t.micro_batch_size, t.seq_len, seed=seed, rank=rank, world_size=world_size)
    return train_src, lambda: SequentialWindows(val_data, t.micro_batch_size, t.seq_len, max_batches=eval_batches)
