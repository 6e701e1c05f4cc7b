"""sLSTM: the scalar-memory LSTM of xLSTM, with exponential gating and a stabiliser state.

Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer, Brandstetter, Hochreiter 2024,
"xLSTM: Extended Long Short-Term Memory", Sec. 2.2. Per head, with pre-activations
``x~ = W x_t + R h_{t-1} + b`` for the gates x in {z, i, f, o} (R block-diagonal: one K x K block
per head and gate):

    m_t = max(log σ(f~_t) + m_{t-1}, i~_t)           stabiliser
    i_t = exp(i~_t - m_t),  f_t = exp(log σ(f~_t) + m_{t-1} - m_t)
    c_t = f_t c_{t-1} + i_t tanh(z~_t),  n_t = f_t n_{t-1} + i_t,  h_t = σ(o~_t) c_t / n_t

The layer follows the reference sLSTM layer (NX-AI/xlstm, ``sLSTMLayer``): a causal depthwise
convolution (width 4, bias) with SiLU feeds the i and f gates, z and o see x directly; the input
weights W are head-wise (block-diagonal, no bias; "small init" N(0, 2/(5D)), D = d_model as in
``sLSTMLayer.reset_parameters``); R starts at zero; the
forget-gate bias starts with the "powerlaw_blockdependent" profile; the output is a per-head
LayerNorm (GroupNorm with weight 1 + w, no bias). Before the first token (n = 0) m_t = i~_t, the
reference's first step, taken per element. Being nonlinear in h, the recurrence runs either
sequentially on [h, c, n, m] (the equations above), or by Newton iterations (``parallel=True``,
ops family D: DEER / ParaRNN). Newton on [h, c, n, m] diverges or stalls (the max and the exp
gates make the linearisation poor far from the solution), so the Newton form iterates on the
equivalent smooth state [h, c/n, log n] and recovers the last step's stabilised (c, n, m) in
closed form; both forms give the same outputs and states.

Weight decay as in xLSTM (``'weight' in name and 'norm' not in name``): W is decayed; the
recurrent kernel R, the gate biases and the norm weight are not.

rnnlab differs from the reference in: the forget-bias profile is the one of the first block (the
layer does not know its depth); the reference's sLSTM block (pre-norm, gated MLP of factor 4/3)
is the LM block here; no fused CUDA kernel; the first-step rule applies per element (the
reference checks ``all(n == 0)`` over the whole batch); the recurrence runs in float32 even under
bf16 autocast.

Dimension letters: B batch, T tokens, D model width, H heads, K = D / H head dim, W conv width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops import rnn_newton, rnn_sequential
from ..ops.newton import check_newton_block
from .base import Mixer, MixerConfig, positive, state_batch
from .common import ShortConv
from .state import State

__all__ = ["SLSTMConfig", "SLSTMState", "SLSTM", "slstm_cell", "slstm_cell_normalised"]


def slstm_cell(s: torch.Tensor, u: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """One sLSTM step for any leading dims: s = [h, c, n, m] (..., H, 4K), u = W x + b (..., H, 4, K)
    in gate order i, f, z, o; R (H, K, 4, K). Returns the new [h, c, n, m]."""
    K = R.shape[1]
    h, c, n, m = s.split(K, dim=-1)
    i_raw, f_raw, z_raw, o_raw = (u + torch.einsum("...hk,hkgj->...hgj", h, R)).unbind(-2)
    log_f = F.logsigmoid(f_raw)
    # 1. stabiliser; before the first token (n = 0) it is i~ (the reference's first step)
    m_new = torch.where(n == 0, i_raw, torch.maximum(log_f + m, i_raw))
    # 2. stabilised gates (the clamp only matters in the first step, where f multiplies zeros)
    i = torch.exp(i_raw - m_new)
    f = torch.exp(torch.clamp(log_f + m - m_new, max=0.0))
    # 3. cell, normaliser, hidden
    c = f * c + i * torch.tanh(z_raw)
    n = f * n + i
    h = torch.sigmoid(o_raw) * c / n
    return torch.cat([h, c, n, m_new], dim=-1)


def slstm_cell_normalised(s: torch.Tensor, u: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The same step on the equivalent state [h, r, l] = [h, c/n, log n] (..., H, 3K), which is
    smooth (no max) and bounded: ``l_t = logaddexp(log σ(f~) + l_{t-1}, i~)``, with
    ``w = exp(log σ(f~) + l_{t-1} - l_t)`` the weight of the past, ``r_t = w r_{t-1} + (1 - w) tanh(z~)``,
    ``h_t = σ(o~) r_t``. The Newton form iterates on this state (it converges where the max-stabilised
    state makes Newton diverge)."""
    K = R.shape[1]
    h, r, log_n = s.split(K, dim=-1)
    i_raw, f_raw, z_raw, o_raw = (u + torch.einsum("...hk,hkgj->...hgj", h, R)).unbind(-2)
    past = F.logsigmoid(f_raw) + log_n
    log_n = torch.logaddexp(past, i_raw)
    w = torch.exp(past - log_n)
    r = w * r + (1 - w) * torch.tanh(z_raw)
    return torch.cat([torch.sigmoid(o_raw) * r, r, log_n], dim=-1)


