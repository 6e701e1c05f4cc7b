"""Prefix linear attention (JRT-RNN): the fast form against the reference loop in float64, with
random inputs, random encoder masks and random initial states — outputs, final states and the
gradients of every input; packed rows; the encoder is non-causal and reads only marked tokens."""
import pytest
import torch

from rnnlab.ops import tuning
from rnnlab.ops.prefix import (prefix_linear_attention, prefix_linear_attention_parallel,
                               prefix_linear_attention_recurrent, prefix_mask)

F64 = torch.float64


def inputs(B=2, T=37, H=2, K=4, V=3, seed=0, p=0.4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), k_enc=r(B, T, H, K), v_enc=r(B, T, H, V),
                in_prefix=torch.rand(B, T, generator=g, dtype=F64) < p, initial_state=r(B, H, K, V))


def run(fn, x, cu_seqlens=None):
    """fn's outputs and the gradients of a fixed random projection of them w.r.t. every float input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t.is_floating_point()}
    o, S = fn(**{**x, **leaves}, cu_seqlens=cu_seqlens)
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=F64)).sum() + (S * torch.randn(S.shape, generator=g, dtype=F64)).sum()
    return o, S, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.fixture
def small_chunks():
    with tuning.override(cpu={"delta.chunk_size": 8}):
        yield


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_parallel_equals_reference(p, small_chunks):
    x = inputs(p=p)
    o, S, g = run(prefix_linear_attention_parallel, x)
    o_ref, S_ref, g_ref = run(prefix_linear_attention_recurrent, x)
    print(f"prefix op (p={p}) parallel vs reference: max |do| {(o - o_ref).abs().max():.2e}, "
          f"|dS| {(S - S_ref).abs().max():.2e}, grads {max((g[n] - g_ref[n]).abs().max() for n in g):.2e}")
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], msg=lambda m, n=n: f"gradient of {n}: {m}")
    if p == 0.0:  # no encoder token: k_enc, v_enc get no gradient
        assert g["k_enc"].abs().max() == 0 and g["v_enc"].abs().max() == 0
    else:
        assert g["k_enc"].abs().max() > 0


def test_one_token_and_no_mask(small_chunks):
    x = inputs(T=1)
    o, S, _ = run(prefix_linear_attention, x)
    o_ref, S_ref, _ = run(prefix_linear_attention_recurrent, x)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    x = inputs()
    x["in_prefix"] = None  # plain causal linear attention
    o, S = prefix_linear_attention(**x)
    o_ref, S_ref = prefix_linear_attention_recurrent(**x)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def test_packed_equals_each_sequence_alone(small_chunks):
    lengths = [5, 0, 13, 19]
    cu = torch.tensor([0, 5, 5, 18, 37])
    x = inputs(B=1, T=37)
    x["initial_state"] = torch.randn(4, 2, 4, 3, dtype=F64)
    for fn in (prefix_linear_attention_parallel, prefix_linear_attention_recurrent):
        o, S, g = run(fn, x, cu)
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            xs = {k: (t[n:n + 1] if k == "initial_state" else t[:, a:b]) for k, t in x.items()}
            if b == a:
                finals.append(xs["initial_state"])
                continue
            on, Sn = prefix_linear_attention_recurrent(**xs)
            outs.append(on)
            finals.append(Sn)
        torch.testing.assert_close(o, torch.cat(outs, 1))
        torch.testing.assert_close(S, torch.cat(finals, 0))
    assert len(lengths) == S.shape[0]


def test_encoder_is_non_causal_and_reads_only_marked_tokens():
    x = inputs(B=1, T=12)
    x["in_prefix"] = torch.arange(12)[None] < 5  # a prefix of 5 tokens
    o, _ = prefix_linear_attention(**x)
    y = {k: t.clone() for k, t in x.items()}
    y["k_enc"][:, 4] += 1.0  # the last prefix token's encoder key changes every output, the first included
    o2, _ = prefix_linear_attention(**y)
    assert ((o2 - o).abs().amax((-1, -2)) > 0).all()
    z = {k: t.clone() for k, t in x.items()}
    z["k_enc"][:, 7] = float("nan")  # an unmarked token's encoder inputs are never read, even a NaN
    z["v_enc"][:, 9] = float("inf")
    o3, S3 = prefix_linear_attention(**z)
    assert torch.equal(o3, o) and torch.isfinite(S3).all()


def test_prefix_mask_per_row_and_per_sequence():
    m = prefix_mask(torch.tensor([2, 0, 4]), 3, 5)
    assert m.tolist() == [[True, True, False, False, False], [False] * 5, [True] * 4 + [False]]
    m = prefix_mask(torch.tensor([1, 0, 3]), 1, 7, [0, 2, 3, 7])
    assert m.tolist() == [[True, False, False, True, True, True, False]]


def test_bad_shapes_name_the_argument():
    x = inputs()
    with pytest.raises(ValueError, match="k_enc"):
        prefix_linear_attention(**{**x, "k_enc": x["k_enc"][:, :-1]})
    with pytest.raises(ValueError, match="v_enc"):
        prefix_linear_attention(**{**x, "v_enc": x["v_enc"][..., :-1]})
    with pytest.raises(ValueError, match="in_prefix"):
        prefix_linear_attention(**{**x, "in_prefix": x["in_prefix"].long()})
    with pytest.raises(ValueError, match="initial_state"):
        prefix_linear_attention(**{**x, "initial_state": x["initial_state"][:1]})
