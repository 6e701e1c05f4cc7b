"""minGRU / minLSTM against a token-by-token transcription of Feng et al. 2024 (sequential mode)."""
import pytest
import torch

from rnnlab.layers.minrnn import MinGRU, MinGRUConfig, MinLSTM, MinLSTMConfig


def _g(x):
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def reference_mingru(m: MinGRU, x, h):
    """Paper, Algorithm 'minGRU (sequential mode)': z = σ(Linear(x)), h~ = g(Linear(x)),
    h = (1 - z) ⊙ h + z ⊙ h~; then the reference's output projection."""
    E = m.config.d_hidden
    W, b = m.in_proj.weight, m.in_proj.bias
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        h_tilde = _g(xt @ W[:E].T + b[:E])
        z = torch.sigmoid(xt @ W[E:].T + b[E:])
        h = (1 - z) * h + z * h_tilde
        ys.append(m.out_proj(h))
    return torch.stack(ys, 1), h


def reference_minlstm(m: MinLSTM, x, h, normalize=True):
    """Paper, Algorithm 'minLSTM (sequential mode)': f, i = σ(Linear(x)); f' = f/(f+i),
    i' = i/(f+i); h~ = g(Linear(x)); h = f' ⊙ h + i' ⊙ h~."""
    E = m.config.d_hidden
    W, b = m.in_proj.weight, m.in_proj.bias
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        h_tilde = _g(xt @ W[:E].T + b[:E])
        f = torch.sigmoid(xt @ W[E:2 * E].T + b[E:2 * E])
        i = torch.sigmoid(xt @ W[2 * E:].T + b[2 * E:])
        if normalize:
            f, i = f / (f + i), i / (f + i)
        h = f * h + i * h_tilde
        ys.append(m.out_proj(h))
    return torch.stack(ys, 1), h


def _layer(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    m = cls(cfg_cls(d_model=12, **kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))  # large weights: both branches of g, saturated gates
    return m


@pytest.mark.parametrize("expand", [1.0, 1.5])
def test_mingru_matches_paper(expand):
    m = _layer(MinGRU, MinGRUConfig, expand=expand)
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    h0 = torch.rand(2, m.config.d_hidden, dtype=torch.float64)  # the state after some tokens: h > 0
    y, s = m(x, m.state_cls(h=h0))
    y_ref, h_ref = reference_mingru(m, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.h, h_ref, rtol=1e-9, atol=1e-9)
    y0, _ = m(x)  # from the start: h_0 = 0
    torch.testing.assert_close(y0, reference_mingru(m, x, torch.zeros_like(h0))[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_minlstm_matches_paper(normalize):
    m = _layer(MinLSTM, MinLSTMConfig, expand=2.0, normalize_gates=normalize)
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    h0 = torch.rand(2, m.config.d_hidden, dtype=torch.float64)
    y, s = m(x, m.state_cls(h=h0))
    y_ref, h_ref = reference_minlstm(m, x, h0, normalize)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.h, h_ref, rtol=1e-9, atol=1e-9)


def test_log_g_is_log_of_g():
    from rnnlab.layers.minrnn import g, log_g
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    torch.testing.assert_close(log_g(x).exp(), g(x))
    torch.testing.assert_close(g(x), _g(x))


def test_long_sequence_stays_finite_and_positive():
    """Saturated gates over a long sequence (the reason for the log-space form): no under/overflow."""
    m = _layer(MinLSTM, MinLSTMConfig)
    with torch.no_grad():
        m.in_proj.weight.mul_(10)
    m = m.float()
    x = torch.randn(1, 4096, 12)
    y, s = m(x)
    assert torch.isfinite(y).all() and (s.h > 0).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="expand"):
        MinGRUConfig(d_model=8, expand=0)
    with pytest.raises(ValueError, match="d_hidden"):
        MinLSTMConfig(d_model=8, d_hidden=0)


def test_state_of_the_other_mixer_is_refused():
    from rnnlab.layers.state import StateError
    gru, lstm = MinGRU(MinGRUConfig(d_model=8)), MinLSTM(MinLSTMConfig(d_model=8))
    _, s = gru(torch.randn(1, 3, 8))
    with pytest.raises(StateError, match="another mixer"):
        lstm(torch.randn(1, 3, 8), s)
