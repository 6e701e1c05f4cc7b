"""Family D: Newton-parallel solves reach the sequential trajectory; adjoint gradients match."""
import pytest
import torch

from rnnlab.ops import matrix_scan, newton_solve, rnn_newton, rnn_sequential


def lstm_like(R):
    """A 2K-state LSTM cell per block: s = [h, c] (..., H, 2K), x (..., H, 4, K)."""
    def cell(s, x):
        K = R.shape[1]
        h, c = s[..., :K], s[..., K:]
        i, f, g, o = (x + torch.einsum("...hk,hkgj->...hgj", h, R)).unbind(-2)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], dim=-1)
    return cell


def diag_gru_like(w):
    """A diagonal cell (S = 1): h (..., H, 1), x (..., H, 2)."""
    def cell(h, x):
        z = torch.sigmoid(x[..., :1] + w * h)
        return z * h + (1 - z) * torch.tanh(x[..., 1:] + w * h)
    return cell


def dense_tanh(W):
    """A dense S = 4 block: h (..., H, 4), x (..., H, 4)."""
    return lambda h, x: torch.tanh(x + torch.einsum("...hs,hsr->...hr", h, W))


CASES = {
    "lstm_2x2_blocks": (lambda g: lstm_like(0.5 * torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)),
                        (2, 4, 3), (2, 6)),
    "diagonal": (lambda g: diag_gru_like(torch.randn(5, 1, generator=g, dtype=torch.float64)), (5, 2), (5, 1)),
    "dense_s4": (lambda g: dense_tanh(0.4 * torch.randn(2, 4, 4, generator=g, dtype=torch.float64)), (2, 4), (2, 4)),
}


def _case(name, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    make, xs, hs = CASES[name]
    cell = make(g)
    x = torch.randn(2, T, *xs, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, *hs, generator=g, dtype=torch.float64)
    return cell, x, h0


@pytest.mark.parametrize("name", list(CASES))
def test_newton_reaches_the_sequential_trajectory(name):
    cell, x, h0 = _case(name, T=300)
    h_seq, last_seq = rnn_sequential(cell, x, h0)
    h, info = newton_solve(cell, x, h0)
    assert info.converged and info.residual <= 1e-12 and info.iterations < 60, info
    assert (h - h_seq).abs().max() < 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_adjoint_gradients_match_autograd_through_the_loop(name):
    cell, x, h0 = _case(name, T=64)
    x1, h01 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    x2, h02 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    h_seq, l_seq = rnn_sequential(cell, x1, h01)
    h_new, l_new = rnn_newton(cell, x2, h02)
    cot, cot_l = torch.randn_like(h_seq), torch.randn_like(l_seq)
    g1 = torch.autograd.grad((h_seq * cot).sum() + (l_seq * cot_l).sum(), [x1, h01])
    g2 = torch.autograd.grad((h_new * cot).sum() + (l_new * cot_l).sum(), [x2, h02])
    torch.testing.assert_close(h_new, h_seq, atol=1e-10, rtol=1e-10)
    for a, b, what in zip(g1, g2, ["x", "initial_state"]):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=what)


def test_parameter_gradients_reach_the_closure():
    g = torch.Generator().manual_seed(1)
    R = (0.5 * torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(1, 40, 2, 4, 3, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    cot = torch.randn(1, 40, 2, 6, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((rnn_sequential(lstm_like(R), x, h0)[0] * cot).sum(), R)[0]
    gb = torch.autograd.grad((rnn_newton(lstm_like(R), x, h0)[0] * cot).sum(), R)[0]
    torch.testing.assert_close(gb, ga, atol=1e-9, rtol=1e-9)


def test_long_sequences_stay_finite_and_float32_matches():
    cell, x, h0 = _case("lstm_2x2_blocks", T=2048)
    h, info = newton_solve(cell, x, h0)
    assert torch.isfinite(h).all() and info.converged
    cell32 = lstm_like(0.5 * torch.randn(2, 3, 4, 3, generator=torch.Generator().manual_seed(0)))
    x32, h032 = x.float(), h0.float()
    a, _ = rnn_sequential(cell32, x32[:, :1024], h032)
    b, _ = rnn_newton(cell32, x32[:, :1024], h032)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("H", [3, 10])  # 96 matrix entries per step: log-depth scan; 320: the CPU loop
def test_matrix_scan_matches_a_loop(H):
    g = torch.Generator().manual_seed(0)
    J = 0.5 * torch.randn(2, 37, H, 4, 4, generator=g, dtype=torch.float64)
    r = torch.randn(2, 37, H, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, H, 4, generator=g, dtype=torch.float64)
    h, hs = h0, []
    for t in range(37):
        h = (J[:, t] @ h.unsqueeze(-1)).squeeze(-1) + r[:, t]
        hs.append(h)
    for C in (1, 5, 64):
        torch.testing.assert_close(matrix_scan(J, r, h0, chunk_size=C), torch.stack(hs, 1))


def test_divergent_newton_falls_back_and_stays_exact():
    """A long-memory LSTM (forget bias +4, recurrent weights U(-1, 1)) overflows under plain Newton
    in float32; the safeguarded solve still returns the sequential trajectory, and says how."""
    g = torch.Generator().manual_seed(0)
    cell = lstm_like(torch.rand(64, 1, 4, 1, generator=g) * 2 - 1)
    x = torch.randn(2, 512, 64, 4, 1, generator=g)
    x[..., 1, :] += 4.0
    h0 = torch.zeros(2, 64, 2)
    h_seq, _ = rnn_sequential(cell, x, h0)
    h, info = newton_solve(cell, x, h0)
    assert info.converged and info.picard_steps >= 1 and info.sequential_from is not None, info
    assert torch.isfinite(h).all() and (h - h_seq).abs().max() < 1e-4
    with pytest.warns(RuntimeWarning, match="finished sequentially"):
        out, last = rnn_newton(cell, x, h0)
    assert (out - h_seq).abs().max() < 1e-4


def test_packed_newton_solve_converges_by_newton_steps():
    """With cu_seqlens the linearisation restarts at each sequence (J = 0 at its first token), so the
    Newton iterations converge on their own, without the sequential fallback."""
    from rnnlab.ops import newton, registry
    fam = registry.get_family("newton")
    x = fam.packed_inputs([3, 16, 1, 37, 8, 0, 5], H=2, K=4, V=3, dtype=torch.float64, seed=5)
    cell = registry._lstm_cell(x["R"])
    h, info = newton.newton_solve(cell, x["x"], x["initial_state"], cu_seqlens=x["cu_seqlens"])
    assert info.converged and info.sequential_from is None and info.iterations < 20, info
    torch.testing.assert_close(h, newton.rnn_sequential(cell, x["x"], x["initial_state"], x["cu_seqlens"])[0])
