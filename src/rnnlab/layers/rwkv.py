"""RWKV-6 "Finch" and RWKV-7 "Goose": the RWKV time-mix as a token mixer.

* RWKV-6 — Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
  Recurrence": ``S_t = Diag(w_t) S_{t-1} + k_t v_t^T``, ``o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t``
  (op :mod:`rnnlab.ops.rwkv6`): the decay ``w_t = exp(-exp(LoRA(x)))`` is data-dependent per key
  channel; every projection reads its own data-dependent mix of x_t and x_{t-1} (the low-rank
  "ddlerp" token shift); u is a learned bonus for the current token; per-head GroupNorm, SiLU gate.
* RWKV-7 — Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution":
  ``S_t = (Diag(w_t) - (a_t * kappa_t) kappa_t^T) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T r_t`` (op
  :mod:`rnnlab.ops.dplr`; the paper writes the (V x K) transpose ``S_{t-1} (diag(w_t) -
  kappa^T (a * kappa)) + v^T k``): the generalised delta rule with a vector decay
  ``w_t = exp(-e^-0.5 sigmoid(LoRA(x)))``, a unit removal key ``kappa = normalize(k * k_k)``, an
  in-context learning rate ``a_t = sigmoid(LoRA(x))`` and the key ``k * (1 + (a - 1) k_a)``; static
  token-shift mixes; output ``(GroupNorm(o) + (r . (r_k * k)) v) * LoRA_g(x)``.

Only the time-mix is the mixer: RWKV's channel-mix is the model's MLP (the block's second half).
Both follow flash-linear-attention's layers (``RWKV6Attention``, ``RWKV7Attention``) with their
defaults, scale 1 on the read. A GoldFinch-style hybrid (RWKV layers with a few attention layers)
is a layout: ``"rwkv6*3,attention"``.

rnnlab differs from the references in:
* RWKV-7's value residual (``v = lerp(v, v_first, ...)`` with the first layer's values) is left
  out: it passes a tensor between layers, outside the mixer contract ``y, state = mixer(x, state)``.
* RWKV-7's depth-dependent init takes ``depth`` = i / L (block i of L, set by a model): the
  reference's ``1 - i / L`` is exact, its ``i / (L - 1)`` becomes ``i / L``, and the GroupNorm
  weight starts at 1 (the reference: ((i + 1) / L)^0.7). A lone layer has depth 0 (the first layer).
* RWKV-6 keeps fla's layer init (xavier-uniform, gain 2^-2.5, on the projections; zero mixes,
  bonus and biases; the LoRAs' first matrix zero, the second orthogonal with gain 0.1), not
  RWKV-LM's depth-dependent one.
Weight decay skips the token-shift mixes, the bonus and the per-channel key and bonus scales (with
the biases and norms); every Linear weight, the LoRAs' included, is decayed as in fla (RWKV-LM
leaves its LoRA matrices out of weight decay).

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim, R LoRA rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.bounds import PrefixLayout
from ..ops.dplr import dplr
from ..ops.rwkv6 import rwkv6
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import reset_norms_, xavier_linears_
from .state import State

__all__ = ["RWKV6Config", "RWKV7Config", "RWKVState", "RWKV6", "RWKV7", "token_shift"]

LOG_W_FLOOR = math.exp(-0.5)  # RWKV-7: log w = -e^-0.5 sigmoid(.), so w in (0.545, 1)


@dataclass
class RWKV6Config(MixerConfig):
    num_heads: int = 4  # H
    expand_k: float = positive(0.5)  # H·K = expand_k · d_model
    expand_v: float = positive(1.0)  # H·V = expand_v · d_model
    proj_low_rank_dim: int = 32  # R of the ddlerp token-shift LoRA (one per branch r, w, k, v, g)
    gate_low_rank_dim: int = at_least(1, 64)  # R of the decay LoRA
    norm_eps: float = positive(1e-5)  # epsilon of the per-head GroupNorm
    key_dim: int = 0  # derived: H·K
    value_dim: int = 0  # derived: H·V

    def __post_init__(self) -> None:
        super().__post_init__()
        self.key_dim, self.value_dim = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
        if self.num_heads < 1 or self.key_dim % self.num_heads or self.value_dim % self.num_heads or not self.key_dim:
            raise ValueError(f"expand_k·d_model={self.key_dim} and expand_v·d_model={self.value_dim} must be "
                             f"positive multiples of num_heads={self.num_heads}")
        if self.proj_low_rank_dim < 1 or self.gate_low_rank_dim < 1:
            raise ValueError(f"proj_low_rank_dim={self.proj_low_rank_dim} and gate_low_rank_dim="
                             f"{self.gate_low_rank_dim} must be >= 1")


@dataclass
class RWKV7Config(MixerConfig):
    head_dim: int = 64  # K = V; H = d_model // head_dim
    decay_low_rank_dim: int | None = None  # R of the decay LoRA; None: fla's rule from d_model and head_dim
    a_low_rank_dim: int | None = None  # R of the in-context learning rate LoRA; None: as decay_low_rank_dim
    gate_low_rank_dim: int | None = at_least(1, None)  # R of the output gate LoRA; None: fla's rule from d_model
    norm_eps: float = positive(1e-5)  # GroupNorm epsilon per element (times head_dim, as in the reference)
    depth: float = 0.0  # i / L for block i of L (a model sets it): shapes the init only
    num_heads: int = 0  # derived: H

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim < 1 or self.d_model % self.head_dim:
            raise ValueError(f"d_model={self.d_model} must be a multiple of head_dim={self.head_dim}")
        self.num_heads = self.d_model // self.head_dim
        rank = lambda c: max(32, int(round(c * self.d_model ** 0.5 * self.head_dim / 64 / 32) * 32))  # noqa: E731
        self.decay_low_rank_dim = self.decay_low_rank_dim or rank(2.5)
        self.a_low_rank_dim = self.a_low_rank_dim or rank(2.5)
        self.gate_low_rank_dim = self.gate_low_rank_dim or max(32, int(round(5 * self.d_model ** 0.5 / 32) * 32))
        if not 0.0 <= self.depth < 1.0:
            raise ValueError(f"depth must be in [0, 1) (block index / number of blocks), got {self.depth}")


@dataclass(frozen=True)
class RWKVState(State):
    S: torch.Tensor  # (B, H, K, V) the matrix state
    shift: torch.Tensor  # (B, 1, D) the last token's input, for the token shift


def token_shift(x: torch.Tensor, last: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """x_{t-1} for every token of x (B, T, D), with ``last`` (B|N, 1, D) the input before x; with
    ``cu_seqlens`` each sequence starts from its own row. Returns (previous (B, T, D), new last (B|N, 1, D))."""
    if cu_seqlens is None:
        xp = torch.cat([last.to(x.dtype), x], dim=1)  # (B, 1+T, D)
        return xp[:, :-1], xp[:, -1:]
    layout = PrefixLayout(cu_seqlens.tolist(), 1, x.device)
    xp = layout.pad(last.to(x.dtype), x)  # (1, N+T, D): each sequence after its own last input
    return xp[:, layout.out], xp[0, layout.last]


def lora(d_in: int, rank: int, d_out: int, activation: nn.Module, bias: bool = True) -> nn.Sequential:
    """The low-rank map ``W_2 act(W_1 x) (+ b)``: (..., d_in) -> (..., d_out)."""
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), activation, nn.Linear(rank, d_out, bias=bias))


def lora_init_(m: nn.Sequential) -> None:
    """The references' LoRA init: W_1 = 0, W_2 orthogonal with gain 0.1 (sqrt(in/out) more when
    it is wide), bias 0."""
    nn.init.zeros_(m[0].weight)
    d_out, d_in = m[2].weight.shape
    nn.init.orthogonal_(m[2].weight, gain=0.1 * (math.sqrt(d_in / d_out) if d_in > d_out else 1.0))
    if m[2].bias is not None:
        nn.init.zeros_(m[2].bias)


class _RWKV(Mixer):
    """What both versions share: the state and the token shift."""

    state_cls = RWKVState

    def init_state(self, batch_size, device=None, dtype=None) -> RWKVState:
        c, dt = self.config, dtype or torch.float32
        K, V = self.head_dims
        return RWKVState(S=torch.zeros(batch_size, self.heads, K, V, device=device, dtype=dt),
                         shift=torch.zeros(batch_size, 1, c.d_model, device=device, dtype=dt))

    def _start(self, x, state, cu_seqlens):
        """(accumulation dtype, the state, delta = x_{t-1} - x_t (B, T, D), the new shift state)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        prev, shift = token_shift(x, st.shift, cu_seqlens)
        return acc, st, prev - x, shift.to(st.shift.dtype)

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head GroupNorm of o (B, T, H, V) -> (B, T, H·V)."""
        B, T = o.shape[:2]
        return self.g_norm(rearrange(o, "b t h v -> (b t) (h v)")).reshape(B, T, -1)


class RWKV6(_RWKV):
    """RWKV-6 time-mix (see module docstring)."""

    config_cls = RWKV6Config
    no_decay_params = ("x_mu", "x_bias", "bonus")

    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        c = config
        self.heads, self.head_dims = c.num_heads, (c.key_dim // c.num_heads, c.value_dim // c.num_heads)
        self.x_mu = nn.Parameter(torch.zeros(c.d_model))  # (D,) the static mix feeding the ddlerp LoRA
        self.x_lora = lora(c.d_model, 5 * c.proj_low_rank_dim, c.d_model, nn.Tanh(), bias=False)  # 5 branches
        self.x_bias = nn.Parameter(torch.zeros(5, c.d_model))  # (5, D) static part of each branch's mix
        self.r_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.w_lora = lora(c.d_model, c.gate_low_rank_dim, c.key_dim, nn.Tanh())
        self.k_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.value_dim, bias=False)
        self.g_proj = nn.Linear(c.d_model, c.value_dim, bias=False)
        self.bonus = nn.Parameter(torch.zeros(c.num_heads, c.key_dim // c.num_heads))  # (H, K): u
        self.g_norm = nn.GroupNorm(c.num_heads, c.value_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(c.value_dim, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's layer init: xavier-uniform (gain 2^-2.5) projections (the ddlerp LoRA's two
        included), the decay LoRA as :func:`lora_init_`, zero mixes, biases and bonus, norms 1."""
        xavier_linears_(self, 2 ** -2.5)
        lora_init_(self.w_lora)
        for p in (self.x_mu, self.x_bias, self.bonus):
            nn.init.zeros_(p)
        reset_norms_(self)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc, st, delta, shift = self._start(x, state, cu_seqlens)
        # 1. ddlerp: five data-dependent mixes of x_t and x_{t-1}
        z = rearrange(self.x_lora[1](self.x_lora[0](x + delta * self.x_mu)), "b t (n r) -> b t n r", n=5)
        W2 = rearrange(self.x_lora[2].weight, "d (n r) -> n r d", n=5)  # (5, R, D)
        mixes = torch.einsum("btnr,nrd->btnd", z, W2) + self.x_bias  # (B, T, 5, D)
        xr, xw, xk, xv, xg = (x + delta * m for m in mixes.unbind(2))
        # 2. projections; the decay log w = -exp(.)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        r, k, v = heads(self.r_proj(xr)), heads(self.k_proj(xk)), heads(self.v_proj(xv))  # (B, T, H, K|V)
        log_w = -torch.exp(heads(self.w_lora(xw)))  # (B, T, H, K)
        # 3. the recurrence, read before the write, plus the bonus
        o, S = rwkv6(r, k, v, log_w, self.bonus.to(acc), scale=1.0, initial_state=st.S, cu_seqlens=cu_seqlens)
        o = self._norm(o) * F.silu(self.g_proj(xg).to(acc))  # (B, T, H·V)
        return self.o_proj(o.to(x.dtype)), RWKVState(S=S, shift=shift)


