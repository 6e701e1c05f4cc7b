"""Longhorn: state-space models as amortised online learners (Liu et al. 2024, "Longhorn: State
Space Models are Amortized Online Learners").

Per channel e of the expanded stream and state index n (the recurrence in ``rnnlab.ops.longhorn``):
    eps_t = beta_t / (1 + beta_t ||k_t||²),   S_t = (1 - eps_t k_t²) ∘ S_{t-1} + (eps_t x_t) k_t^T,
    y_t = S_t q_t + D x_t,   out = (y * silu(z)) W_out,
i.e. one step of online regression from k_t to x_t with a diagonal approximation of its closed form.
The block is Mamba's (:class:`rnnlab.layers.mamba.SelectiveBlock`) with the SSM replaced: x =
silu(conv(W_x u)), z = W_z u; dt (low rank), k and q come from x through x_proj; beta =
sigmoid(dt_head(dt)). There is no A and no forget gate: the
key's magnitude sets how much is forgotten.

As in the reference code: x_proj is split (dt, k, q), dt_head has a bias (zeroed by the model's
init, so beta starts near 1/2), D starts at ones. rnnlab differs in: the scan is the chunked
``rnnlab.ops.longhorn`` (no CUDA kernel) and the conv state is part of the layer state.

Init follows the reference (Cranial-XIX/Longhorn ``models/longhorn.py``, mamba_ssm's scheme):
PyTorch's nn.Linear / Conv1d defaults, every Linear bias zero (dt_head's too), D = 1; D skips
weight decay as there. Its depth-scaled out_proj is a model choice rnnlab's layer does not make.

Dimension letters: B batch, T tokens, D model width, E = expand·D inner channels, N state size,
R dt rank, W conv width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.longhorn import longhorn
from .mamba import SelectiveBlock, SelectiveBlockConfig
from .state import State

__all__ = ["LonghornConfig", "LonghornState", "Longhorn"]


@dataclass
class LonghornConfig(SelectiveBlockConfig):
    """Mamba's block fields (:class:`rnnlab.layers.mamba.SelectiveBlockConfig`); N is the size of the
    key and query, the state is E x N."""


@dataclass(frozen=True)
class LonghornState(State):
    S: torch.Tensor  # (B, E, N) online-learner state
    conv: torch.Tensor  # (B, W-1, E) last inputs of the conv


class Longhorn(SelectiveBlock):
    """Longhorn mixer (see module docstring): Mamba's block with the online learner as its SSM."""

    config_cls = LonghornConfig
    state_cls = LonghornState

    def build_ssm(self, c: LonghornConfig) -> None:
        self.dt_head = nn.Linear(c.dt_rank, c.d_inner, bias=True)

    def ssm(self, x, dt, k, q, S, cu_seqlens):
        beta = torch.sigmoid(self.dt_head(dt).to(x.dtype))  # (B, T, E) step size of the online update
        return longhorn(q, k, x, beta, S, cu_seqlens=cu_seqlens)  # the closed-form online update
