"""GateLoop against its complex recurrence written as a loop over time (complex128)."""
import torch
import torch.nn.functional as F
from einops import rearrange

import rnnlab


def _loop(layer, x, h):
    """h (B, H, K, V) complex: h_t = a_t ⊙ h_{t-1} + k_t v_t^T, o_t = Re(h_t^T q_t) / sqrt(K)."""
    c = layer.config
    H, K = c.num_heads, c.d_model // c.num_heads
    heads = lambda t: rearrange(t, "b (h d) -> b h d", h=H)  # noqa: E731
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        q, k, v = heads(layer.q_proj(xt)), heads(layer.k_proj(xt)), heads(layer.v_proj(xt))
        mag = torch.sigmoid(heads(layer.a_proj(xt))) ** (1 / c.gate_logit_normalizer)
        a = mag * torch.exp(1j * heads(layer.theta_proj(xt)))  # (B, H, K) complex
        h = a[..., None] * h + k[..., None].to(h.dtype) * v[..., None, :].to(h.dtype)
        o = torch.einsum("bhkv,bhk->bhv", h, q.to(h.dtype)).real / K ** 0.5  # (B, H, V)
        o = layer.g_norm(o) * F.silu(heads(layer.g_proj(xt)))
        outs.append(layer.o_proj(rearrange(o, "b h v -> b (h v)")))
    return torch.stack(outs, 1), h


def test_gateloop_matches_its_complex_recurrence():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("gateloop", d_model=16, num_heads=2, gate_logit_normalizer=2.0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # phases of order one radian per token
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    h0 = torch.randn(2, 2, 8, 8, dtype=torch.complex128)
    state = layer.state_cls(h=torch.stack([h0.real, h0.imag], dim=2))
    with torch.no_grad():
        y, st = layer(x, state)
        y_ref, h_ref = _loop(layer, x, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(st.h[:, :, 0] + 1j * st.h[:, :, 1], h_ref)
