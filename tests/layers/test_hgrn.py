"""HGRN against its equations written as a loop over time (float64, random initial state)."""
import torch
import torch.nn.functional as F

import rnnlab


def _loop(layer, x, h):
    c = layer.config
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        f = c.lower_bound + (1 - c.lower_bound) * torch.sigmoid(xt @ layer.f_proj.weight.T)
        i = F.silu(xt @ layer.i_proj.weight.T) * (1 - f)
        h = f * h + i
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.norm_eps) * layer.g_norm.weight
        ys.append((normed * F.silu(xt @ layer.g_proj.weight.T)) @ layer.o_proj.weight.T)
    return torch.stack(ys, 1), h


def test_hgrn_matches_its_equations():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("hgrn", d_model=16, expand_ratio=2, lower_bound=0.3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    h0 = torch.randn(2, 32, dtype=torch.float64)
    y, st = layer(x, layer.state_cls(h=h0))
    y_ref, h_ref = _loop(layer, x, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(st.h, h_ref)


def test_lower_bound_rises_with_depth_in_a_model():
    model = rnnlab.build_model(layout="hgrn", n_layers=4, d_model=16)
    assert [b.mixer.config.lower_bound for b in model.blocks] == [0.0, 0.25, 0.5, 0.75]
    assert rnnlab.build_model(layout="hgrn(lower_bound=0.9)", n_layers=2, d_model=16).blocks[0].mixer.config.lower_bound == 0.9
