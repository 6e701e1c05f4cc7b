"""Family B: the chunked gated delta rule equals its reference loop (float64, random states)."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops import (gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent,
                        gated_delta_rule_step)


def make(B=2, T=37, H=3, K=5, V=4, gate=None, beta=None, dtype=torch.float64, seed=0, k_norm=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, v = r(B, T, H, K), r(B, T, H, V)
    k = F.normalize(r(B, T, H, K), dim=-1) * k_norm
    log_g = {None: None, "scalar": F.logsigmoid(r(B, T, H) + 2), "vector": F.logsigmoid(r(B, T, H, K) + 2)}[gate]
    b = None if beta is None else beta * torch.rand(B, T, H, generator=g, dtype=dtype)
    S0 = r(B, H, K, V)
    return q, k, v, log_g, b, S0


def _grads(fn, args, cot_o, cot_s):
    args = [None if a is None else a.detach().requires_grad_() for a in args]
    o, S = fn(*args)
    torch.autograd.backward([o, S], [cot_o, cot_s])
    return o, S, [None if a is None else a.grad for a in args]


def _assert_same(o1, S1, g1, o2, S2, g2):
    """The second run's outputs, final state and gradients equal the first's (float64 tolerances)."""
    torch.testing.assert_close(o2, o1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S2, S1, atol=1e-10, rtol=1e-10)
    for name, a, b_ in zip(["q", "k", "v", "log_g", "beta", "initial_state"], g1, g2):
        if a is not None:
            torch.testing.assert_close(b_, a, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


GATES = [None, "scalar", "vector"]
BETAS = [None, 1.0, 2.0]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("T", [1, 16, 37])
@pytest.mark.parametrize("chunk", [8, 32])  # 32: vector decays take the sub-chunked path (4 sub-chunks of 8)
@pytest.mark.parametrize("guarded", [False, True])  # True: the path taken when an input may be non-finite
def test_chunked_equals_reference_with_gradients(gate, beta, T, chunk, guarded, monkeypatch):
    if guarded:
        monkeypatch.setattr("rnnlab.ops.delta.known_finite", lambda *xs: False)
    q, k, v, log_g, b, S0 = make(T=T, gate=gate, beta=beta)
    cot_o, cot_s = torch.randn(2, T, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    args = [q, k, v, log_g, b]
    ref = lambda q, k, v, g, b, s: gated_delta_rule_recurrent(q, k, v, g, b, None, s)  # noqa: E731
    fast = lambda q, k, v, g, b, s: gated_delta_rule_chunked(q, k, v, g, b, None, s, chunk_size=chunk)  # noqa: E731
    o1, S1, g1 = _grads(ref, args + [S0], cot_o, cot_s)
    o2, S2, g2 = _grads(fast, args + [S0], cot_o, cot_s)
    _assert_same(o1, S1, g1, o2, S2, g2)


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_tiny(gate):
    q, k, v, log_g, b, S0 = make(B=1, T=5, H=1, K=3, V=2, gate=gate, beta=1.5)
    args = [t.requires_grad_() for t in (q, k, v, b, S0)] + ([] if log_g is None else [log_g.requires_grad_()])
    def f(q, k, v, b, S0, *lg):
        return gated_delta_rule_chunked(q, k, v, lg[0] if lg else None, b, None, S0, chunk_size=2)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("gate", GATES)
def test_chunk_size_and_splitting_do_not_change_the_result(gate):
    q, k, v, log_g, b, S0 = make(T=50, gate=gate, beta=1.0)
    o, S = gated_delta_rule(q, k, v, log_g, b, None, S0)
    for C in (1, 3, 16, 64, 128):
        o2, S2 = gated_delta_rule_chunked(q, k, v, log_g, b, None, S0, chunk_size=C)
        torch.testing.assert_close(o2, o)
        torch.testing.assert_close(S2, S)
    cut = 19
    sl = lambda x, a, z: None if x is None else x[:, a:z]  # noqa: E731
    oa, Sa = gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], sl(log_g, 0, cut), sl(b, 0, cut), None, S0)
    ob, Sb = gated_delta_rule(q[:, cut:], k[:, cut:], v[:, cut:], sl(log_g, cut, None), sl(b, cut, None), None, Sa)
    torch.testing.assert_close(torch.cat([oa, ob], 1), o)
    torch.testing.assert_close(Sb, S)


def test_step_equals_one_token_of_the_reference():
    q, k, v, log_g, b, S0 = make(T=1, gate="vector", beta=2.0)
    o, S = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], b[:, 0], None, S0)
    o_ref, S_ref = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0)
    torch.testing.assert_close(o, o_ref[:, 0])
    torch.testing.assert_close(S, S_ref)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("extreme", ["decay_zero", "decay_one", "beta_zero", "beta_two", "large_k"])
def test_extremes_are_finite_and_exact(gate, extreme):
    q, k, v, log_g, b, S0 = make(T=70, gate=gate, beta=1.0, seed=3)
    if extreme == "decay_zero":
        log_g = torch.full_like(log_g, -30.0)
    elif extreme == "decay_one":
        log_g = torch.full_like(log_g, -1e-6)
    elif extreme == "beta_zero":
        b = torch.full_like(b, 1e-6)
    elif extreme == "beta_two":
        b = torch.full_like(b, 2.0 - 1e-6)
    else:  # large |k| without the delta term (with it, |k|^2 beta must stay < 2 for stability)
        q, k, v, log_g, _, S0 = make(T=70, gate=gate, beta=None, seed=3, k_norm=10.0)
        b = None
    o, S = gated_delta_rule(q, k, v, log_g, b, None, S0)
    o_ref, S_ref = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(S, S_ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs_stay_close(dtype, tol):
    q, k, v, log_g, b, S0 = make(T=100, gate="scalar", beta=1.0)
    o_ref, S_ref = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0)
    cast = [x.to(dtype) for x in (q, k, v, log_g, b)]
    o, S = gated_delta_rule(*cast, None, S0.float())
    assert o.dtype == dtype and S.dtype == torch.float32
    rel = (o.double() - o_ref).norm() / o_ref.norm()
    assert rel < tol, f"{dtype}: relative error {rel:.2e}"


def test_bad_shapes_name_the_argument():
    q, k, v, log_g, b, S0 = make(gate="scalar", beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q, k, v, log_g, b[..., :1], None, S0)
    with pytest.raises(ValueError, match="log_g"):
        gated_delta_rule(q, k, v, log_g[:, :, :1], b, None, S0)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, log_g, b, None, S0[:1])
    with pytest.raises(ValueError, match="v must"):
        gated_delta_rule(q, k, v[:, :3], log_g, b, None, S0)


NAN_CASES = [(gate, beta, where) for gate in GATES for beta in (None, 1.0) for where in ("q", "k", "v", "log_g", "beta")
             if not (where == "log_g" and gate is None) and not (where == "beta" and beta is None)]


@pytest.mark.parametrize("gate,beta,where", NAN_CASES)
def test_a_nan_never_reaches_earlier_tokens(gate, beta, where):
    """Masks are selections: a NaN at token 30 leaves tokens 0..29 finite and exact (chunks of 64)."""
    q, k, v, log_g, b, S0 = make(T=70, gate=gate, beta=beta)
    args = dict(q=q, k=k, v=v, log_g=log_g, beta=b)
    clean, _ = gated_delta_rule_recurrent(**args, initial_state=S0)
    args[where] = args[where].clone()
    args[where][:, 30] = float("nan")
    o, S = gated_delta_rule_chunked(**args, initial_state=S0, chunk_size=64)
    assert torch.isfinite(o[:, :30]).all()
    torch.testing.assert_close(o[:, :30], clean[:, :30])
    assert not torch.isfinite(o[:, 30]).all()  # the NaN itself is not hidden


def test_cu_seqlens_with_one_token_runs_the_packed_form():
    """T = 1 with cu_seqlens (a sequence of one token and empty ones) is not the one-row step."""
    q, k, v, log_g, b, S0 = make(B=1, T=1, gate="scalar", beta=1.0)
    S0 = torch.randn(3, *S0.shape[1:], dtype=S0.dtype)
    cu = torch.tensor([0, 0, 1, 1])
    o, S = gated_delta_rule(q, k, v, log_g, b, None, S0, cu_seqlens=cu)
    o1, S1 = gated_delta_rule_recurrent(q, k, v, log_g, b, None, S0[1:2])
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(S, torch.cat([S0[:1], S1, S0[2:]]))


@pytest.mark.parametrize("vector", [False, True])
def test_blocks_of_tokens_equal_one_call(vector):
    """Long rows run in blocks (tuning 'delta.block_tokens'): outputs, state and gradients equal the loop."""
    from rnnlab.ops import tuning
    from rnnlab.ops.delta import gated_delta_rule_chunked, gated_delta_rule_recurrent
    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 150, 2, 8, 6
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), torch.nn.functional.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V)
    log_g = torch.nn.functional.logsigmoid(r(B, T, H, K) if vector else r(B, T, H)) / 4
    beta, S0 = torch.rand(B, T, H, generator=g, dtype=torch.float64), r(B, H, K, V)
    ins = [t.requires_grad_() for t in (q, k, v, log_g, beta, S0)]
    o1, s1 = gated_delta_rule_recurrent(*ins[:5], initial_state=ins[5])
    g1 = torch.autograd.grad((o1.sum() + s1.sum()), ins)
    with tuning.override(cpu={"delta.block_tokens": 40}, cuda={"delta.block_tokens": 40}):
        o2, s2 = gated_delta_rule_chunked(*ins[:5], initial_state=ins[5], chunk_size=16)
    g2 = torch.autograd.grad((o2.sum() + s2.sum()), ins)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(s2, s1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_known_finite_sees_every_non_finite_value():
    from rnnlab.ops.bounds import known_finite
    x = torch.randn(4, 5)
    assert known_finite(x, None, x.double())
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not known_finite(x, y)
    assert not known_finite(torch.full((3,), 3e38))  # an overflowing sum: the guarded path, never a wrong one
    assert not known_finite(x, torch.empty(3, device="meta"))  # off the CPU: no look at the values at all


SCORES = {"scalar": "_scalar_scores", "vector": "_vector_scores"}  # each gate's path without factored decays


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("per_token, factored", [(0.5, True), (60.0, False)])
@pytest.mark.parametrize("beta", [None, 1.0])
def test_decay_scores_are_factored_only_within_range(gate, per_token, factored, beta, monkeypatch):
    """Finite inputs whose cumulative log-decays within a chunk stay inside the dtype's range
    (float64: |c| <= 600) get their scores as (x_t e^c_t) . (k_s e^-c_s), two matmuls; past it
    (60 per token over chunks of 32) the masked decay matrix. Both equal the loop, gradients too."""
    from rnnlab.ops import delta
    calls = []
    original = getattr(delta, SCORES[gate])
    monkeypatch.setattr(delta, SCORES[gate], lambda *a: calls.append(1) or original(*a))
    q, k, v, log_g, b, S0 = make(T=70, gate=gate, beta=beta, seed=5)
    log_g = -per_token * (0.5 + torch.rand(log_g.shape, generator=torch.Generator().manual_seed(1), dtype=log_g.dtype))
    cot_o, cot_s = torch.randn(2, 70, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    ref = lambda q, k, v, g, b, s: gated_delta_rule_recurrent(q, k, v, g, b, None, s)  # noqa: E731
    fast = lambda q, k, v, g, b, s: gated_delta_rule_chunked(q, k, v, g, b, None, s, chunk_size=32)  # noqa: E731
    o1, S1, g1 = _grads(ref, [q, k, v, log_g, b, S0], cot_o, cot_s)
    o2, S2, g2 = _grads(fast, [q, k, v, log_g, b, S0], cot_o, cot_s)
    assert bool(calls) != factored
    _assert_same(o1, S1, g1, o2, S2, g2)


def test_chunks_are_no_longer_than_the_key_size():
    """Small heads get short chunks (the (C, C) work would outweigh the (K, V) work): C = K within
    [delta.chunk_min, delta.chunk_size]; a vector decay keeps gla.chunk_size."""
    from rnnlab.ops import tuning
    from rnnlab.ops.delta import _chunk_size
    sizes = {K: _chunk_size(torch.zeros(1, 1, 1, K), vector=False) for K in (4, 8, 16, 32, 64, 128)}
    assert sizes == {4: 16, 8: 16, 16: 16, 32: 32, 64: 64, 128: 64}
    assert _chunk_size(torch.zeros(1, 1, 1, 8), vector=True) == tuning.get("gla.chunk_size", "cpu")


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("per_token", [0.05, 1.0, 3.0])  # 3.0: decays spanning ~48 either side of the middle
@pytest.mark.parametrize("beta", [None, 1.0])
def test_factored_scores_in_float32_stay_close(gate, per_token, beta, monkeypatch):
    """In float32 the factored scores multiply factors up to e^60 (the products above the diagonal
    overflow and are masked at once, or beta's gradient turns NaN); outputs, final state and
    gradients stay as close to the float64 loop as float32 allows, up to the strongest decays
    that still factor."""
    from rnnlab.ops import delta
    monkeypatch.setattr(delta, SCORES[gate], lambda *a: pytest.fail("the scores did not factor"))
    q, k, v, log_g, b, S0 = make(T=100, gate=gate, beta=beta, seed=7)
    log_g = -per_token * (0.5 + torch.rand(log_g.shape, generator=torch.Generator().manual_seed(2), dtype=log_g.dtype))
    cot = torch.randn(2, 100, 3, 4, dtype=torch.float64)
    ref = _grads(lambda *a: gated_delta_rule_recurrent(*a[:5], None, a[5]), [q, k, v, log_g, b, S0], cot, S0 * 0)
    got = _grads(lambda *a: gated_delta_rule_chunked(*a[:5], None, a[5], chunk_size=32),
                 [x if x is None else x.float() for x in (q, k, v, log_g, b, S0)], cot.float(), S0.float() * 0)
    rel = lambda a, r: ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()  # noqa: E731
    assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5
    for name, g_ref, g in zip(["q", "k", "v", "log_g", "beta", "initial_state"], ref[2], got[2]):
        if g_ref is not None:
            assert rel(g, g_ref) < 1e-4, f"gradient of {name}: {rel(g, g_ref):.1e}"


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("beta", [None, 1.0])
@pytest.mark.parametrize("guarded", [False, True])
def test_packed_chunked_equals_reference_with_gradients(gate, beta, guarded, monkeypatch):
    """Packed sequences (one empty) through the chunked form, whose state pass across chunks has
    its backward written out on finite inputs: outputs, final states and every gradient, the
    initial states' included, equal the loop's."""
    if guarded:
        monkeypatch.setattr("rnnlab.ops.delta.known_finite", lambda *xs: False)
    cu = torch.tensor([0, 11, 11, 27, 40])
    q, k, v, log_g, b, _ = make(B=1, T=40, gate=gate, beta=beta)
    S0 = torch.randn(4, 3, 5, 4, dtype=torch.float64)
    cot_o, cot_s = torch.randn(1, 40, 3, 4, dtype=torch.float64), torch.randn(4, 3, 5, 4, dtype=torch.float64)
    ref = lambda q, k, v, g, b, s: gated_delta_rule_recurrent(q, k, v, g, b, None, s, cu_seqlens=cu)  # noqa: E731
    fast = lambda q, k, v, g, b, s: gated_delta_rule_chunked(q, k, v, g, b, None, s, chunk_size=8,  # noqa: E731
                                                             cu_seqlens=cu)
    o1, S1, g1 = _grads(ref, [q, k, v, log_g, b, S0], cot_o, cot_s)
    o2, S2, g2 = _grads(fast, [q, k, v, log_g, b, S0], cot_o, cot_s)
    _assert_same(o1, S1, g1, o2, S2, g2)


def test_a_dropped_result_frees_its_graph_without_the_garbage_collector():
    """What the backward of the chunked form keeps holds no tensor of its results: no reference
    cycle, so the saved activations go as soon as the results do (not at the next gc pass)."""
    import gc
    import weakref
    q, k, v, log_g, b, S0 = make(B=1, T=37, gate="scalar", beta=1.0)
    gc.disable()
    try:
        o, S = gated_delta_rule_chunked(q.requires_grad_(), k, v, log_g, b, None, S0, chunk_size=8)
        alive = weakref.ref(S)
        del o, S
        assert alive() is None
    finally:
        gc.enable()
