"""Mamba: selective state-space model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces").

Per channel d of the expanded stream and state index n:
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t h_t + D x_t,   out = (y * silu(z)) W_out
with x = silu(conv(W_x u)), z = W_z u, and dt, B, C computed from x (dt through a low-rank
projection and softplus). A = -exp(A_log) with the S4D-real init A_n = -(n+1).
``allow_neg_eigval=True`` uses the decay 2 exp(dt A) - 1 in (-1, 1) instead (Grazzi et al. 2024).

Parameter names and maths follow the reference (and Hugging Face ``transformers``' MambaMixer:
in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so checkpoints map one to one. rnnlab
differs in: the scan is ``rnnlab.ops.selective_scan`` (chunked, no CUDA kernel) and the conv state
is part of the layer state.

Init follows mamba_ssm (``Mamba.__init__`` and the model's ``_init_weights``): PyTorch's nn.Linear /
Conv1d defaults, Linear biases zero, except dt_proj (weight U(±R^-0.5), bias = softplus^-1 of a
log-uniform dt in [dt_min, dt_max]), A_log = log(1..N), D = 1. As there, A_log and D skip weight
decay (and the biases). The reference model's depth-scaled out_proj (/sqrt(n_layers)) is a model
choice rnnlab's layer does not make.

Dimension letters: B batch, T tokens, D model width, E = expand·D inner channels, N state size,
R dt rank, W conv width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.selective_scan import selective_scan
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import ShortConv, default_init_, inverse_softplus, log_uniform_dt
from .state import State

__all__ = ["SelectiveBlockConfig", "SelectiveBlock", "MambaConfig", "MambaState", "Mamba"]


@dataclass
class SelectiveBlockConfig(MixerConfig):
    d_state: int = 16  # N
    expand: int = 2  # E = expand · d_model
    conv_size: int = at_least(1, 4)  # W, causal depthwise conv width (always on)
    dt_rank: int | None = None  # R; None = ceil(d_model / 16)
    conv_bias: bool = True  # bias of the conv
    bias: bool = False  # biases of in_proj and out_proj
    d_inner: int = 0  # derived: E

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.d_inner = self.expand * self.d_model
        if self.d_state < 1 or self.dt_rank < 1 or self.expand < 1:
            raise ValueError(f"d_state, expand and dt_rank must be >= 1, got {self.d_state}, {self.expand}, "
                             f"{self.dt_rank}")


class SelectiveBlock(Mixer):
    """Mamba's block around a selective state space: x, z = in_proj(u); x = silu(conv(x)); the step
    size (low rank R) and the SSM's input and output vectors (N each) from x_proj(x); then
    ``y = (ssm(x) + D x) * silu(z)`` and out_proj. A subclass adds the SSM's own parameters in
    :meth:`build_ssm`, runs it in :meth:`ssm`, and has a state class of two fields (the SSM state
    (B, E, N), then the conv state). Mamba and Longhorn are this block with different SSMs."""

    no_decay_params = ("D",)

    def __init__(self, config: SelectiveBlockConfig):
        super().__init__(config)
        c = config
        E, N, R = c.d_inner, c.d_state, c.dt_rank
        self.in_proj = nn.Linear(c.d_model, 2 * E, bias=c.bias)
        self.conv1d = ShortConv(E, c.conv_size, bias=c.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.build_ssm(c)
        self.D = nn.Parameter(torch.empty(E))  # (E,) skip gain
        self.out_proj = nn.Linear(E, c.d_model, bias=c.bias)
        self.reset_parameters()

    def build_ssm(self, c: SelectiveBlockConfig) -> None:
        """Add the SSM's parameters (the step size's up-projection among them)."""
        raise NotImplementedError

    def ssm(self, x: torch.Tensor, dt: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, h: torch.Tensor,
            cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The SSM over x (B, T, E) with the low-rank step dt (B, T, R), input and output vectors
        Bm, Cm (B, T, N) from state h (B|N, E, N): (y (B, T, E), the new h), in x's dtype."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """PyTorch's nn.Linear / Conv1d defaults, Linear biases zero, D = 1 (the subclass adds its SSM's)."""
        default_init_(self, zero_linear_bias=True)
        with torch.no_grad():
            self.D.fill_(1.0)

    def init_state(self, batch_size, device=None, dtype=None):
        c, dt = self.config, dtype or torch.float32
        return self.state_cls(torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=dt),
                              self.conv1d.init_state(batch_size, device, dt))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        ssm_state, conv_state = (getattr(st, f.name) for f in fields(st))
        # 1. expand to x and z; causal conv + SiLU on x
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xs, conv = self.conv1d(xs, conv_state, cu_seqlens)
        # 2. data-dependent step size and the SSM's input and output vectors
        dt, Bm, Cm = self.x_proj(xs).split([c.dt_rank, c.d_state, c.d_state], dim=-1)  # (B, T, R), (B, T, N) x2
        # 3. the SSM, the D skip and the SiLU(z) gate
        xs = xs.to(acc)
        y, h = self.ssm(xs, dt, Bm.to(acc), Cm.to(acc), ssm_state, cu_seqlens)  # (B, T, E)
        y = (y + self.D.to(acc) * xs) * F.silu(z.to(acc))
        return self.out_proj(y.to(x.dtype)), self.state_cls(h, conv)  # (B, T, D)


@dataclass
class MambaConfig(SelectiveBlockConfig):
    dt_min: float = positive(0.001)  # softplus(dt_proj.bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = positive(0.1)  # upper end of that initial range
    dt_init_floor: float = 1e-4  # lower clamp of that initial dt
    allow_neg_eigval: bool = False  # decay 2 exp(dt A) - 1: negative eigenvalues


@dataclass(frozen=True)
class MambaState(State):
    h: torch.Tensor  # (B, E, N) SSM state
    conv: torch.Tensor  # (B, W-1, E) last inputs of the conv


class Mamba(SelectiveBlock):
    """Mamba (S6) mixer (see module docstring)."""

    config_cls = MambaConfig
    state_cls = MambaState
    no_decay_params = ("A_log", "D")

    def build_ssm(self, c: MambaConfig) -> None:
        self.dt_proj = nn.Linear(c.dt_rank, c.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(c.d_inner, c.d_state))  # (E, N) A = -exp(A_log)

    def reset_parameters(self) -> None:
        """mamba_ssm's init (see the module docstring)."""
        c = self.config
        super().reset_parameters()
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -c.dt_rank ** -0.5, c.dt_rank ** -0.5)
            self.dt_proj.bias.copy_(inverse_softplus(log_uniform_dt(c.d_inner, c.dt_min, c.dt_max, c.dt_init_floor)))
            self.A_log.copy_(torch.log(torch.arange(1, c.d_state + 1, dtype=torch.float32)).repeat(c.d_inner, 1))

    def ssm(self, x, dt, Bm, Cm, h, cu_seqlens):
        dt = F.softplus(self.dt_proj(dt).to(x.dtype))  # (B, T, E)
        A = -torch.exp(self.A_log.to(x.dtype))  # (E, N)
        return selective_scan(x, dt, A, Bm, Cm, None, None, h, allow_neg_eigval=self.config.allow_neg_eigval,
                              cu_seqlens=cu_seqlens)
