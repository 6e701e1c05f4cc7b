"""State normalisation: the gated delta rule with a bound on each sequence's state norm."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops import gated_delta_rule_normalised, gated_delta_rule_recurrent


def make(B=2, T=23, H=3, K=5, V=4, gate="scalar", beta=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, v, k = r(B, T, H, K), r(B, T, H, V), F.normalize(r(B, T, H, K), dim=-1)
    log_g = {None: None, "scalar": F.logsigmoid(r(B, T, H) + 4), "vector": F.logsigmoid(r(B, T, H, K) + 4)}[gate]
    b = None if beta is None else beta * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    return q, k, v, log_g, b, r(B, H, K, V)


def loop(q, k, v, log_g, beta, S, bound):
    """The definition written out: update, rescale when past the bound, read."""
    outs = []
    for t in range(q.shape[1]):
        if log_g is not None:
            g = log_g[:, t].exp()
            S = S * (g[..., None, None] if g.dim() == 2 else g[..., None])
        kt, vt = k[:, t], v[:, t]
        if beta is None:
            S = S + kt[..., :, None] * vt[..., None, :]
        else:
            err = vt - torch.einsum("bhk,bhkv->bhv", kt, S)
            S = S + beta[:, t, :, None, None] * kt[..., :, None] * err[..., None, :]
        for b in range(S.shape[0]):
            n = S[b].norm()
            if n > bound:
                S = torch.cat([S[:b], S[b:b + 1] * (bound / n), S[b + 1:]])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * q.shape[-1] ** -0.5)
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("gate, beta", [("scalar", None), ("vector", None), (None, 1.5)])
def test_equals_the_definition_and_bounds_every_state(gate, beta):
    q, k, v, log_g, b, S0 = make(gate=gate, beta=beta)
    bound = 0.5 * float(S0.flatten(1).norm(dim=1).min())  # the first token already passes it
    o, S = gated_delta_rule_normalised(q, k, v, log_g, b, None, bound, S0)
    o_ref, S_ref = loop(q, k, v, log_g, b, S0, bound)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S, S_ref, atol=1e-12, rtol=1e-12)
    assert torch.allclose(S.flatten(1).norm(dim=1), torch.full((2,), bound, dtype=torch.float64))
    plain, _ = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0)
    assert (o - plain).abs().max() > 1e-3  # the bound changed the outputs


def test_identity_below_the_bound():
    q, k, v, log_g, b, S0 = make()
    o, S = gated_delta_rule_normalised(q, k, v, log_g, b, None, 1e9, S0)
    o_ref, S_ref = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0)
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)


def test_chunking_law_and_packed_sequences():
    q, k, v, log_g, b, S0 = make(beta=1.0)
    args = lambda a, z: [x if x is None else x[:, a:z] for x in (q, k, v, log_g, b)]  # noqa: E731
    o, S = gated_delta_rule_normalised(*args(0, 23), None, 2.0, S0)
    o1, S1 = gated_delta_rule_normalised(*args(0, 9), None, 2.0, S0)
    o2, S2 = gated_delta_rule_normalised(*args(9, 23), None, 2.0, S1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=1e-12)
    # the two rows packed in one (B = 1) row: each sequence keeps its own state and bound
    packed = [x if x is None else torch.cat([x[0], x[1]])[None] for x in (q, k, v, log_g, b)]
    cu = torch.tensor([0, 23, 46])
    op, Sp = gated_delta_rule_normalised(*packed, None, 2.0, S0, cu_seqlens=cu)
    torch.testing.assert_close(op[0], torch.cat([o[0], o[1]]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(Sp, S, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_bound_is_named(bad):
    q, k, v, log_g, b, S0 = make()
    with pytest.raises(ValueError, match="max_norm"):
        gated_delta_rule_normalised(q, k, v, log_g, b, None, bad, S0)
