"""JRT-RNN's prefix linear attention against a token-by-token transcription of the paper's equation;
the prefix contract (non-causal prefix, chunking law after it, ignored by the other mixers)."""
import pytest
import torch

import rnnlab
from rnnlab.layers.based import taylor_features
from rnnlab.layers.linear_attention import MatrixState
from rnnlab.ops import tuning


@pytest.fixture
def small_chunks():
    """Chunks of 16 tokens in the op, so the sequences below span several chunks."""
    with tuning.override(cpu={"delta.chunk_size": 16}):
        yield


def layer_f64(**kw):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("jrt", d_model=16, num_heads=2, feature_dim=4, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def transcription(layer, x, P, S0):
    """Arora et al. 2024, prefix linear attention, token by token: for token i,
    num_i = Σ_{j<=i} (φ(q_i)·φ(k_j)) v_j + Σ_{j<P} (φ(q_i)·φ(k_enc_j)) v_enc_j (+ φ(q_i)^T S0 for the
    state carried in), den_i likewise with 1 in place of v; o_i = num_i / (den_i + eps).
    The final state is S0 + Σ_{j<P} φ(k_enc_j) [v_enc_j, 1]^T + Σ_j φ(k_j) [v_j, 1]^T."""
    c = layer.config
    B, T, _ = x.shape
    H, V = c.num_heads, c.d_model // c.num_heads
    phi = lambda proj, t: taylor_features(proj(x[:, t]).view(B, H, c.feature_dim))  # noqa: E731
    val = lambda proj, t: proj(x[:, t]).view(B, H, V)  # noqa: E731
    ys = []
    for i in range(T):
        q = phi(layer.q_proj, i)  # (B, H, F')
        num = torch.einsum("bhf,bhfv->bhv", q, S0[..., :V])
        den = torch.einsum("bhf,bhf->bh", q, S0[..., V])
        for j in range(i + 1):  # causal: the tokens up to i
            a = (q * phi(layer.k_proj, j)).sum(-1)  # (B, H)
            num, den = num + a[..., None] * val(layer.v_proj, j), den + a
        for j in range(P):  # the encoder: every prefix token, before and after i
            a = (q * phi(layer.k_enc_proj, j)).sum(-1)
            num, den = num + a[..., None] * val(layer.v_enc_proj, j), den + a
        ys.append(layer.o_proj((num / (den[..., None] + c.eps)).reshape(B, H * V)))
    S = S0.clone()
    ones = torch.ones(B, H, 1, dtype=x.dtype)
    for j in range(P):
        S = S + phi(layer.k_enc_proj, j)[..., None] * torch.cat([val(layer.v_enc_proj, j), ones], -1)[..., None, :]
    for j in range(T):
        S = S + phi(layer.k_proj, j)[..., None] * torch.cat([val(layer.v_proj, j), ones], -1)[..., None, :]
    return torch.stack(ys, 1), S


def random_state(layer, B):
    S = layer.init_state(B, dtype=torch.float64).S
    S = torch.randn_like(S).abs() * 0.1  # a plausible carried-in state: positive normaliser column
    return S


@pytest.mark.parametrize("P", [0, 1, 9, 30])
def test_matches_paper_equations(P, small_chunks):
    layer = layer_f64()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    S0 = random_state(layer, 2)
    y, state = layer(x, MatrixState(S=S0), prefix_len=P)
    y_ref, S_ref = transcription(layer, x, P, S0)
    dy, dS = (y - y_ref).abs().max().item(), (state.S - S_ref).abs().max().item()
    print(f"jrt(prefix_len={P}) vs paper equations: max |dy| {dy:.2e}, max |dS| {dS:.2e}")
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(state.S, S_ref, atol=1e-10, rtol=1e-8)
    w = torch.randn_like(y)
    params = list(layer.parameters())
    g = torch.autograd.grad((y * w).sum() + state.S.sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * w).sum() + S_ref.sum(), params, allow_unused=True)
    for (name, p), a, b in zip(layer.named_parameters(), g, g_ref):
        a, b = (torch.zeros_like(p) if t is None else t for t in (a, b))
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_prefix_outputs_are_the_non_causal_read_of_the_prefix():
    """Prefix tokens see later prefix tokens (through the encoder); no token sees a later non-prefix token."""
    layer = layer_f64()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    P = 8
    y, _ = layer(x, prefix_len=P)
    x2 = x.clone()
    x2[:, P - 1] += 1.0  # the last prefix token
    y2, _ = layer(x2, prefix_len=P)
    assert ((y2 - y).abs().amax(-1) > 1e-6).all(), "every output, the first included, reads the whole prefix"
    x3 = x.clone()
    x3[:, 12] += 1.0  # a token after the prefix
    y3, _ = layer(x3, prefix_len=P)
    assert torch.equal(y3[:, :12], y[:, :12]) and (y3[:, 12:] != y[:, 12:]).any()


