"""Gated DeltaProduct: n_h delta-rule (Householder) steps per token, gated once per token.

Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder
Products" (arXiv:2502.10297). Per head and token t, with n_h keys, values and writing strengths:

    S_{t,0} = a_t S_{t-1},   S_{t,j} = (I - b_{t,j} k_{t,j} k_{t,j}^T) S_{t,j-1} + b_{t,j} k_{t,j} v_{t,j}^T
    (j = 1..n_h),   S_t = S_{t,n_h},   o_t = S_t^T q_t / sqrt(K)

The state transition is a product of n_h generalised Householder matrices (times the scalar gate
``a_t``): with ``allow_neg_eigval`` (``b = 2 sigmoid(W_b x)`` in (0, 2)) it can be a reflection,
and products of them express rotations and permutations: the paper finds that more steps per
token extend the state-tracking tasks (permutation groups such as S_3, S_5) a layer learns and
length-generalises. n_h = 1 is Gated DeltaNet.

How rnnlab computes it: the gated delta rule (``rnnlab.ops.gated_delta_rule``) runs over the
interleaved sequence of T·n_h sub-steps ``(t, j)``, with the gate's ``log a_t`` on each token's
first sub-step and 0 on the others, the query on its last sub-step (zeros elsewhere), and the
output taken at each token's last sub-step. Packed sequences use ``cu_seqlens · n_h``. Decoding one
token runs its n_h sub-steps with the op's step form.

Follows flash-linear-attention's ``GatedDeltaProduct`` layer and its defaults: n_h = 2, negative
eigenvalues allowed, the forget gate and the output gate on; the block of
:mod:`rnnlab.layers.deltanet` (q, k, v through short causal convolutions with SiLU, q and each k
L2-normalised per head, the Mamba-2 style scalar decay ``a_t = exp(-exp(A_log) softplus(W_a x +
dt_bias))``, output ``RMSNorm(o) * silu(W_g x)``), with n_h keys, values and betas per token
(projections to n_h·H·K, n_h·H·V and n_h·H, sub-step index outermost in the features). Init as
there: xavier-uniform (gain 2^-2.5) projections, convolutions at PyTorch's default, A ~ U(0, 16),
softplus(dt_bias) log-uniform in [0.001, 0.1]; A_log and dt_bias skip weight decay.

rnnlab differs from the reference in: no fused kernels; no grouped value heads (``num_v_heads``);
the forget and output gates are always on (fla's ``use_forget_gate`` / ``use_output_gate``); head
sizes follow rnnlab's DeltaNet family (K = d_model / num_heads, V = 2K) rather than fla's fixed
head_dim 256 with 6 heads; the conv states are kept per stream in the state object.

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim,
n the number of Householder steps per token (n_h).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import state_batch
from .common import ShortConv
from .deltanet import DeltaNetState, GatedDeltaNet, GatedDeltaNetConfig

__all__ = ["GatedDeltaProductConfig", "GatedDeltaProduct"]


@dataclass
class GatedDeltaProductConfig(GatedDeltaNetConfig):
    num_householder: int = 2  # n_h: delta-rule (Householder) steps per token
    allow_neg_eigval: bool = True  # b in (0, 2): each step may reflect (the reference layer's default)
    A_init_range: tuple[float, float] = (0.0, 16.0)  # A ~ U(range), the reference's

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_householder, int) or self.num_householder < 1:
            raise ValueError(f"num_householder must be a positive int, got {self.num_householder!r}")


class GatedDeltaProduct(GatedDeltaNet):
    """Gated DeltaProduct layer (see module docstring)."""

    config_cls = GatedDeltaProductConfig

    def _build(self, c: GatedDeltaProductConfig) -> None:
        super()._build(c)
        n, HK, HV = c.num_householder, c.num_heads * c.head_dim, c.num_heads * c.head_v_dim
        self.k_proj = nn.Linear(c.d_model, n * HK, bias=False)  # features (n h k)
        self.v_proj = nn.Linear(c.d_model, n * HV, bias=False)  # features (n h v)
        self.b_proj = nn.Linear(c.d_model, n * c.num_heads, bias=False)  # features (n h)
        self.k_conv = ShortConv(n * HK, c.conv_size)
        self.v_conv = ShortConv(n * HV, c.conv_size)

    def mix(self, x, state, cu_seqlens=None):
        c, n, H = self.config, self.config.num_householder, self.config.num_heads
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. projections through the short convolutions (SiLU); n_h keys and values per token
        q, cq = self.q_conv(self.q_proj(x), st.conv_q, cu_seqlens)  # (B, T, H*K)
        k, ck = self.k_conv(self.k_proj(x), st.conv_k, cu_seqlens)  # (B, T, n*H*K)
        v, cv = self.v_conv(self.v_proj(x), st.conv_v, cu_seqlens)  # (B, T, n*H*V)
        q = F.normalize(rearrange(q, "b t (h k) -> b t h k", h=H).to(acc), dim=-1)  # (B, T, H, K)
        k = F.normalize(rearrange(k, "b t (n h k) -> b (t n) h k", n=n, h=H).to(acc), dim=-1)  # (B, T*n, H, K)
        v = rearrange(v, "b t (n h v) -> b (t n) h v", n=n, h=H).to(acc)  # (B, T*n, H, V)
        beta = torch.sigmoid(rearrange(self.b_proj(x), "b t (n h) -> b (t n) h", n=n).to(acc))  # (B, T*n, H)
        beta = beta * (2.0 if c.allow_neg_eigval else 1.0)
        # 2. the interleaved sequence: the gate on each token's first sub-step, the query on its last
        log_g = F.pad(self.decay(x).to(acc)[:, :, None], (0, 0, 0, n - 1))  # (B, T, n, H)
        log_g = rearrange(log_g, "b t n h -> b (t n) h")  # (B, T*n, H)
        q = rearrange(F.pad(q[:, :, None], (0, 0, 0, 0, n - 1, 0)), "b t n h k -> b (t n) h k")  # (B, T*n, H, K)
        # 3. the gated delta rule over T*n sub-steps
        if cu_seqlens is None and x.shape[1] == 1:  # decoding: the n sub-steps with the step form
            S = st.S
            for j in range(n):
                sub = lambda t: t[:, j:j + 1]  # noqa: E731
                o, S = gated_delta_rule(sub(q), sub(k), sub(v), log_g=sub(log_g), beta=sub(beta), initial_state=S)
        else:
            o, S = gated_delta_rule(q, k, v, log_g=log_g, beta=beta, initial_state=st.S,
                                    cu_seqlens=None if cu_seqlens is None else cu_seqlens * n)
            o = rearrange(o, "b (t n) h v -> b t n h v", n=n)[:, :, -1]  # (B, T, H, V): each token's last sub-step
        # 4. output norm and gate, projection
        y = self.o_proj(rearrange(self.output(o, x), "b t h v -> b t (h v)").to(x.dtype))  # (B, T, D)
        return y, DeltaNetState(S=S, conv_q=cq, conv_k=ck, conv_v=cv)
