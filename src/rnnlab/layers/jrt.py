"""JRT-RNN's prefix linear attention: the prompt read non-causally, then causal decoding.

Arora et al. 2024, "Just read twice: closing the recall gap for recurrent language models"
(arXiv:2407.05483), section 4. With the prompt's first P tokens as the prefix, Based's Taylor
feature map φ (:func:`rnnlab.layers.based.taylor_features`) and separate encoder projections
``k_enc``, ``v_enc`` read only over the prefix, per head:

    o_i = φ(q_i)^T (Σ_{j<=i} φ(k_j) v_j^T + Σ_{j<P} φ(k_enc_j) v_enc_j^T)
          / (φ(q_i)^T (Σ_{j<=i} φ(k_j) + Σ_{j<P} φ(k_enc_j)) + eps)

so every prefix token sees every prefix token (through the encoder sum), and after the prefix the
state is that of normalised linear attention started from the encoder sum: decoding continues
causally (op: :func:`rnnlab.ops.prefix.prefix_linear_attention`). State per head: (1 + F + F²) x
(V + 1), as Based's.

**The prefix in the contract.** ``y, state = layer(x, state, prefix_len=P)``: the first P tokens of
x (of each row, or of each sequence with ``cu_seqlens``; P an int or one per row) are the prefix,
and their encoder sum is added to the state. The prefix must come in one call; after it the
chunking law holds as for any mixer (feed the rest in any pieces with the returned state). Without
a prefix (None or 0) the layer is Based's causal linear attention with its own weights. Models
pass ``prefix_len`` to every block and the other mixers ignore it
(:meth:`rnnlab.layers.base.Mixer.forward`).

Defaults follow the reference's ``PrefixLinearAttention`` (HazyResearch/prefix-linear-attention,
``based/models/mixers/prefix_linear_attention.py``): feature dim 16, V = D / H, no biases. The
paper's JRT-RNN interleaves this layer with sliding-window attention and short convolutions, which
here is a layout (e.g. ``"jrt,swa(window=64)"``). Init as Based's reference model init
(HazyResearch/based, on which the JRT-RNN code builds): every projection N(0, 0.02).

rnnlab differs from the reference in: eps = 1e-6 in the normaliser (the reference: 1e-12, Based
here: 1e-6), the full F² quadratic features (as Based here), no padding mask (``cu_seqlens``
packs ragged prompts instead), and the prefix length is given per call, not fixed in the config
(the reference's ``enc_length``).

Dimension letters: B batch, T tokens, D model width, H heads, F feature dim, V value head dim,
P prefix length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..ops.bounds import check_cu_seqlens
from ..ops.prefix import prefix_linear_attention, prefix_mask
from .base import state_batch
from .based import Based, BasedConfig, taylor_features
from .common import normalised, with_normaliser
from .linear_attention import MatrixState

__all__ = ["JRTConfig", "JRT"]


@dataclass
class JRTConfig(BasedConfig):
    """Based's fields (heads H, feature dim F, eps); the prefix length is an argument of each call."""


class JRT(Based):
    """Prefix linear attention of JRT-RNN (see module docstring): Based with encoder keys and values."""

    config_cls = JRTConfig
    reads_prefix = True

    def build(self, c: JRTConfig) -> None:
        super().build(c)
        self.k_enc_proj = nn.Linear(c.d_model, c.num_heads * c.feature_dim, bias=False)  # encoder keys
        self.v_enc_proj = nn.Linear(c.d_model, c.d_model, bias=False)  # encoder values

    def _keys_values(self, x, k_proj, v_proj, acc):
        """φ(k) (B, T, H, 1+F+F²) and [v, 1] (B, T, H, V+1) of x (B, T, D) by the given projections."""
        H = self.config.num_heads
        k = taylor_features(rearrange(k_proj(x), "b t (h f) -> b t h f", h=H).to(acc))  # (B, T, H, 1+F+F²)
        v = rearrange(v_proj(x), "b t (h v) -> b t h v", h=H).to(acc)  # (B, T, H, V)
        return k, with_normaliser(v)  # last column sums φ(k)

    def mix(self, x, state, cu_seqlens=None, prefix_len=None):
        c = self.config
        B, T, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        q = taylor_features(rearrange(self.q_proj(x), "b t (h f) -> b t h f", h=c.num_heads).to(acc))
        k, v = self._keys_values(x, self.k_proj, self.v_proj, acc)
        # the encoder: keys and values of the prefix tokens (the others are masked out by the op)
        in_prefix, k_enc, v_enc = None, k, v
        if prefix_len is not None and bool(prefix_len.any()):
            cu = check_cu_seqlens(cu_seqlens, B, T)
            in_prefix = prefix_mask(prefix_len.to(x.device), B, T, cu)  # (B, T)
            n = T if cu is not None else int(prefix_len.max())  # without packing, only the first P tokens
            k_enc, v_enc = self._keys_values(x[:, :n], self.k_enc_proj, self.v_enc_proj, acc)  # (B, n, H, .)
            pad = (0, 0, 0, 0, 0, T - n)
            k_enc, v_enc = nn.functional.pad(k_enc, pad), nn.functional.pad(v_enc, pad)  # (B, T, H, .)
        o, S = prefix_linear_attention(q, k, v, k_enc, v_enc, in_prefix, scale=1.0, initial_state=st.S,
                                       cu_seqlens=cu_seqlens)  # (B, T, H, V+1)
        o = normalised(o, c.eps)  # (B, T, H, V)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), MatrixState(S=S)