@dataclass
class SLSTMConfig(MixerConfig):
    num_heads: int = 4  # heads H (block-diagonal R and W); the reference's default
    conv_size: int = 4  # width of the causal conv feeding the i and f gates (0 = none)
    parallel: bool = False  # Newton-parallel form (DEER / ParaRNN) instead of the sequential loop
    norm_eps: float = positive(1e-5)  # epsilon of the per-head output LayerNorm
    head_dim: int = 0  # derived: K = d_model // num_heads

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads!r} must be a positive divisor of d_model={self.d_model}")
        if not isinstance(self.conv_size, int) or self.conv_size < 0:
            raise ValueError(f"conv_size must be an int >= 0 (0 = no convolution), got {self.conv_size!r}")
        self.head_dim = self.d_model // self.num_heads
        if self.head_dim < 2:
            raise ValueError(f"num_heads={self.num_heads} leaves head_dim=1: the per-head LayerNorm of a single "
                             "unit is always 0; use num_heads <= d_model // 2")
        if self.parallel:
            check_newton_block(3 * self.head_dim, self.d_model, self.num_heads)  # Newton iterates on [h, c/n, log n]


@dataclass(frozen=True)
class SLSTMState(State):
    h: torch.Tensor  # (B, H, K) hidden state
    c: torch.Tensor  # (B, H, K) cell state (scaled by exp(-m))
    n: torch.Tensor  # (B, H, K) normaliser state (scaled by exp(-m))
    m: torch.Tensor  # (B, H, K) stabiliser
    conv: torch.Tensor  # (B, W-1, D) last inputs of the i/f-gate convolution


def _forget_bias(K: int) -> torch.Tensor:
    """The reference's "powerlaw_blockdependent" forget-gate bias of the first block: 5 ... -7."""
    ramp = torch.arange(K, dtype=torch.float32) / max(K - 1, 1)
    return -(-5.0 + 12.0 * ramp ** 0.3)


