"""Griffin's recurrent block against its equations written as a loop over time (float64)."""
import torch
import torch.nn.functional as F

import rnnlab


def _loop(layer, x, st):
    c = layer.config
    E, H, W = c.lru_width, c.num_heads, c.conv_size
    y = F.gelu(layer.linear_y(x), approximate="tanh")
    xs = torch.cat([st.conv, layer.linear_x(x)], dim=1)  # (B, W-1+T, E)
    h, started, outs = st.h, st.started, []
    w = layer.conv.conv.weight[:, 0]  # (E, W)
    for t in range(x.shape[1]):
        u = (xs[:, t:t + W] * w.T).sum(1) + layer.conv.conv.bias  # (B, E)
        ub = u.reshape(-1, H, E // H)
        gate = lambda w, b: torch.sigmoid(torch.einsum("bhe,hef->bhf", ub, w) + b).flatten(1)  # noqa: E731
        r = gate(layer.recurrent_gate_weight, layer.recurrent_gate_bias)
        i = gate(layer.input_gate_weight, layer.input_gate_bias)
        a = torch.sigmoid(-layer.rg_lru_recurrent_param) ** (c.c * r)  # a^(c r) with a = σ(-Λ') = exp(-softplus(Λ'))
        first = (started == 0)[:, None]
        h = torch.where(first, i * u, a * h + torch.sqrt(1 - a ** 2) * (i * u))
        started = torch.ones_like(started)
        outs.append(layer.linear_out(h * y[:, t]))
    return torch.stack(outs, 1), h


def test_rg_lru_matches_its_equations_with_and_without_a_start():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("rg_lru", d_model=16, num_heads=2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    fresh = layer.init_state(2, dtype=torch.float64)
    mid = layer.state_cls(h=torch.randn(2, 16, dtype=torch.float64), conv=torch.randn(2, 3, 16, dtype=torch.float64),
                          started=torch.tensor([1.0, 0.0], dtype=torch.float64))
    for st in (fresh, mid):
        with torch.no_grad():
            out, new = layer(x, st)
            ref, h = _loop(layer, x, st)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(new.h, h)
        assert new.started.tolist() == [1.0, 1.0]
