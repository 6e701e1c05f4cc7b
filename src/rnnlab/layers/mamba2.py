"""Mamba-2: state-space duality (Dao & Gu 2024, "Transformers are SSMs").

Per head (scalar A per head), with P channels per head and N state size:
    S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T     (N x P),    y_t = S_t^T C_t + D x_t
computed by ``rnnlab.ops.gated_delta_rule`` as gated linear attention with q = C, k = B,
v = dt·x, log decay dt·A and scale 1. One in_proj gives z, x, B, C and dt; a causal conv (SiLU)
runs over x, B, C; B and C are shared by the heads of each of G groups; the output is
``RMSNorm(y · silu(z))`` normalised within each group, then out_proj.

Parameter names and maths follow the reference and Hugging Face ``transformers``' Mamba2Mixer
(in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), so checkpoints map one to one. rnnlab
differs in: no fused kernels, and no ``time_step_limit`` clamp (the default limit is (0, inf)).

Two inference-time options against state collapse past the training length (Chen et al. 2024,
"Stuffed Mamba"; both add no parameter, so a trained model takes them as they are, e.g. through
:func:`rnnlab.inference.with_mixer_options`): ``state_norm_max`` scales each sequence's state
(all heads together) back to that Frobenius norm whenever an update takes it past (state
normalisation; a loop over time, :func:`rnnlab.ops.gated_delta_rule_normalised`), and
``decay_scale`` multiplies the log decay dt·A (> 1: every head forgets faster, the insertion
dt·B x unchanged). Both off by default.

Init follows mamba_ssm (``Mamba2.__init__`` and the model's ``_init_weights``): PyTorch's nn.Linear /
Conv1d defaults, Linear biases zero, softplus(dt_bias) log-uniform in [dt_min, dt_max], A ~
U(A_init_range), D = 1, norm weight 1. As there, dt_bias, A_log and D skip weight decay (and the
norm weight, biases). The reference model's depth-scaled out_proj is a model choice rnnlab's
layer does not make.

Dimension letters: B batch, T tokens, D model width, E = expand·D, H = E / P heads, P head dim,
G groups, N state size, W conv width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..ops.delta import gated_delta_rule, gated_delta_rule_normalised
from ..ops.registry import fused
from .base import Mixer, MixerConfig, at_least, check_init_range, positive, state_batch
from .common import ShortConv, default_init_, inverse_softplus, log_uniform_dt
from .state import State

__all__ = ["Mamba2Config", "Mamba2State", "Mamba2"]


@dataclass
class Mamba2Config(MixerConfig):
    d_state: int = 64  # N
    expand: int = at_least(1, 2)  # E = expand · d_model
    head_dim: int = at_least(1, 64)  # P
    n_groups: int = at_least(1, 1)  # G groups sharing B and C
    conv_size: int = at_least(1, 4)  # W, causal depthwise conv width (always on)
    conv_bias: bool = True  # bias of the conv
    bias: bool = False  # biases of in_proj and out_proj
    A_init_range: tuple[float, float] = (1.0, 16.0)  # A ~ U(range), A_log = log A
    dt_min: float = positive(0.001)  # softplus(dt_bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = positive(0.1)  # upper end of that initial range
    dt_init_floor: float = 1e-4  # lower clamp of that initial dt
    norm_eps: float = positive(1e-5)  # epsilon of the gated RMSNorm
    state_norm_max: float = at_least(0.0, 0.0)  # > 0: bound on the Frobenius norm of each sequence's state S (state normalisation); 0: off
    decay_scale: float = positive(1.0)  # the log decay dt·A is multiplied by this (> 1 forgets faster; 1: the trained decay)
    d_inner: int = 0  # derived: E
    num_heads: int = 0  # derived: H

    def __post_init__(self) -> None:
        super().__post_init__()
        check_init_range("A_init_range", self.A_init_range)
        self.d_inner = self.expand * self.d_model
        if self.d_inner % self.head_dim:
            raise ValueError(f"expand·d_model = {self.d_inner} is not divisible by head_dim={self.head_dim}")
        self.num_heads = self.d_inner // self.head_dim
        if self.num_heads % self.n_groups:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by n_groups={self.n_groups}")


@dataclass(frozen=True)
class Mamba2State(State):
    S: torch.Tensor  # (B, H, N, P) SSM state
    conv: torch.Tensor  # (B, W-1, E + 2·G·N) last inputs of the conv


class Mamba2(Mixer):
    """Mamba-2 (SSD) mixer (see module docstring)."""

    config_cls = Mamba2Config
    state_cls = Mamba2State
    no_decay_params = ("dt_bias", "A_log", "D", "norm.weight")

    def __init__(self, config: Mamba2Config):
        super().__init__(config)
        c = config
        E, H, GN = c.d_inner, c.num_heads, c.n_groups * c.d_state
        self.in_proj = nn.Linear(c.d_model, 2 * E + 2 * GN + H, bias=c.bias)
        self.conv1d = ShortConv(E + 2 * GN, c.conv_size, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))  # (H,) softplus(dt_bias) = initial step
        self.A_log = nn.Parameter(torch.empty(H))  # (H,) A = -exp(A_log)
        self.D = nn.Parameter(torch.empty(H))  # (H,) skip gain
        self.norm = nn.Module()  # the group-wise gated RMSNorm's weight (applied in _gated_norm)
        self.norm.weight = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's init (see the module docstring)."""
        c = self.config
        H = c.num_heads
        default_init_(self, zero_linear_bias=True)
        with torch.no_grad():
            self.dt_bias.copy_(inverse_softplus(log_uniform_dt(H, c.dt_min, c.dt_max, c.dt_init_floor)))
            self.A_log.copy_(torch.log(torch.empty(H).uniform_(*c.A_init_range)))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def init_state(self, batch_size, device=None, dtype=None) -> Mamba2State:
        c, dt = self.config, dtype or torch.float32
        return Mamba2State(S=torch.zeros(batch_size, c.num_heads, c.d_state, c.head_dim, device=device, dtype=dt),
                           conv=self.conv1d.init_state(batch_size, device, dt))

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y · silu(z)) within each of the G groups of channels: (B, T, E)."""
        return fused(_group_gated_norm)(y, z, self.norm.weight, self.config.norm_eps, self.config.n_groups)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        E, H, GN = c.d_inner, c.num_heads, c.n_groups * c.d_state
        # 1. one projection for z, (x, B, C) and dt; conv + SiLU over x, B, C
        z, xBC, dt = self.in_proj(x).split([E, E + 2 * GN, H], dim=-1)
        xBC, conv = self.conv1d(xBC, st.conv, cu_seqlens)
        xs, Bm, Cm = xBC.to(acc).split([E, GN, GN], dim=-1)
        xs = rearrange(xs, "b t (h p) -> b t h p", h=H)  # (B, T, H, P)
        # each group's B and C for its heads: a view for one group (the op copies it into chunks anyway)
        Bm = repeat(Bm, "b t (g n) -> b t (g r) n", g=c.n_groups, r=H // c.n_groups)  # (B, T, H, N)
        Cm = repeat(Cm, "b t (g n) -> b t (g r) n", g=c.n_groups, r=H // c.n_groups)
        # 2. dt and the per-head decay
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        log_g = dt * -torch.exp(self.A_log.to(acc)) * c.decay_scale  # (B, T, H)
        # 3. SSD as gated linear attention: q = C, k = B, v = dt·x (with a bound on the state's norm: a loop)
        if c.state_norm_max > 0:
            y, S = gated_delta_rule_normalised(Cm, Bm, xs * dt[..., None], log_g=log_g, scale=1.0,
                                               max_norm=float(c.state_norm_max), initial_state=st.S,
                                               cu_seqlens=cu_seqlens)  # (B, T, H, P)
        else:
            y, S = gated_delta_rule(Cm, Bm, xs * dt[..., None], log_g=log_g, scale=1.0, initial_state=st.S,
                                    cu_seqlens=cu_seqlens)  # (B, T, H, P)
        y = torch.addcmul(y, self.D.to(acc)[:, None], xs)  # (B, T, H, P): y + D x
        # 4. gated RMSNorm and the output projection
        y = self._gated_norm(rearrange(y, "b t h p -> b t (h p)"), z.to(acc))
        return self.out_proj(y.to(x.dtype)), Mamba2State(S=S, conv=conv)


def _group_gated_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, G: int) -> torch.Tensor:
    """RMSNorm(y · silu(z)) within each of G groups of channels, scaled by weight: (B, T, E)."""
    y = y * F.silu(z)
    w = weight.to(y.dtype)
    if G == 1:
        return F.rms_norm(y, (y.shape[-1],), w, eps)
    yg = F.rms_norm(rearrange(y, "b t (g e) -> b t g e", g=G), (y.shape[-1] // G,), eps=eps)
    return rearrange(yg, "b t g e -> b t (g e)") * w
