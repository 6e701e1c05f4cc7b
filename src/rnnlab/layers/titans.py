"""Titans' neural long-term memory as a mixer (Behrouz et al. 2024, "Titans: Learning to Memorize at
Test Time"; the LMM variant, which the MAL hybrid stacks with sliding-window attention).

Per head the state is a memory M (a linear map, or a 2-layer MLP) trained while reading, by one
gradient step per token on ||M(k_t) - v_t||² with momentum and forgetting (``rnnlab.ops.memory``):
    S_t = η_t S_{t-1} - θ_t ∇ℓ(M_{t'}; k_t, v_t),   M_t = (1 - α_t) M_{t-1} + S_t,   o_t = M_t(q_t)
with gradients taken at the start t' of each mini-batch of ``chunk_size`` tokens (the paper's
parallel form, eq. 16). As in the paper: q, k, v are linear projections, each followed by a causal
depthwise conv and SiLU, q and k are L2-normalised per head; α_t, η_t, θ_t are data-dependent
(per token and head); the output is normalised and gated by a linear layer before the output
projection. The initial memory is learned (the outer loop trains it).

rnnlab's choices where the paper is silent: α = sigmoid(·) with its bias starting at -5 (about
0.7% forgotten per token), η = sigmoid(·) starting at sigmoid(2) = 0.88, θ = max_lr · sigmoid(·)
with max_lr = 0.03 (with 0.1 the MLP memory diverged within 100 tokens of inputs of std 3 — the
token loop too, so it is the inner optimiser's step, not the chunked form; 0.03 stayed finite up
to std 30 over 4096 tokens; heavy-ball momentum on 16 summed unit-key gradients is stable below
about 0.12 for the linear memory); the MLP memory is W2 silu(W1 k) with hidden width F = memory_expand · K;
o_t reads the memory after token t's update; the output norm is a per-head RMSNorm times
silu(W_g x). ``forget_to_init=True`` (not in the paper) makes forgetting pull toward the learned
initial memory instead of zero: for the MLP memory zero is a point where every gradient vanishes,
and at the initial α the paper's rule reaches it within a few thousand tokens of weak writes. The
state also holds the mini-batch's anchor weights and position, so streaming token by token equals
the chunked pass exactly.

Init (no reference code exists): projections N(0, 0.02), convs at PyTorch's default, norm weight 1,
gate biases as above, the MLP memory's initial weights N(0, 1/fan_in) (a linear memory starts at
zero). Skip weight decay: the gate biases (and norm weight); the initial memory is decayed like
any weight.

Dimension letters: B batch, T tokens, D model width, H heads, K = V = D/H head dim, F MLP-memory
width, W conv width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.memory import MemoryState, neural_memory
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import GatedRMSNorm, ShortConv, default_init_, normal_linears_
from .state import State

__all__ = ["TitansConfig", "TitansState", "Titans"]


@dataclass
class TitansConfig(MixerConfig):
    num_heads: int = 4  # H
    memory: str = "mlp"  # "mlp" (W2 silu(W1 k), the paper's deep memory) or "linear" (W k)
    memory_expand: int = 2  # F = memory_expand · K, hidden width of the MLP memory
    chunk_size: int = 16  # b: tokens per mini-batch of the inner gradient descent
    forget_to_init: bool = False  # forgetting pulls toward the learned initial memory instead of zero
    max_lr: float = 0.03  # θ_t = max_lr · sigmoid(·); 0.1 let the MLP memory diverge on inputs of std 3
    conv_size: int = at_least(1, 4)  # W, causal depthwise conv width after the q, k, v projections (always on)
    norm_eps: float = positive(1e-5)  # epsilon of the per-head output norm
    head_dim: int = 0  # derived: K = d_model / H

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1 and divide d_model={self.d_model}")
        if self.memory not in ("mlp", "linear"):
            raise ValueError(f"memory must be 'mlp' or 'linear', got {self.memory!r}")
        if self.memory_expand < 1 or self.chunk_size < 1:
            raise ValueError(f"memory_expand and chunk_size must be >= 1, got {self.memory_expand}, {self.chunk_size}")
        if self.max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
        self.head_dim = self.d_model // self.num_heads


@dataclass(frozen=True)
class TitansState(State):
    memory_0: torch.Tensor  # (B, H, out, in) first (or only) memory weight: W1 (F, K) or W (V, K)
    momentum_0: torch.Tensor  # (B, H, out, in) its momentum S
    anchor_0: torch.Tensor  # (B, H, out, in) its value at the start of the current mini-batch
    memory_1: torch.Tensor | None  # (B, H, V, F) the MLP memory's W2 (None for a linear memory)
    momentum_1: torch.Tensor | None
    anchor_1: torch.Tensor | None
    conv_q: torch.Tensor  # (B, W-1, D) last inputs of the q conv
    conv_k: torch.Tensor  # (B, W-1, D)
    conv_v: torch.Tensor  # (B, W-1, D)
    pos: torch.Tensor  # (B,) int64: tokens of each row's current mini-batch already seen


class Titans(Mixer):
    """Titans neural-memory mixer (see module docstring)."""

    config_cls = TitansConfig
    state_cls = TitansState
    step_compiles = False  # the mini-batch position is range-checked on the host
    no_decay_params = ("gate_bias",)

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        c = config
        D, H, K = c.d_model, c.num_heads, c.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(D, c.conv_size) for _ in range(3))
        self.gate_proj = nn.Linear(D, 3 * H, bias=False)  # logits of α, η, θ
        self.gate_bias = nn.Parameter(torch.empty(3 * H))  # (3H,) biases of the α, η, θ logits
        shapes = [(K, K)] if c.memory == "linear" else [(c.memory_expand * K, K), (K, c.memory_expand * K)]
        self.memory_init = nn.ParameterList(  # the learned initial memory, per head: (H, out, in)
            nn.Parameter(torch.empty(H, o, i)) for o, i in shapes)
        self.g_proj = nn.Linear(D, D, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=c.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """rnnlab's init (see the module docstring): projections N(0, 0.02), gate biases -5 / 2 / 0,
        initial MLP memory N(0, 1/fan_in) (linear memory: zeros)."""
        H = self.config.num_heads
        default_init_(self)  # convolutions and norms
        normal_linears_(self, 0.02)
        with torch.no_grad():
            self.gate_bias.copy_(torch.cat([torch.full((H,), -5.0), torch.full((H,), 2.0), torch.zeros(H)]))
            for w in self.memory_init:
                if self.config.memory == "mlp":
                    nn.init.normal_(w, 0.0, w.shape[-1] ** -0.5)
                else:
                    nn.init.zeros_(w)

    def init_state(self, batch_size, device=None, dtype=None) -> TitansState:
        dt = dtype or torch.float32
        w = [p.to(device=device, dtype=dt).unsqueeze(0).repeat(batch_size, 1, 1, 1) for p in self.memory_init]
        zeros = [torch.zeros_like(t) for t in w]
        second = (w[1], zeros[1], w[1]) if len(w) == 2 else (None, None, None)
        return TitansState(w[0], zeros[0], w[0], *second, *(conv.init_state(batch_size, device, dt)
                                                           for conv in (self.q_conv, self.k_conv, self.v_conv)),
                           torch.zeros(batch_size, dtype=torch.long, device=device))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads)  # noqa: E731
        # 1. q, k, v: projection, causal conv + SiLU; q and k L2-normalised per head
        q, conv_q = self.q_conv(self.q_proj(x), st.conv_q, cu_seqlens)
        k, conv_k = self.k_conv(self.k_proj(x), st.conv_k, cu_seqlens)
        v, conv_v = self.v_conv(self.v_proj(x), st.conv_v, cu_seqlens)
        q, k, v = F.normalize(heads(q), dim=-1), F.normalize(heads(k), dim=-1), heads(v)  # (B, T, H, K)
        # 2. data-dependent forgetting α, momentum decay η and step size θ per token and head
        a_logit, eta_logit, th_logit = (self.gate_proj(x).to(acc) + self.gate_bias.to(acc)).chunk(3, dim=-1)
        log_g = F.logsigmoid(-a_logit)  # log(1 - α), (B, T, H)
        log_eta = F.logsigmoid(eta_logit)
        theta = c.max_lr * torch.sigmoid(th_logit)
        # 3. the memory learns from (k, v) and is read at q
        n = len(self.memory_init)
        pick = lambda part: tuple(getattr(st, f"{part}_{i}") for i in range(n))  # noqa: E731
        init = MemoryState(pick("memory"), pick("momentum"), pick("anchor"), st.pos)
        base = tuple(w.to(acc) for w in self.memory_init) if c.forget_to_init else None
        o, ms = neural_memory(q, k, v, log_g, log_eta, theta, init, chunk_size=c.chunk_size, base=base,
                              cu_seqlens=cu_seqlens)  # (B, T, H, K)
        # 4. per-head norm, gate by a linear layer, output projection
        o = self.o_norm(o.to(x.dtype), heads(self.g_proj(x)))
        out = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))  # (B, T, D)
        second = (ms.memory[1], ms.momentum[1], ms.anchor[1]) if n == 2 else (None, None, None)
        return out, TitansState(ms.memory[0], ms.momentum[0], ms.anchor[0], *second, conv_q, conv_k, conv_v, ms.pos)