class SLSTM(Mixer):
    """sLSTM layer (see module docstring)."""

    config_cls = SLSTMConfig
    state_cls = SLSTMState
    recurrent = True
    no_decay_params = ("R", "bias", "norm_weight")

    def __init__(self, config: SLSTMConfig):
        super().__init__(config)
        c = config
        H, K = c.num_heads, c.head_dim
        self.conv = ShortConv(c.d_model, c.conv_size, bias=True) if c.conv_size else None
        self.W = nn.Parameter(torch.empty(4, H, K, K))  # (gate, head, in, out) head-wise input weights
        self.R = nn.Parameter(torch.empty(H, K, 4, K))  # (head, in, gate, out), block-diagonal R
        self.bias = nn.Parameter(torch.empty(H, 4, K))  # (H, 4, K) gate biases, order i, f, z, o
        self.norm_weight = nn.Parameter(torch.empty(c.d_model))  # per-head LayerNorm weight is 1 + this
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xLSTM's sLSTM init: W small init N(0, 2/(5D)), R = 0, the "powerlaw_blockdependent"
        forget bias of the first block (other gate biases 0), norm weight 1 + 0, conv default."""
        c = self.config
        if self.conv is not None:
            self.conv.reset_parameters()
        with torch.no_grad():
            nn.init.normal_(self.W, 0.0, math.sqrt(2 / (5 * c.d_model)))
            nn.init.zeros_(self.R)
            nn.init.zeros_(self.bias)
            self.bias[:, 1] = _forget_bias(c.head_dim)
            nn.init.zeros_(self.norm_weight)

    def init_state(self, batch_size, device=None, dtype=None):
        c, dt = self.config, dtype or torch.float32
        z = lambda: torch.zeros(batch_size, c.num_heads, c.head_dim, device=device, dtype=dt)  # noqa: E731
        conv = torch.zeros(batch_size, max(c.conv_size - 1, 0), c.d_model, device=device, dtype=dt)
        return SLSTMState(h=z(), c=z(), n=z(), m=z(), conv=conv)

    def cell(self, s, u):
        return slstm_cell(s, u, self.R.to(u.dtype))

    def cell_normalised(self, s, u):
        return slstm_cell_normalised(s, u, self.R.to(u.dtype))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        if state is None:
            state = self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. the causal conv (+ SiLU) feeds the i and f gates; z and o see x itself
        if self.conv is not None:
            xc, conv = self.conv(x, state.conv, cu_seqlens)  # (B, T, D)
        else:
            xc, conv = x, state.conv
        xh = rearrange(x, "b t (h k) -> b t h k", h=c.num_heads).to(acc)  # (B, T, H, K)
        xch = rearrange(xc, "b t (h k) -> b t h k", h=c.num_heads).to(acc)
        inputs = torch.stack([xch, xch, xh, xh], dim=-2)  # (B, T, H, 4, K): what each gate sees
        u = torch.einsum("bthgk,ghkj->bthgj", inputs, self.W.to(acc)) + self.bias.to(acc)  # (B, T, H, 4, K)
        # 2. the recurrence per head: sequential on [h, c, n, m], or Newton on [h, c/n, log n]
        h0, c0, n0, m0 = (t.to(acc) for t in (state.h, state.c, state.n, state.m))
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in float32 (or float64)
            if c.parallel:
                s, (h1, c1, n1, m1) = self._newton(u, h0, c0, n0, m0, cu_seqlens)  # (B, T, H, 3K)
            else:
                s, s_last = rnn_sequential(self.cell, u, torch.cat([h0, c0, n0, m0], dim=-1),
                                           cu_seqlens=cu_seqlens)  # (B, T, H, 4K), (B, H, 4K)
                h1, c1, n1, m1 = (t.clone() for t in s_last.split(c.head_dim, dim=-1))
        h = s[..., : c.head_dim]  # (B, T, H, K)
        # 3. per-head LayerNorm of h (GroupNorm with one group per head)
        y = F.layer_norm(h, (c.head_dim,), eps=c.norm_eps)
        y = rearrange(y, "b t h k -> b t (h k)") * (1 + self.norm_weight.to(acc))  # (B, T, D)
        return y.to(x.dtype), SLSTMState(h=h1, c=c1, n=n1, m=m1, conv=conv)

    def _newton(self, u, h0, c0, n0, m0, cu_seqlens=None):
        """Newton-parallel form: iterate on [h, c/n, log n], then recover each sequence's last
        stabilised (h, c, n, m) (:meth:`_last_step`). With ``cu_seqlens`` the initial states
        have one row per sequence."""
        seen = n0 > 0
        ones = torch.ones_like(n0)
        r0 = torch.where(seen, c0 / torch.where(seen, n0, ones), torch.zeros_like(c0))
        # n = 0 (log n = -inf) as a finite sentinel: exp(sentinel - x) is exactly 0
        log_n0 = torch.where(seen, m0 + torch.log(torch.where(seen, n0, ones)), torch.full_like(n0, -1e30))
        s = rnn_newton(self.cell_normalised, u, torch.cat([h0, r0, log_n0], dim=-1),
                       cu_seqlens=cu_seqlens)[0]  # (B, T, H, 3K)
        cu = None if cu_seqlens is None else cu_seqlens.tolist()
        spans = [(0, u.shape[1], slice(None))] if cu is None else [
            (a, b, slice(n, n + 1)) for n, (a, b) in enumerate(zip(cu, cu[1:]))]
        finals = [self._last_step(u[:, a:b], s[:, a:b], h0[r], c0[r], n0[r], m0[r]) for a, b, r in spans]
        return s, tuple(torch.cat(parts, dim=0) for parts in zip(*finals))

    def _last_step(self, u, s, h0, c0, n0, m0):
        """The stabilised (h, c, n, m) after the tokens of u (B, L, H, 4, K) with Newton's
        trajectory s (B, L, H, 3K) from (h0, c0, n0, m0) (B, H, K) each: unrolled,
        ``m_L = max_j (i~_j + sum_{l>j} log σ(f~_l))`` (and ``m_0 + sum_l log σ(f~_l)`` once a
        token has been seen), ``n_L = exp(log n_L - m_L)``, ``c_L = (c/n)_L n_L``."""
        if s.shape[1] == 0:  # an empty sequence keeps its initial state
            return h0, c0, n0, m0
        K = self.config.head_dim
        h_prev = torch.cat([h0[:, None], s[:, :-1, :, :K]], dim=1)  # (B, L, H, K)
        gates = u[..., :2, :] + torch.einsum("bthk,hkgj->bthgj", h_prev, self.R[:, :, :2].to(u.dtype))
        i_raw, log_f = gates[..., 0, :], F.logsigmoid(gates[..., 1, :])  # (B, L, H, K)
        from_j = log_f.flip(1).cumsum(1).flip(1)  # sum_{l >= j} log f_l
        m1 = (i_raw + from_j - log_f).amax(dim=1)  # (B, H, K)
        m1 = torch.where(n0 > 0, torch.maximum(m1, m0 + from_j[:, 0]), m1)
        n1 = torch.exp(s[:, -1, :, 2 * K:] - m1)
        return s[:, -1, :, :K], s[:, -1, :, K:2 * K] * n1, n1, m1
