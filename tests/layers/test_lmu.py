"""LMU against a token-by-token transcription of the paper's equations (float64)."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab


def paper_matrices(N, theta):
    """Voelker et al. 2019, eq. (2): A[i, j] = (2i+1)/θ · (-1 if i < j else (-1)^(i-j+1)),
    B[i] = (2i+1)/θ · (-1)^i; zero-order hold with a step of 1: Ā = e^A, B̄ = A^-1 (e^A - I) B."""
    A = torch.zeros(N, N, dtype=torch.float64)
    B = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        B[i] = (2 * i + 1) / theta * (-1) ** i
        for j in range(N):
            A[i, j] = (2 * i + 1) / theta * (-1 if i < j else (-1) ** (i - j + 1))
    dA = torch.linalg.matrix_exp(A)
    dB = torch.linalg.solve(A, (dA - torch.eye(N, dtype=torch.float64)) @ B)
    return dA, dB


@pytest.mark.parametrize("opts", [dict(order=6, theta=10.0), dict(order=5, theta=40.0, memory_dim=3, d_hidden=7)])
def test_lmu_matches_paper_equations(opts):
    torch.manual_seed(0)
    D = 8
    m = rnnlab.build_mixer("lmu", d_model=D, **opts).double()
    c = m.config
    x = torch.randn(2, 40, D, dtype=torch.float64)
    dA, dB = paper_matrices(c.order, c.theta)
    _, s0 = m(torch.randn(2, 5, D, dtype=torch.float64))  # a random initial memory
    mem = s0.m.clone()  # (B, P, N)
    ys = []
    for t in range(x.shape[1]):
        u = F.relu(x[:, t] @ m.u_proj.weight.T + m.u_proj.bias)  # (B, P)
        mem = mem @ dA.T + u[..., None] * dB  # m_t = Ā m_{t-1} + B̄ u_t per memory channel
        h = F.relu(torch.cat([mem.flatten(1), x[:, t]], -1) @ m.h_proj.weight.T + m.h_proj.bias)
        ys.append(h @ m.out_proj.weight.T + m.out_proj.bias)
    y_ref = torch.stack(ys, 1)
    y, s = m(x, s0)
    dy, dm = (y - y_ref).abs().max().item(), (s.m - mem).abs().max().item()
    print(f"lmu({opts}) vs paper equations: max |dy| {dy:.2e}, max |dm| {dm:.2e}")
    assert dy < 1e-10 and dm < 1e-10
    y1, s1 = m(x[:, :1], s0)  # one step (the recurrence form) agrees too
    torch.testing.assert_close(y1, y_ref[:, :1], rtol=0, atol=1e-12)


def test_lmu_gradients_match_paper_equations():
    """Gradients of the input, the initial memory and every parameter: the layer (convolution form)
    against the loop, float64."""
    torch.manual_seed(1)
    m = rnnlab.build_mixer("lmu", d_model=5, order=4, theta=6.0, memory_dim=2).double()
    dA, dB = paper_matrices(4, 6.0)
    x = torch.randn(2, 17, 5, dtype=torch.float64, requires_grad=True)
    m0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, 17, 5, dtype=torch.float64)
    mem, ys = m0, []
    for t in range(17):
        u = F.relu(m.u_proj(x[:, t]))
        mem = mem @ dA.T + u[..., None] * dB
        ys.append(m.out_proj(F.relu(m.h_proj(torch.cat([mem.flatten(1), x[:, t]], -1)))))
    leaves = [x, m0, *m.parameters()]
    g_ref = torch.autograd.grad((torch.stack(ys, 1) * cot).sum() + mem.sum(), leaves)
    y, s = m(x, type(m.init_state(2))(m=m0))
    g = torch.autograd.grad((y * cot).sum() + s.m.sum(), leaves)
    dg = max((a - b).abs().max().item() for a, b in zip(g, g_ref))
    print(f"lmu gradients vs paper equations: max diff {dg:.2e}")
    assert dg < 1e-10


def test_lmu_defaults_follow_lmuformer():
    m = rnnlab.build_mixer("lmu", d_model=16)
    assert (m.config.order, m.config.theta, m.config.memory_dim, m.config.d_hidden) == (16, 128.0, 1, 16)
    assert m.state_size() == 16 * 4
    assert not any(n.startswith(("A", "B")) for n, _ in m.named_parameters())  # the memory is fixed
    with pytest.raises(ValueError, match="theta"):
        rnnlab.build_mixer("lmu", d_model=16, theta=0.0)
    with pytest.raises(ValueError, match="order"):
        rnnlab.build_mixer("lmu", d_model=16, order=0)
    with pytest.raises(ValueError, match="memory_dim"):
        rnnlab.build_mixer("lmu", d_model=16, memory_dim=0)


def test_lmu_long_float32_run_is_close_to_float64():
    """The default order (N = d_model = 64) over 3000 tokens: the float32 convolution form in
    time-chunks stays within 1e-3 (relative) of the float64 layer."""
    torch.manual_seed(0)
    m = rnnlab.build_mixer("lmu", d_model=64)
    x = torch.randn(1, 3000, 64)
    y32, s32 = m(x)
    y64, s64 = m.double()(x.double())
    assert ((y32.double() - y64).norm() / y64.norm()).item() < 1e-3
    assert ((s32.m.double() - s64.m).norm() / s64.m.norm()).item() < 1e-3
