"""LSTM / GRU against token-by-token transcriptions of Hochreiter & Schmidhuber 1997 (with the
forget gate of Gers et al. 2000) and Cho et al. 2014, with block-diagonal recurrent matrices; and
the Newton-parallel forms against the sequential ones."""
import pytest
import torch

from rnnlab.layers.rnn import GRU, LSTM, GRUConfig, LSTMConfig


def _blockdiag(R):
    """(H, K, G, K) per-head recurrent weights -> G dense (E, E) block-diagonal matrices."""
    H, K, G, _ = R.shape
    return [torch.block_diag(*[R[h, :, g, :] for h in range(H)]) for g in range(G)]


def reference_lstm(m: LSTM, x, h, c):
    """i = σ(W_i x + U_i h + b_i), f = σ(...), g = tanh(...), o = σ(...);
    c = f ⊙ c + i ⊙ g; h = o ⊙ tanh(c), with U block-diagonal (one block per head)."""
    E = m.config.d_hidden
    W, b = m.in_proj.weight, m.in_proj.bias
    Ui, Uf, Ug, Uo = _blockdiag(m.R)
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        pre = [xt @ W[j * E:(j + 1) * E].T + b[j * E:(j + 1) * E] for j in range(4)]
        i = torch.sigmoid(pre[0] + h @ Ui)
        f = torch.sigmoid(pre[1] + h @ Uf)
        g = torch.tanh(pre[2] + h @ Ug)
        o = torch.sigmoid(pre[3] + h @ Uo)
        c = f * c + i * g
        h = o * torch.tanh(c)
        ys.append(m.out_proj(h))
    return torch.stack(ys, 1), h, c


def reference_gru(m: GRU, x, h):
    """Cho et al. 2014, eqs. (5)-(8): r = σ(W_r x + U_r h), z = σ(W_z x + U_z h),
    h~ = tanh(W x + U (r ⊙ h)), h = z ⊙ h + (1 - z) ⊙ h~ (biases added to the W x terms)."""
    E = m.config.d_hidden
    W, b = m.in_proj.weight, m.in_proj.bias
    Ur, Uz, U = _blockdiag(m.R)
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        wr, wz, wn = [xt @ W[j * E:(j + 1) * E].T + b[j * E:(j + 1) * E] for j in range(3)]
        r = torch.sigmoid(wr + h @ Ur)
        z = torch.sigmoid(wz + h @ Uz)
        h_tilde = torch.tanh(wn + (r * h) @ U)
        h = z * h + (1 - z) * h_tilde
        ys.append(m.out_proj(h))
    return torch.stack(ys, 1), h


def _layer(cls, cfg_cls, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(cfg_cls(d_model=12, **kw)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("heads", [1, 3, 12])
@pytest.mark.parametrize("parallel", [False, True])
def test_lstm_matches_definition(heads, parallel):
    m = _layer(LSTM, LSTMConfig, num_heads=heads, d_hidden=12, parallel=parallel)
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    h0, c0 = torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    y, s = m(x, m.state_cls(h=h0.view(2, heads, -1), c=c0.view(2, heads, -1)))
    y_ref, h_ref, c_ref = reference_lstm(m, x, h0, c0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.h.reshape(2, -1), h_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.c.reshape(2, -1), c_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("heads", [1, 3, 12])
@pytest.mark.parametrize("parallel", [False, True])
def test_gru_matches_definition(heads, parallel):
    m = _layer(GRU, GRUConfig, num_heads=heads, d_hidden=12, parallel=parallel)
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    h0 = torch.randn(2, 12, dtype=torch.float64)
    y, s = m(x, m.state_cls(h=h0.view(2, heads, -1)))
    y_ref, h_ref = reference_gru(m, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.h.reshape(2, -1), h_ref, rtol=1e-9, atol=1e-9)


def _grads(m, x, s0):
    m.zero_grad()
    y, s = m(x, s0)
    w = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
    loss = (y * w).sum() + sum(t.sum() for t in s.tensors().values())
    loss.backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("cls,cfg_cls,heads", [(LSTM, LSTMConfig, 8), (GRU, GRUConfig, 8),
                                               (LSTM, LSTMConfig, 2), (GRU, GRUConfig, 2)])
def test_newton_matches_sequential_float32_long(cls, cfg_cls, heads):
    """Newton-parallel == sequential to 1e-5 in float32 at T = 1024, forward and gradients
    (diagonal recurrence: 8 heads of 1; block-diagonal: 2 heads of 4)."""
    torch.manual_seed(0)
    m = cls(cfg_cls(d_model=8, num_heads=heads, parallel=True))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1024, 8)
    _, s0 = m(torch.randn(2, 3, 8))
    s0 = s0.detach()
    y_par, g_par = _grads(m, x, s0)
    m.config.parallel = False
    y_seq, g_seq = _grads(m, x, s0)
    m.config.parallel = True
    torch.testing.assert_close(y_par, y_seq, rtol=1e-5, atol=1e-5)
    for n in g_seq:
        scale = g_seq[n].abs().max().item()
        err = (g_par[n] - g_seq[n]).abs().max().item()
        assert err <= 1e-5 * max(1.0, scale), f"{cls.__name__} grad {n}: {err:.3g} (scale {scale:.3g})"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        LSTMConfig(d_model=12, num_heads=5)
    with pytest.raises(ValueError, match="d_hidden"):
        GRUConfig(d_model=12, d_hidden=0)


def test_newton_rejects_blocks_too_large_for_its_jacobians():
    with pytest.raises(ValueError, match=r"num_heads >= 4"):  # dense 128-unit LSTM: S = 256
        LSTMConfig(d_model=128, parallel=True)
    with pytest.raises(ValueError, match="num_heads >= 2"):  # GRU: S = 128
        GRUConfig(d_model=128, parallel=True)
    LSTMConfig(d_model=128, num_heads=4, parallel=True)  # S = 64: accepted
    LSTMConfig(d_model=128, parallel=False)  # the sequential form has no such limit
