"""Longhorn: state-space models as amortised online learners (Liu et al. 2024, "Longhorn: State
Space Models are Amortized Online Learners").

Per channel e of the expanded stream and state index n (the recurrence in ``rnnlab.ops.longhorn``):
    eps_t = beta_t / (1 + beta_t ||k_t||²),   S_t = (1 - eps_t k_t²) ∘ S_{t-1} + (eps_t x_t) k_t^T,
    y_t = S_t q_t + D x_t,   out = (y * silu(z)) W_out,
i.e. one step of online regression from k_t to x_t with a diagonal approximation of its closed form.
The block is Mamba's with the SSM replaced: x = silu(conv(W_x u)), z = W_z u; dt (low rank), k and
q come from x through x_proj; beta = sigmoid(dt_head(dt)). There is no A and no forget gate: the
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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.longhorn import longhorn
from .base import Mixer, MixerConfig, state_batch
from .common import ShortConv, default_init_
from .state import State

__all__ = ["LonghornConfig", "LonghornState", "Longhorn"]


@dataclass
class LonghornConfig(MixerConfig):
    d_state: int = 16  # N: size of the key/query (the state is E x N)
    expand: int = 2  # E = expand · d_model
    conv_size: int = 4  # W, causal depthwise conv width
    dt_rank: int | None = None  # R; None = ceil(d_model / 16)
    conv_bias: bool = True  # bias of the conv
    bias: bool = False  # biases of in_proj and out_proj
    d_inner: int = 0  # derived: E

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.d_inner = self.expand * self.d_model
        if self.d_state < 1 or self.conv_size < 1 or self.dt_rank < 1 or self.expand < 1:
            raise ValueError(f"d_state, expand, conv_size and dt_rank must be >= 1, got {self.d_state}, "
                             f"{self.expand}, {self.conv_size}, {self.dt_rank}")


@dataclass(frozen=True)
class LonghornState(State):
    S: torch.Tensor  # (B, E, N) online-learner state
    conv: torch.Tensor  # (B, W-1, E) last inputs of the conv


class Longhorn(Mixer):
    """Longhorn mixer (see module docstring)."""

    config_cls = LonghornConfig
    state_cls = LonghornState
    no_decay_params = ("D",)

    def __init__(self, config: LonghornConfig):
        super().__init__(config)
        c = config
        E, N, R = c.d_inner, c.d_state, c.dt_rank
        self.in_proj = nn.Linear(c.d_model, 2 * E, bias=c.bias)
        self.conv1d = ShortConv(E, c.conv_size, bias=c.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_head = nn.Linear(R, E, bias=True)
        self.D = nn.Parameter(torch.empty(E))  # (E,) skip gain
        self.out_proj = nn.Linear(E, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: PyTorch defaults, Linear biases zero, D = 1."""
        default_init_(self, zero_linear_bias=True)
        with torch.no_grad():
            self.D.fill_(1.0)

    def init_state(self, batch_size, device=None, dtype=None) -> LonghornState:
        c, dt = self.config, dtype or torch.float32
        return LonghornState(S=torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=dt),
                             conv=self.conv1d.init_state(batch_size, device, dt))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. expand to x and z; causal conv + SiLU on x
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xs, conv = self.conv1d(xs, st.conv, cu_seqlens)
        # 2. data-dependent step size beta and the key/query of the online learner
        dt, k, q = self.x_proj(xs).split([c.dt_rank, c.d_state, c.d_state], dim=-1)  # (B, T, R), (B, T, N) x2
        beta = torch.sigmoid(self.dt_head(dt).to(acc))  # (B, T, E)
        # 3. the closed-form online update, D skip and the SiLU(z) gate
        y, S = longhorn(q.to(acc), k.to(acc), xs.to(acc), beta, st.S, cu_seqlens=cu_seqlens)  # (B, T, E)
        y = (y + self.D.to(acc) * xs.to(acc)) * F.silu(z.to(acc))
        return self.out_proj(y.to(x.dtype)), LonghornState(S=S, conv=conv)  # (B, T, D)
