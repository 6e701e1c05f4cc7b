"""Mixer options set at inference time on a trained model: the training-free mitigations of state
collapse (Chen et al. 2024, "Stuffed Mamba").

A recurrent model trained at one length may fail past it because its state "collapses": some heads
never forget, and their state keeps growing past anything seen in training. The mitigations are
mixer options that add no parameter, so a trained model takes them without retraining; Mamba-2 has
two (``layers/mamba2.py``): ``state_norm_max`` (state normalisation: bound the state's norm) and
``decay_scale`` (forget faster: scale the log decay). :func:`with_mixer_options` returns a model
that reads the same weight tensors (no copy) with the given options on the given blocks; its
config names them in its layout, so a state saved from it is tied to them.
"""
from __future__ import annotations

from typing import Any

import torch

from ..models.lm import LM, LMConfig

__all__ = ["with_mixer_options"]


def with_mixer_options(model: LM, options: dict[int, dict[str, Any]]) -> LM:
    """``model`` with ``options[i]`` (config options of block i's mixer, e.g. ``{0:
    {"decay_scale": 2.0}}``) added to its blocks' options, for inference: the same weight tensors
    (no copy; gradients do not reach ``model``). An option the mixer does not have, a value its
    config refuses or a block index out of range raises an error naming it."""
    if not isinstance(model, LM):
        raise TypeError(f"model must be an rnnlab LM, got {type(model).__name__}")
    blocks = model.config.blocks
    bad = [i for i in options if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"options: block indices must be ints in [0, {len(blocks)}), got {bad}")
    items = []
    for i, spec in enumerate(blocks):
        if options.get(i) and spec.name == "mlp":
            raise ValueError(f"options: block {i} is an MLP block, it has no mixer to take {options[i]}")
        opts = {**dict(spec.options), **options.get(i, {})}
        args = ",".join(f"{k}={v!r}" for k, v in sorted(opts.items()))
        items.append(f"{spec.name}({args})" if args else spec.name)
    config = LMConfig(**{**model.config.to_dict(), "layout": ",".join(items)})
    with torch.device("meta"):
        view = LM(config)
    view.load_state_dict(model.state_dict(), assign=True)  # the same tensors: nothing is copied
    return view.train(model.training)