@pytest.mark.parametrize("first", [8, 11, 30])
def test_after_the_prefix_any_split_gives_the_same(first, small_chunks):
    layer = layer_f64()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    y, s = layer(x, prefix_len=[8, 5])  # one prefix length per row
    for cuts in ([first], [first, first + 1], [first, 17, 23], [first] + list(range(first + 1, 30))):
        cuts = [c for c in cuts if c < 30]
        ys, st, prev = [], None, 0
        for n, c in enumerate(cuts + [30]):
            yi, st = layer(x[:, prev:c], st, prefix_len=[8, 5] if n == 0 else None)
            ys.append(yi)
            prev = c
        torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(st.S, s.S, atol=1e-12, rtol=1e-10)


def test_without_a_prefix_it_is_causal_linear_attention():
    layer = layer_f64()
    x = torch.randn(2, 25, 16, dtype=torch.float64)
    y, s = layer(x)
    y0, s0 = layer(x, prefix_len=0)
    assert torch.equal(y, y0) and torch.equal(s.S, s0.S)
    based = rnnlab.build_mixer("based", d_model=16, num_heads=2, feature_dim=4).double()
    based.load_state_dict({k: v for k, v in layer.state_dict().items() if "enc" not in k})
    yb, sb = based(x)
    torch.testing.assert_close(y, yb, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(s.S, sb.S, atol=1e-13, rtol=1e-12)


def test_packed_prefixes_equal_separate(small_chunks):
    layer = layer_f64()
    lengths, P = [7, 12, 4], [3, 12, 0]
    xs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 7, 19, 23])
    y, s = layer(torch.cat(xs, 1), cu_seqlens=cu, prefix_len=torch.tensor(P))
    for n, (xi, p) in enumerate(zip(xs, P)):
        yi, si = layer(xi, prefix_len=p)
        torch.testing.assert_close(y[:, cu[n]:cu[n + 1]], yi, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s.S[n:n + 1], si.S, atol=1e-12, rtol=1e-10)


def test_model_threads_prefix_len_and_other_mixers_ignore_it():
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (2, 16))
    plain = rnnlab.build_model(layout="gated_deltanet,swa", n_layers=2, d_model=32, vocab_size=50)
    a, sa = plain(tokens)
    b, sb = plain(tokens, prefix_len=6)
    assert torch.equal(a, b)
    model = rnnlab.build_model(layout="jrt,swa", n_layers=2, d_model=32, vocab_size=50).double()
    full, st = model(tokens, prefix_len=[6, 9])
    assert not torch.allclose(full, model(tokens)[0])  # the prefix changes the jrt layers
    l1, s1 = model(tokens[:, :9], prefix_len=[6, 9])  # prefill with the prefix, then decode token by token
    outs = [l1]
    for t in range(9, 16):
        lt, s1 = model(tokens[:, t:t + 1], s1)
        outs.append(lt)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-8)
    assert s1.seen.tolist() == st.seen.tolist() == [16, 16]


def test_bad_prefix_len_names_the_argument():
    layer = rnnlab.build_mixer("jrt", d_model=16, num_heads=2, feature_dim=4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="prefix_len"):
        layer(x, prefix_len=6)
    with pytest.raises(ValueError, match="prefix_len"):
        layer(x, prefix_len=-1)
    with pytest.raises(ValueError, match="prefix_len"):
        layer(x, prefix_len=[1, 2, 3])
    with pytest.raises(TypeError, match="prefix_len"):
        layer(x, prefix_len=2.5)
    with pytest.raises(ValueError, match="prefix_len"):  # per sequence with cu_seqlens: the 2nd is 2 long
        layer(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 3, 5]), prefix_len=3)
    model = rnnlab.build_model(layout="mamba2", n_layers=1, d_model=32, vocab_size=50)
    with pytest.raises(ValueError, match="prefix_len"):  # checked for every model, whatever its mixers
        model(torch.zeros(1, 4, dtype=torch.long), prefix_len=5)