class RWKV7(_RWKV):
    """RWKV-7 time-mix (see module docstring)."""

    config_cls = RWKV7Config
    no_decay_params = ("x_mix", "k_k", "k_a", "r_k")

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        c = config
        D, H, K = c.d_model, c.num_heads, c.head_dim
        self.heads, self.head_dims = H, (K, K)
        self.x_mix = nn.Parameter(torch.zeros(6, D))  # (6, D) token-shift mixes of r, w, k, v, a, g
        self.k_k = nn.Parameter(torch.zeros(D))  # (D,) scales k before normalising it to kappa
        self.k_a = nn.Parameter(torch.zeros(D))  # (D,) how much the learning rate a scales the key
        self.r_k = nn.Parameter(torch.zeros(H, K))  # (H, K) the current token's bonus weights
        self.r_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.w_lora = lora(D, c.decay_low_rank_dim, D, nn.Tanh())
        self.a_lora = lora(D, c.a_low_rank_dim, D, nn.Identity())
        self.g_lora = lora(D, c.gate_low_rank_dim, D, nn.Sigmoid(), bias=False)
        self.g_norm = nn.GroupNorm(H, D, eps=K * c.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's x070 init as fla's layer writes it (depth-dependent, see module docstring):
        mixes 1 - (n/D)^(p (1 - depth)); decay and learning-rate biases over channels with a
        zigzag within heads; k_k 0.71 - 0.1 linear, k_a 1.02, r_k -0.04; LoRAs as
        :func:`lora_init_`; r, v orthogonal, k orthogonal with gain 0.1, o_proj zero."""
        c = self.config
        D, K = c.d_model, c.head_dim
        r01, r10 = c.depth, 1.0 - c.depth
        n = torch.arange(D, dtype=torch.float64)
        linear = n / max(D - 1, 1) - 0.5
        zigzag = ((n % K) - (K - 1) / 2) / max((K - 1) / 2, 1e-9)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(D - 1, 1)) ** (1 + r01 ** 0.3)
        powers = torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2], dtype=torch.float64)  # r, w, k, v, a, g
        self.x_mix.copy_(1.0 - (n / D)[None] ** (powers[:, None] * r10))
        self.k_k.copy_(0.71 - 0.1 * linear)
        nn.init.constant_(self.k_a, 1.02)
        nn.init.constant_(self.r_k, -0.04)
        for m in (self.w_lora, self.a_lora, self.g_lora):
            lora_init_(m)
        self.w_lora[2].bias.copy_(www + 0.5 + 2.5 * zigzag)
        self.a_lora[2].bias.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)
        nn.init.zeros_(self.o_proj.weight)
        reset_norms_(self)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc, st, delta, shift = self._start(x, state, cu_seqlens)
        xr, xw, xk, xv, xa, xg = (x + delta * m for m in self.x_mix.unbind(0))  # static token-shift mixes
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        r, k, v = heads(self.r_proj(xr)), heads(self.k_proj(xk)), heads(self.v_proj(xv))  # (B, T, H, K)
        log_w = -LOG_W_FLOOR * torch.sigmoid(heads(self.w_lora(xw)))  # (B, T, H, K): log w in (-e^-0.5, 0)
        a = torch.sigmoid(heads(self.a_lora(xa)))  # in-context learning rate in (0, 1)
        kappa = F.normalize(k * heads(self.k_k[None, None]), dim=-1)  # the unit removal key
        k = k * (1 + (a - 1) * heads(self.k_a[None, None]))
        o, S = dplr(r, k, v, log_w, -kappa, kappa * a, scale=1.0, initial_state=st.S, cu_seqlens=cu_seqlens)
        bonus = (r * k * self.r_k.to(acc)).sum(-1, keepdim=True) * v  # (B, T, H, V)
        o = (self._norm(o) + rearrange(bonus, "b t h v -> b t (h v)")) * self.g_lora(xg).to(acc)  # (B, T, D)
        return self.o_proj(o.to(x.dtype)), RWKVState(S=S, shift=shift)
