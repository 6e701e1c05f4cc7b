"""FLOP accounting of layers and models, and the machine's matrix-multiply peak: one source for
the trainer's model FLOPs utilisation (MFU) and for the floors of ``rnnlab bench speed``.

FLOPs count 2 per multiply-add. **A layer's floor** (:func:`layer_flops`, forward):
``2 · params · B·T`` (every parameter used once per token: projections, short convolutions,
recurrent matrices) plus the mixing FLOPs — softmax attention ``4 · B · H · K · P`` over the P
(query, key) pairs under the causal mask (window and sinks included); a recurrent mixer
``c · B · T · n`` over the n floats of its state, c = 4 per element per token (decay-and-write,
read), 6 for the delta rule, ``2N + 2`` for LSSL's dense transition. **A model's training FLOPs per
token** (:func:`model_flops_per_token`): 3x the forward (backward = 2x forward) of every mixer's
floor plus the MLPs and the output head (2 per parameter; the embedding lookup is free). MFU is
achieved FLOP/s over :func:`matmul_peak`.
"""
from __future__ import annotations

import functools
import time

import torch
from torch import nn

__all__ = ["attention_pairs", "layer_flops", "model_flops_per_token", "matmul_peak", "sync"]


# FLOPs per state element per token (recurrent mixers) where the default 4 does not fit
_STATE_FLOPS = {"deltanet": 6, "gated_deltanet": 6}


def attention_pairs(T: int, window: int | None = None, sinks: int = 0) -> int:
    """(query, key) pairs a causal attention over T tokens scores: ``sum_t min(t+1, window+sinks)``
    (all ``T(T+1)/2`` without a window)."""
    if window is None:
        return T * (T + 1) // 2
    span = window + sinks
    full = min(T, span)  # queries t < span see t+1 keys, the rest see span keys
    return full * (full + 1) // 2 + (T - full) * span


def _unique_params(module: nn.Module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def layer_flops(layer: nn.Module, name: str, B: int, T: int) -> dict[str, float]:
    """The forward floor of mixer ``layer`` (registry name ``name``) on a (B, T, D) input:
    ``{"proj": ..., "mix": ..., "total": ...}`` in FLOPs (see the module docstring)."""
    proj = 2.0 * _unique_params(layer) * B * T
    c = layer.config
    if not getattr(layer, "recurrent", True):  # softmax attention (full, window, sinks)
        mix = 4.0 * B * c.num_heads * c.head_dim * attention_pairs(T, c.window, c.sinks or 0)
    else:
        floats = layer.state_size(1, torch.float32) / 4
        per = _STATE_FLOPS.get(name, 2 * c.d_state + 2 if name == "lssl" else 4)
        mix = float(per) * B * T * floats
    return {"proj": proj, "mix": mix, "total": proj + mix}


def model_flops_per_token(model: nn.Module, seq_len: int, training: bool = True) -> float:
    """FLOPs per token of ``model`` (an :class:`rnnlab.LM`) on sequences of ``seq_len`` tokens:
    forward+backward when ``training`` (3x the forward)."""
    from .models.lm import LM
    if not isinstance(model, LM):
        raise TypeError(f"model must be an rnnlab LM, got {type(model).__name__}")
    fwd = 0.0
    for block in model.blocks:
        if block.mixer is not None:
            fwd += layer_flops(block.mixer, block.name, 1, seq_len)["total"] / seq_len
        if block.mlp is not None:
            fwd += 2.0 * _unique_params(block.mlp)
    fwd += 2.0 * model.lm_head.weight.numel()
    return 3 * fwd if training else fwd


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, sizes=(1024, 2048),
                repeats: int = 5) -> float:
    """The machine's matrix-multiply peak in FLOP/s: the best over ``sizes`` (square ``torch.mm``
    of n x n matrices in ``dtype``, 2 n^3 FLOPs) and ``repeats`` calls, after a warm-up call.
    Measured once per process for each set of arguments."""
    device = torch.device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best
