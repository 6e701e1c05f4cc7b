"""Synthetic benchmarks: seeded, vectorised task generators and their scoring.

Every task has a frozen dataclass config (with ``seq_len`` and ``vocab_size``) and a generator
``task(config, n, generator) -> (inputs, targets)``, both (n, T) int64, targets -100 where nothing
is scored; :func:`generate` calls the right one for any config. Families:

* recall (``recall.py``): :func:`mqar` (Zoology's multi-query associative recall);
* state tracking (``tracking.py``): :func:`state_tracking` (parity, mod 3 / mod 5 sums, S3 / S5
  products);
* length extrapolation (``extrapolation.py``): :func:`passkey`, :func:`after_filler` (a passkey of the
  training length after filler) and :func:`state_norms` (the norm of each layer's state against position);
* order and prompting (``order.py``): :func:`set_disjointness` (short or long set first, read
  once or twice);
* the Mamba paper's synthetic tasks (``copying.py``): :func:`selective_copy`, :func:`induction_heads`.

:class:`TaskBatches` feeds a task to :func:`rnnlab.train.train`; :func:`evaluate_task` scores a
model (accuracy over scored positions, exact match per example). ``rnnlab bench tasks`` sweeps
mixers, widths and learning rates over them (:mod:`rnnlab.bench.tasks`).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from .common import IGNORE, check_int, derive_seed
from .copying import InductionConfig, SelectiveCopyConfig, induction_heads, selective_copy
from .extrapolation import PasskeyConfig, after_filler, passkey, state_norm, state_norms
from .order import SetDisjointnessConfig, set_disjointness
from .recall import MQARConfig, mqar
from .scoring import accuracy, evaluate_task, exact_match, predict
from .tracking import StateTrackingConfig, state_tracking

__all__ = ["IGNORE", "TaskConfig", "GENERATORS", "generate", "TaskBatches", "MQARConfig", "mqar",
           "StateTrackingConfig", "state_tracking", "PasskeyConfig", "passkey", "after_filler", "state_norm", "state_norms",
           "SetDisjointnessConfig",
           "set_disjointness", "SelectiveCopyConfig", "selective_copy", "InductionConfig", "induction_heads",
           "predict", "accuracy", "exact_match", "evaluate_task"]

TaskConfig = Union[MQARConfig, StateTrackingConfig, PasskeyConfig, SetDisjointnessConfig, SelectiveCopyConfig,
                   InductionConfig]

GENERATORS: dict[type, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    MQARConfig: mqar,
    StateTrackingConfig: state_tracking,
    PasskeyConfig: passkey,
    SetDisjointnessConfig: set_disjointness,
    SelectiveCopyConfig: selective_copy,
    InductionConfig: induction_heads,
}


def generate(config: TaskConfig, n: int, generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of the task ``config`` describes: ``(inputs, targets)``, (n, T) int64."""
    if type(config) not in GENERATORS:
        raise ValueError(f"config must be one of {', '.join(t.__name__ for t in GENERATORS)}, "
                         f"got {type(config).__name__}")
    return GENERATORS[type(config)](config, n, generator)


class TaskBatches:
    """An endless, resumable stream of training batches of one task for :func:`rnnlab.train.train`.

    Batch i is ``generate(config, batch_size, derive_seed(seed, "train", i))``: (batch_size, T)
    int64 inputs and targets, the same for the same seed whatever happened before, so a resumed
    run (``state_dict`` holds i) sees what an uninterrupted one would.
    """

    def __init__(self, config: TaskConfig, batch_size: int, seed: int = 0):
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        self.config, self.batch_size, self.seed = config, batch_size, seed
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = generate(self.config, self.batch_size, derive_seed(self.seed, "train", self.index))
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        """The position in the stream: ``{"index": batches handed out so far}``."""
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.index = int(state["index"])
