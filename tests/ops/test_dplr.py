"""The RWKV op families beyond the registry's generic checks (tests/ops/test_registry.py compares
every fast form with its reference, packed rows and NaNs included): the DPLR recurrence contains
the delta rule and GLA, RWKV-6's op is GLA read before the write, and the chunked forms stay exact
across chunk and sub-chunk sizes and with the decays RWKV-7 and RWKV-6 produce."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from rnnlab.ops import registry, tuning

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_dplr_with_a_minus_beta_k_and_b_k_is_the_gated_delta_rule():
    """g = 1, a = -beta k, b = k and the written key beta k: ``(I - beta k k^T) S + beta k v^T``,
    DeltaNet's update (beta in (0, 2): negative eigenvalues included)."""
    B, T, H, K, V = 2, 29, 2, 4, 3
    q, k, v, S0 = _randn(B, T, H, K, seed=1), F.normalize(_randn(B, T, H, K, seed=2), dim=-1), \
        _randn(B, T, H, V, seed=3), _randn(B, H, K, V, seed=4)
    beta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=F64) * 2
    want_o, want_S = rnnlab.ops.gated_delta_rule_recurrent(q, k, v, beta=beta, initial_state=S0)
    a, b = -beta[..., None] * k, k
    for fn in (rnnlab.ops.dplr_recurrent, rnnlab.ops.dplr_chunked):
        # the delta rule writes beta k v^T: fold beta into the key
        o, S = fn(q, beta[..., None] * k, v, torch.zeros_like(q), a, b, initial_state=S0)
        torch.testing.assert_close(o, want_o)
        torch.testing.assert_close(S, want_S)


def test_dplr_without_the_low_rank_term_is_gla():
    fam = registry.get_family("gla")
    x = fam.inputs(B=2, T=23, H=2, K=4, V=3, dtype=F64, seed=7)
    want_o, want_S = rnnlab.ops.gated_delta_rule_recurrent(**x)
    zero = torch.zeros_like(x["q"])
    o, S = rnnlab.ops.dplr_chunked(x["q"], x["k"], x["v"], x["log_g"], zero, zero, initial_state=x["initial_state"])
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(S, want_S)


def test_rwkv6_reads_the_state_before_the_write():
    """o_t = GLA's read of S_{t-1} plus the bonus: with u = 0 and the queries of one token later,
    GLA's outputs are RWKV-6's shifted by one token."""
    fam = registry.get_family("rwkv6")
    x = fam.inputs(B=2, T=17, H=2, K=4, V=3, dtype=F64, seed=8)
    o, S = rnnlab.ops.rwkv6_recurrent(**{**x, "u": torch.zeros_like(x["u"])})
    gla_o, gla_S = rnnlab.ops.gated_delta_rule_recurrent(x["q"][:, 1:], x["k"][:, :-1], x["v"][:, :-1],
                                                         x["log_g"][:, :-1], initial_state=x["initial_state"])
    torch.testing.assert_close(o[:, 1:], gla_o)
    scale = x["q"].shape[-1] ** -0.5
    torch.testing.assert_close(o[:, 0], scale * torch.einsum("bhk,bhkv->bhv", x["q"][:, 0], x["initial_state"]))
    assert not torch.allclose(S, gla_S)  # the last token's write is in S, not in gla_S
    with_bonus, _ = rnnlab.ops.rwkv6_recurrent(**x)
    bonus = scale * (x["q"] * x["u"] * x["k"]).sum(-1, keepdim=True) * x["v"]
    torch.testing.assert_close(with_bonus, o + bonus)


