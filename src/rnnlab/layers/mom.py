"""Mixture-of-Memories (MoM): a router writes each token into the top-k of M memories.

Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories" (arXiv:2502.13685).
A router ``p_t = softmax(W_r x_t)`` (M scores) picks the top-k memories of token t, with the
weights ``w_t`` = the chosen scores renormalised to sum to 1; each memory m is a Gated DeltaNet
memory with its own key, value, writing-strength and decay projections, written only by the tokens
routed to it; a shared memory (index M) is written by every token. Per head:

    S_t^m = a_t^m (I - b_t^m k_t^m k_t^m^T) S_{t-1}^m + b_t^m k_t^m v_t^m^T   if m in topk(t) or m shared
    S_t^m = S_{t-1}^m                                                         otherwise
    o_t = sum_{m in topk(t)} w_t^m S_t^m^T q_t / sqrt(K) + S_t^shared^T q_t / sqrt(K)

(q_t is shared by all memories.) The output is then ``RMSNorm(o_t) * silu(W_g x_t)`` per head and
projected back to D, as in Gated DeltaNet.

**Every memory over the whole sequence.** A token not routed to memory m is a no-op for m: with
``b_t^m = 0`` and ``log a_t^m = 0`` the transition is the identity and nothing is written, and its
read gets the weight 0. So running all M + 1 memories over every token with those masked ``b`` and
``log a`` (the memories folded into the heads of one ``rnnlab.ops.gated_delta_rule`` call) is exact,
and the chunking law and packed sequences come for free. It costs (M + 1) / (k + 1) times the work
of gathering each memory's tokens first, which is an optimisation left for later.

Defaults follow flash-linear-attention's MoM (``fla/layers/mom.py`` with the model config of
``fla/models/mom``): M = 4 memories, top-k = 2, a shared memory, gated-delta-rule memories,
no value expansion, short causal convolutions (width 4, SiLU) on q, k and v, q and k L2-normalised
per head, ``b = sigmoid(W_b x)``, ``log a = -exp(A_log) softplus(W_a x + dt_bias)`` with ``A_log``
and ``dt_bias`` per head shared by all memories (``allow_neg_eigval=True``: ``b`` in (0, 2), as in
rnnlab's DeltaNet; not in fla's MoM). Init as there: xavier-uniform (gain 2^-2.5) on
every projection (each memory's block on its own, as fla's separate Linear modules), convolutions
at PyTorch's default, ``A ~ U(0, 16)``, ``softplus(dt_bias)`` log-uniform in [0.001, 0.1]; ``A_log``
and ``dt_bias`` skip weight decay.

rnnlab differs from the reference in: (1) the short convolutions run over the whole token stream
(each memory's keys and values through a filter of its own), where fla runs one shared filter over
each memory's gathered tokens (and, in training, across memory and sequence boundaries); so a
memory's conv window here holds the last W-1 tokens, not its last W-1 routed tokens; (2) no
load-balancing auxiliary loss on the router (the mixer contract returns no loss);
(3) K = d_model / num_heads by default (fla fixes head_dim = 256); (4) no fused kernels, and the
memories' and convolutions' states are kept per stream in the state object.

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim,
M routed memories, E = M (+ 1 with the shared memory) memories in all, W conv width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import Mixer, state_batch
from .common import GatedRMSNorm, ShortConv, default_init_
from .deltanet import GatedDeltaNetConfig, init_decay_
from .state import State

__all__ = ["MoMConfig", "MoMState", "MoM"]


@dataclass
class MoMConfig(GatedDeltaNetConfig):
    expand_v: float = 1.0  # V = expand_v * K (fla's MoM model: no value expansion)
    num_memories: int = 4  # M routed memories
    topk: int = 2  # memories each token is routed to (and read from)
    shared_memory: bool = True  # a memory written and read by every token, besides the routed ones
    A_init_range: tuple[float, float] = (0.0, 16.0)  # A ~ U(range) (fla's MoM: U(0, 16))
    num_all_memories: int = 0  # derived: E = M (+ 1 with the shared memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_memories, int) or self.num_memories < 1:
            raise ValueError(f"num_memories must be a positive int, got {self.num_memories!r}")
        if not isinstance(self.topk, int) or not 1 <= self.topk <= self.num_memories:
            raise ValueError(f"topk must be an int in [1, num_memories={self.num_memories}], got {self.topk!r}")
        if not 0 <= self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be (low, high) with 0 <= low <= high, got {self.A_init_range!r}")
        self.num_all_memories = self.num_memories + int(self.shared_memory)


@dataclass(frozen=True)
class MoMState(State):
    S: torch.Tensor  # (B, E, H, K, V) the memories (the shared one last)
    conv_q: torch.Tensor  # (B, W-1, H*K) last inputs of the q convolution
    conv_k: torch.Tensor  # (B, W-1, E*H*K) of the memories' key convolutions
    conv_v: torch.Tensor  # (B, W-1, E*H*V) of the memories' value convolutions


class MoM(Mixer):
    """Mixture-of-Memories layer with Gated DeltaNet memories (see module docstring)."""

    config_cls = MoMConfig
    state_cls = MoMState
    no_decay_params = ("A_log", "dt_bias")

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        c = config
        E, HK, HV = c.num_all_memories, c.num_heads * c.head_dim, c.num_heads * c.head_v_dim
        self.router = nn.Linear(c.d_model, c.num_memories, bias=False)
        self.q_proj = nn.Linear(c.d_model, HK, bias=False)
        self.k_proj = nn.Linear(c.d_model, E * HK, bias=False)  # E blocks of H*K: one per memory
        self.v_proj = nn.Linear(c.d_model, E * HV, bias=False)
        self.b_proj = nn.Linear(c.d_model, E * c.num_heads, bias=False)
        self.a_proj = nn.Linear(c.d_model, E * c.num_heads, bias=False)
        self.q_conv = ShortConv(HK, c.conv_size)
        self.k_conv = ShortConv(E * HK, c.conv_size)
        self.v_conv = ShortConv(E * HV, c.conv_size)
        self.A_log = nn.Parameter(torch.empty(c.num_heads))  # (H,) decay rate A = exp(A_log), all memories
        self.dt_bias = nn.Parameter(torch.empty(c.num_heads))  # (H,) softplus(dt_bias) = initial step
        self.g_proj = nn.Linear(c.d_model, HV, bias=False)
        self.o_norm = GatedRMSNorm(c.head_v_dim, c.norm_eps)
        self.o_proj = nn.Linear(HV, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's MoM init: xavier-uniform (gain 2^-2.5) on every projection, each memory's block of
        the fused k, v, b, a projections on its own; default convolutions; norm weight 1; A ~
        U(A_init_range), softplus(dt_bias) log-uniform in [dt_min, dt_max]."""
        default_init_(self)
        E = self.config.num_all_memories
        for lin in (self.router, self.q_proj, self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        for lin in (self.k_proj, self.v_proj, self.b_proj, self.a_proj):
            with torch.no_grad():
                for block in lin.weight.chunk(E, dim=0):
                    nn.init.xavier_uniform_(block, gain=2 ** -2.5)
        init_decay_(self.A_log, self.dt_bias, self.config)

    def init_state(self, batch_size, device=None, dtype=None) -> MoMState:
        c, dt = self.config, dtype or torch.float32
        return MoMState(
            S=torch.zeros(batch_size, c.num_all_memories, c.num_heads, c.head_dim, c.head_v_dim, device=device, dtype=dt),
            conv_q=self.q_conv.init_state(batch_size, device, dt), conv_k=self.k_conv.init_state(batch_size, device, dt),
            conv_v=self.v_conv.init_state(batch_size, device, dt))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of x (B, T, D): the read weights (B, T, E) (the top-k scores renormalised, zero
        off the top-k, 1 for the shared memory) and the write mask (B, T, E) (bool: routed or shared)."""
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        scores = torch.softmax(self.router(x).to(acc), dim=-1)  # (B, T, M)
        top, idx = scores.topk(c.topk, dim=-1)  # (B, T, k)
        weights = torch.zeros_like(scores).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # (B, T, M)
        routed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)  # (B, T, M)
        if c.shared_memory:
            weights = F.pad(weights, (0, 1), value=1.0)  # (B, T, E)
            routed = F.pad(routed, (0, 1), value=True)
        return weights, routed

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        H, E = c.num_heads, c.num_all_memories
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. router: read weights and write mask per memory
        weights, routed = self.route(x)  # (B, T, E)
        # 2. projections through the short convolutions (SiLU); q shared by every memory
        q, cq = self.q_conv(self.q_proj(x), st.conv_q, cu_seqlens)  # (B, T, H*K)
        k, ck = self.k_conv(self.k_proj(x), st.conv_k, cu_seqlens)  # (B, T, E*H*K)
        v, cv = self.v_conv(self.v_proj(x), st.conv_v, cu_seqlens)  # (B, T, E*H*V)
        q = F.normalize(rearrange(q, "b t (h k) -> b t h k", h=H).to(acc), dim=-1)  # (B, T, H, K)
        q = repeat(q, "b t h k -> b t (e h) k", e=E)  # (B, T, E*H, K)
        k = F.normalize(rearrange(k, "b t (e h k) -> b t (e h) k", e=E, h=H).to(acc), dim=-1)  # (B, T, E*H, K)
        v = rearrange(v, "b t (e h v) -> b t (e h) v", e=E, h=H).to(acc)  # (B, T, E*H, V)
        # 3. writing strength and decay per memory; a token not routed to a memory leaves it as it is
        beta = torch.sigmoid(self.b_proj(x).to(acc)) * (2.0 if c.allow_neg_eigval else 1.0)  # (B, T, E*H)
        log_g = -self.A_log.to(acc).exp().repeat(E) * F.softplus(
            self.a_proj(x).to(acc) + self.dt_bias.to(acc).repeat(E))  # (B, T, E*H)
        write = repeat(routed, "b t e -> b t (e h)", h=H)  # (B, T, E*H)
        beta = torch.where(write, beta, torch.zeros_like(beta))
        log_g = torch.where(write, log_g, torch.zeros_like(log_g))
        # 4. every memory over every token (the masked tokens are no-ops), as heads of one op
        o, S = gated_delta_rule(q, k, v, log_g=log_g, beta=beta,
                                initial_state=rearrange(st.S, "b e h k v -> b (e h) k v").to(acc),
                                cu_seqlens=cu_seqlens)  # (B, T, E*H, V), (B, E*H, K, V)
        # 5. read: the selected memories mixed by the router weights, plus the shared memory
        o = torch.einsum("btehv,bte->bthv", rearrange(o, "b t (e h) v -> b t e h v", e=E), weights)  # (B, T, H, V)
        gate = rearrange(self.g_proj(x), "b t (h v) -> b t h v", h=H)  # (B, T, H, V)
        y = self.o_proj(rearrange(self.o_norm(o, gate.to(o.dtype)), "b t h v -> b t (h v)").to(x.dtype))  # (B, T, D)
        return y, MoMState(S=rearrange(S, "b (e h) k v -> b e h k v", e=E), conv_q=cq, conv_k=ck, conv_v=cv)
