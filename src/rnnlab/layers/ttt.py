"""TTT layers (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States"): TTT-Linear and TTT-MLP.

Per head the hidden state is the weights W of an inner model f (linear: W x + b; MLP:
W2 gelu(W1 x + b1) + b2), trained while reading by one gradient step per mini-batch of b tokens on
the self-supervised loss ½||LN(f(k_t; W)) - (v_t - k_t)||², all gradients of a mini-batch taken
at its starting weights W_0 (``rnnlab.ops.ttt``, with the "dual form" as its fast form):
    W_t = W_0 - token_eta[i] Σ_{s ≤ t in the mini-batch} eta_s ∇ℓ(W_0; k_s, v_s),   o_t = q_t + LN(f(q_t; W_t))
where i is t's place in its mini-batch, token_eta[i] = max(0, 1/(i+1) + a learned bias) and
eta_s = base_lr · sigmoid(w_h · x_s + c_h) / K is the learned, data-dependent learning rate of
head h. q, k, v are linear projections of x, rotated by RoPE at the place within the mini-batch
(position mod b); the heads' outputs pass a LayerNorm over D (and, with ``use_gate``, a
gelu(W_g x) gate) before the output projection.

Where TTT differs from Titans' memory (``rnnlab.layers.titans``, the same idea of a memory
learned by gradient steps; the two share the segments of their chunked forms): plain mini-batch
gradient descent, with neither momentum nor forgetting; the inner LayerNorm and the residual in
the loss and the read-out (the residual model k + LN(f(k)) reconstructs v); biases and a tanh GELU
in the inner model; the initial weights W_0 are learned (in Titans too) and the step of token t
is the average of the mini-batch's gradients so far (token_eta), scaled by a token-dependent
learning rate, not a running sum of per-token steps. The state holds W_0, the accumulated
gradient and the place in the mini-batch (as the reference's decoding cache does), so a sequence
split anywhere, even inside a mini-batch, continues exactly as one call.

Defaults follow the authors' PyTorch reference (ttt-lm-pytorch) in its Transformer backbone:
b = 16, base_lr 1.0 for TTT-Linear and 0.1 for TTT-MLP (their JAX training scripts), MLP hidden
width 4K, no gate, no Q/K sharing and no pre-convolution (those three belong to their Mamba
backbone; ``use_gate`` is offered, the other two are not), LayerNorm epsilon 1e-6, RoPE base
10000 on interleaved pairs of channels (the JAX layout their PyTorch port reproduces). Init as
the reference: projections and the learning-rate weights N(0, 0.02), learning-rate biases 0,
token_eta biases 0, the inner LayerNorm at identity, the inner weights N(0, 0.02) and biases 0.
Weight decay: the reference decays every parameter; rnnlab keeps its own rule (biases and norm
parameters skip it): the learning-rate and token_eta biases, the inner model's initial biases and
the inner LayerNorm skip weight decay, the initial inner weights are decayed.

Dimension letters: B batch, T tokens, D model width, H heads, K = D/H head dim (= V), F = mlp_expand · K
MLP hidden width, b mini-batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.ttt import TTTState as InnerState
from ..ops.ttt import default_token_eta, minibatch_places, ttt
from .base import Mixer, MixerConfig, positive, state_batch
from .common import apply_rope, default_init_, normal_linears_
from .state import State

__all__ = ["TTTConfig", "TTTMLPConfig", "TTTLayerState", "TTT"]


@dataclass
class TTTConfig(MixerConfig):
    num_heads: int = 4  # H (the reference's 125M model: 12 heads of 64)
    inner: str = "linear"  # the inner model: "linear" (TTT-Linear, W x + b) or "mlp" (TTT-MLP, 2 layers, GELU)
    mlp_expand: int = 4  # F = mlp_expand · K, hidden width of the TTT-MLP inner model
    chunk_size: int = 16  # b: tokens per mini-batch of the inner gradient descent
    base_lr: float = 1.0  # eta_t = base_lr · sigmoid(w_h · x_t + c_h) / K (0.1 for TTT-MLP)
    rope: bool = True  # RoPE on q and k at the place within the mini-batch, as the reference
    rope_theta: float = positive(10000.0)  # RoPE base
    use_gate: bool = False  # gate the output by gelu(W_g x) (the reference's Mamba backbone)
    norm_eps: float = positive(1e-6)  # epsilon of the inner LayerNorm and of the output LayerNorm
    head_dim: int = 0  # derived: K = d_model / H

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads!r} must be an int >= 1 dividing d_model={self.d_model}")
        if self.inner not in ("linear", "mlp"):
            raise ValueError(f"inner must be 'linear' or 'mlp', got {self.inner!r}")
        for name in ("mlp_expand", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        self.head_dim = self.d_model // self.num_heads
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head dim, got K = d_model / num_heads = {self.head_dim}")


@dataclass
class TTTMLPConfig(TTTConfig):
    inner: str = "mlp"  # the inner model: "mlp" (TTT-MLP, W2 gelu(W1 x + b1) + b2) or "linear"
    base_lr: float = 0.1  # eta_t = base_lr · sigmoid(w_h · x_t + c_h) / K (the reference's TTT-MLP value)


@dataclass(frozen=True)
class TTTLayerState(State):
    W1: torch.Tensor  # (B, H, out, in) W_0 of the first (or only) layer: (F, K) or (K, K), at the mini-batch start
    b1: torch.Tensor  # (B, H, out) its bias
    W2: torch.Tensor | None  # (B, H, K, F) the MLP's second layer (None for TTT-Linear)
    b2: torch.Tensor | None  # (B, H, K)
    grad_W1: torch.Tensor  # (B, H, out, in) Σ eta_s ∇ℓ_s over the current mini-batch so far
    grad_b1: torch.Tensor  # (B, H, out)
    grad_W2: torch.Tensor | None  # (B, H, K, F)
    grad_b2: torch.Tensor | None  # (B, H, K)
    pos: torch.Tensor  # (B,) int64: tokens of each row's current mini-batch already seen


def _rope_pairs(x, places, theta):
    """RoPE on interleaved channel pairs (2i, 2i+1) of x (B, T, H, K) at places (B or 1, T)."""
    x = rearrange(x, "b t h (k two) -> b h t (two k)", two=2)  # (B, H, T, K), pairs as halves
    return rearrange(apply_rope(x, places, theta), "b h t (two k) -> b t h (k two)", two=2)  # (B, T, H, K)


class TTT(Mixer):
    """TTT-Linear / TTT-MLP mixer (see module docstring)."""

    config_cls = TTTConfig
    state_cls = TTTLayerState
    step_compiles = False  # the mini-batch position is range-checked on the host
    no_decay_params = ("lr_bias", "token_eta_bias", "ttt_norm_weight", "ttt_norm_bias")  # and the inner biases

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        c = config
        D, H, K = c.d_model, c.num_heads, c.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.lr_weight = nn.Parameter(torch.empty(H, D))  # (H, D) w_h of the learning-rate gate
        self.lr_bias = nn.Parameter(torch.empty(H))  # (H,) c_h
        self.token_eta_bias = nn.Parameter(torch.empty(c.chunk_size))  # (b,) learned offsets of 1/(i+1)
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, K))  # (H, K) the inner LayerNorm
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, K))
        shapes = [(K, K)] if c.inner == "linear" else [(c.mlp_expand * K, K), (K, c.mlp_expand * K)]
        self.inner_W = nn.ParameterList(nn.Parameter(torch.empty(H, o, i)) for o, i in shapes)  # W_0 (H, out, in)
        self.inner_b = nn.ParameterList(nn.Parameter(torch.empty(H, o)) for o, _ in shapes)  # b_0 (H, out)
        self.post_norm = nn.LayerNorm(D, eps=c.norm_eps)
        self.g_proj = nn.Linear(D, D, bias=False) if c.use_gate else None
        self.o_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: projections, learning-rate weights and inner weights N(0, 0.02);
        biases 0; the inner and output LayerNorms at identity."""
        default_init_(self)  # the output LayerNorm
        normal_linears_(self, 0.02)
        with torch.no_grad():
            nn.init.normal_(self.lr_weight, 0.0, 0.02)
            for p in (self.lr_bias, self.token_eta_bias, self.ttt_norm_bias, *self.inner_b):
                nn.init.zeros_(p)
            nn.init.ones_(self.ttt_norm_weight)
            for w in self.inner_W:
                nn.init.normal_(w, 0.0, 0.02)

    def no_weight_decay(self) -> set[str]:
        """The base rule and ``no_decay_params``, plus the inner model's initial biases (one per layer)."""
        return super().no_weight_decay() | {f"inner_b.{i}" for i in range(len(self.inner_b))}

    def init_state(self, batch_size, device=None, dtype=None) -> TTTLayerState:
        dt = dtype or torch.float32
        w = [p.to(device=device, dtype=dt).unsqueeze(0).repeat(batch_size, *([1] * p.dim()))
             for pair in zip(self.inner_W, self.inner_b) for p in pair]  # W1, b1(, W2, b2)
        w += [None, None] * (2 - len(w) // 2)
        grads = [None if t is None else torch.zeros_like(t) for t in w]
        return TTTLayerState(*w, *grads, torch.zeros(batch_size, dtype=torch.long, device=device))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads)  # noqa: E731
        # 1. q, k, v projections, RoPE at the place within the mini-batch
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, T, H, K)
        if c.rope:
            places = minibatch_places(st.pos, x.shape[1], c.chunk_size, cu_seqlens)  # (B or 1, T)
            q, k = _rope_pairs(q, places, c.rope_theta), _rope_pairs(k, places, c.rope_theta)
        # 2. learning rates: eta per token and head, token_eta per place in the mini-batch
        logit = torch.einsum("btd,hd->bth", x.to(acc), self.lr_weight.to(acc)) + self.lr_bias.to(acc)  # (B, T, H)
        eta = c.base_lr * torch.sigmoid(logit) / c.head_dim
        token_eta = (default_token_eta(c.chunk_size, acc, x.device) + self.token_eta_bias.to(acc)).clamp_min(0.0)
        # 3. the inner model learns from (k, v) and is read at q
        n = len(self.inner_W)
        names = ["W1", "b1", "W2", "b2"][:2 * n]
        init = InnerState(tuple(getattr(st, f) for f in names), tuple(getattr(st, f"grad_{f}") for f in names), st.pos)
        o, s = ttt(q, k, v, eta, self.ttt_norm_weight.to(acc), self.ttt_norm_bias.to(acc), token_eta, init,
                   chunk_size=c.chunk_size, eps=c.norm_eps, cu_seqlens=cu_seqlens)  # (B, T, H, K)
        # 4. LayerNorm over D (the heads together), optional gate, output projection
        o = self.post_norm(rearrange(o.to(x.dtype), "b t h d -> b t (h d)"))  # (B, T, D)
        if self.g_proj is not None:
            o = F.gelu(self.g_proj(x), approximate="tanh") * o
        out = self.o_proj(o)
        pad = [None, None] * (2 - n)
        return out, TTTLayerState(*s.weights, *pad, *s.grads, *pad, s.pos)