@pytest.mark.parametrize("C,sub", [(8, 8), (16, 4), (32, 8), (64, 16), (48, 16)])
@pytest.mark.parametrize("name", ["dplr", "rwkv6"])
def test_chunked_exact_across_chunk_sizes(name, C, sub):
    """Outputs, final state and every input's gradient against the reference, float64; T = 100 is
    not a multiple of any chunk size, and K = 8 with sub-chunks of 4 to 16 tokens."""
    fam = registry.get_family(name)
    x = fam.inputs(B=2, T=100, H=2, K=8, V=5, dtype=F64, seed=C + sub)
    results = []
    with tuning.override(cpu={"dplr.chunk_size": C, "dplr.sub_chunk": sub, "gla.chunk_size": C, "gla.sub_chunk": sub}):
        for fn in (fam.fast["chunked"], fam.reference):
            xg, leaves = registry.with_grad(fam, x)
            o, S = fn(**xg)
            g = torch.Generator().manual_seed(0)
            cot = lambda t: torch.randn(t.shape, generator=g, dtype=F64)  # noqa: E731
            loss = (o * cot(o)).sum() + (S * cot(S)).sum()
            results.append((o, S, torch.autograd.grad(loss, leaves)))
    (o1, S1, g1), (o2, S2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S1, S2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dplr_float32_stays_close_with_rwkv7_decays_over_long_rows():
    """RWKV-7's decay (log w in (-e^-0.5, 0)) and learning rates near 1 over 512 tokens: the
    chunked form in float32 against the float64 reference."""
    B, T, H, K = 1, 512, 2, 16
    kappa = F.normalize(_randn(B, T, H, K, seed=1), dim=-1)
    alpha = torch.sigmoid(_randn(B, T, H, K, seed=2) + 3)
    x = dict(q=_randn(B, T, H, K, seed=3), k=_randn(B, T, H, K, seed=4) / 4, v=_randn(B, T, H, K, seed=5),
             log_g=-0.6065306597126334 * torch.sigmoid(_randn(B, T, H, K, seed=6)), a=-kappa, b=kappa * alpha,
             initial_state=_randn(B, H, K, K, seed=7))
    want_o, want_S = rnnlab.ops.dplr_recurrent(**x)
    o, S = rnnlab.ops.dplr(**registry.cast(x, torch.float32))
    assert o.dtype == torch.float32
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(o, want_o) < 1e-5 and rel(S, want_S) < 1e-5, (rel(o, want_o), rel(S, want_S))


def test_bad_shapes_name_the_argument():
    x = registry.get_family("dplr").inputs(T=5)
    with pytest.raises(ValueError, match="b must be"):
        rnnlab.ops.dplr(**{**x, "b": x["b"][..., :2]})
    with pytest.raises(ValueError, match="initial_state must be"):
        rnnlab.ops.dplr_chunked(**{**x, "initial_state": x["initial_state"][:1]})
    y = registry.get_family("rwkv6").inputs(T=5)
    with pytest.raises(ValueError, match="u must be"):
        rnnlab.ops.rwkv6(**{**y, "u": y["u"][0]})
    with pytest.raises(ValueError, match="log_g must be"):
        rnnlab.ops.rwkv6_chunked(**{**y, "log_g": y["log_g"][..., 0]})


@pytest.mark.parametrize("per_token, factored", [(0.5, True), (60.0, False)])
def test_scores_are_factored_only_within_range(per_token, factored, monkeypatch):
    """Finite inputs whose cumulative log-decays stay within float64's range for e^c and e^-c get
    their scores as matmuls; strong decays (60 per token over chunks of 32) the masked decay
    tensor. Both equal the loop, gradients included."""
    import importlib
    dplr = importlib.import_module("rnnlab.ops.dplr")  # the module, not the function of that name
    calls = []
    original = dplr._scores
    monkeypatch.setattr(dplr, "_scores", lambda *a: calls.append(1) or original(*a))
    fam = registry.get_family("dplr")
    x = fam.inputs(B=2, T=70, H=2, K=4, V=3, dtype=F64, seed=3)
    x["log_g"] = -per_token * (0.5 + torch.rand(x["log_g"].shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    leaves = {n: t.detach().requires_grad_() for n, t in x.items() if isinstance(t, torch.Tensor)}
    results = []
    for fn in (rnnlab.ops.dplr_recurrent, rnnlab.ops.dplr_chunked):
        o, S = fn(**{**x, **leaves})
        grads = torch.autograd.grad(o.sum() + (S * S).sum(), list(leaves.values()))
        results.append((o, S, grads))
    assert bool(calls) != factored
    (o1, S1, g1), (o2, S2, g2) = results
    torch.testing.assert_close(o2, o1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S2, S1, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(leaves, g1, g2):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")
