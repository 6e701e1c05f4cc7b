"""Benchmark commands (``rnnlab bench ops | hf | rnn | mixers | speed``): each prints a table, then one JSON line."""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["report"]


def report(bench: str, rows: list[dict], json_path: str | None, **extra) -> None:
    """End a benchmark: write ``rows`` to ``json_path`` (atomically) if given, and print the final
    JSON line ``{"bench": ..., "threads": ..., **extra, "results": rows}``."""
    from ..models.lm import atomic_write
    if json_path:
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    print(json.dumps({"bench": bench, "threads": torch.get_num_threads(), **extra, "results": rows}))
