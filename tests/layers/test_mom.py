"""Mixture-of-Memories against a token-by-token transcription of the paper's equations."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from paper_loops import assert_matches_loop, conv_silu, rmsnorm
from rnnlab.layers.mom import MoMState
from rnnlab.ops import tuning


@pytest.fixture
def small_chunks():
    """Chunks of 16 tokens in the op, so the sequences below span several chunks."""
    with tuning.override(cpu={"delta.chunk_size": 16}):
        yield





def transcription(layer, x, S0):
    """MoM (Du et al. 2025), token by token: route x_t to the top-k memories by softmax(W_r x_t)
    (weights renormalised over the top-k); update only those memories (and the shared one) by the
    gated delta rule S^m = a^m (I - b^m k^m k^m^T) S^m + b^m k^m v^m^T; read
    o_t = sum_{m in topk} w^m S^m^T q_t / sqrt(K) + S^shared^T q_t / sqrt(K); RMSNorm, silu gate."""
    c = layer.config
    H, K, V, M = c.num_heads, c.head_dim, c.head_v_dim, c.num_memories
    B, T, _ = x.shape
    E = c.num_all_memories
    qs = layer.q_proj(x)
    Wk, Wv, Wb, Wa = (lin.weight.chunk(E, 0) for lin in (layer.k_proj, layer.v_proj, layer.b_proj, layer.a_proj))
    ck, cv = layer.k_conv.conv.weight[:, 0].chunk(E, 0), layer.v_conv.conv.weight[:, 0].chunk(E, 0)
    ks = [x @ Wk[m].T for m in range(E)]
    vs = [x @ Wv[m].T for m in range(E)]
    S = [[[S0[bi, m, h].clone() for h in range(H)] for m in range(E)] for bi in range(B)]
    eye = torch.eye(K, dtype=x.dtype)
    A = torch.exp(layer.A_log)
    ys, n_skipped = [], 0
    for t in range(T):
        q = F.normalize(conv_silu(layer.q_conv.conv.weight[:, 0], qs, t).view(B, H, K), dim=-1)
        gate = layer.g_proj(x[:, t]).view(B, H, V)
        p = torch.softmax(layer.router(x[:, t]), dim=-1)  # (B, M)
        out = []
        for bi in range(B):
            top, idx = p[bi].topk(c.topk)
            w = dict(zip(idx.tolist(), (top / top.sum()).unbind()))
            if c.shared_memory:
                w[M] = torch.ones((), dtype=x.dtype)
            n_skipped += E - len(w)
            o = torch.zeros(H, V, dtype=x.dtype)
            for m, wm in w.items():  # only the memories this token is routed to
                k = F.normalize(conv_silu(ck[m], ks[m], t)[bi].view(H, K), dim=-1)
                v = conv_silu(cv[m], vs[m], t)[bi].view(H, V)
                b = torch.sigmoid(x[bi, t] @ Wb[m].T)  # (H,)
                a = torch.exp(-A * F.softplus(x[bi, t] @ Wa[m].T + layer.dt_bias))  # (H,)
                for h in range(H):
                    S[bi][m][h] = a[h] * (eye - b[h] * torch.outer(k[h], k[h])) @ S[bi][m][h] \
                        + b[h] * torch.outer(k[h], v[h])
                    o[h] = o[h] + wm * S[bi][m][h].T @ q[bi, h] / K ** 0.5
            out.append(rmsnorm(o, layer.o_norm.weight, c.norm_eps) * F.silu(gate[bi]))
        ys.append(layer.o_proj(torch.stack(out).reshape(B, H * V)))
    S_final = torch.stack([torch.stack([torch.stack(S[bi][m]) for m in range(E)]) for bi in range(B)])
    return torch.stack(ys, 1), S_final, n_skipped


@pytest.mark.parametrize("shared", [True, False])
def test_matches_paper_equations(shared, small_chunks):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("mom", d_model=16, num_heads=2, num_memories=4, topk=2,
                               shared_memory=shared).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c = layer.config
    x = torch.randn(2, 40, 16, dtype=torch.float64)  # three chunks of the op
    S0 = torch.randn(2, c.num_all_memories, c.num_heads, c.head_dim, c.head_v_dim, dtype=torch.float64)
    st = layer.init_state(2, dtype=torch.float64)
    y, state = layer(x, MoMState(S=S0, conv_q=st.conv_q, conv_k=st.conv_k, conv_v=st.conv_v))
    y_ref, S_ref, n_skipped = transcription(layer, x, S0)
    assert n_skipped == 2 * 40 * (c.num_memories - c.topk)  # the test does exercise the routing
    assert_matches_loop(f"mom(shared_memory={shared})", layer, y, state.S, y_ref, S_ref)


def test_a_memory_no_token_is_routed_to_keeps_its_state():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("mom", d_model=16, num_heads=2, num_memories=4, topk=1).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = -5.0  # memory 2 never wins ...
        layer.router.weight[0] = 5.0  # ... memory 0 always does for positive inputs
    x = torch.randn(1, 12, 16, dtype=torch.float64).abs()
    S0 = torch.randn(1, 5, 2, 8, 8, dtype=torch.float64)
    st = layer.init_state(1, dtype=torch.float64)
    _, state = layer(x, MoMState(S=S0, conv_q=st.conv_q, conv_k=st.conv_k, conv_v=st.conv_v))
    assert torch.equal(state.S[:, 1:4], S0[:, 1:4])  # untouched, bit for bit
    assert not torch.allclose(state.S[:, 0], S0[:, 0]) and not torch.allclose(state.S[:, 4], S0[:, 4])


def test_init_follows_reference():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("mom", d_model=256)
    c = layer.config
    assert (c.num_memories, c.topk, c.shared_memory, c.num_all_memories) == (4, 2, True, 5)
    assert c.head_v_dim == c.head_dim == 64
    A = layer.A_log.exp()
    assert ((A >= 0) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    bound = 2 ** -2.5 * (6 / (256 + 256)) ** 0.5  # xavier bound of one memory's (H*K, D) block
    for block in layer.k_proj.weight.chunk(5, 0):
        assert block.abs().max() <= bound and block.abs().max() > 0.9 * bound
    assert layer.no_weight_decay() == {"A_log", "dt_bias", "o_norm.weight"}


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="topk"):
        rnnlab.build_mixer("mom", d_model=16, num_heads=2, num_memories=2, topk=3)
    with pytest.raises(ValueError, match="num_memories"):
        rnnlab.build_mixer("mom", d_model=16, num_heads=2, num_memories=0)
    with pytest.raises(ValueError, match="A_init_range"):
        rnnlab.build_mixer("mom", d_model=16, num_heads=2, A_init_range=(-1.0, 16.0))
