"""S4D against a token-by-token transcription of the ZOH-discretised diagonal SSM."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab


@pytest.mark.parametrize("init", ["lin", "real"])
def test_s4d_matches_equations(init):
    torch.manual_seed(0)
    m = rnnlab.build_mixer("s4d", d_model=6, d_state=8, init=init).double()
    x = torch.randn(2, 25, 6, dtype=torch.float64)
    A = -torch.exp(m.log_A_real) + 1j * m.A_imag
    dt = torch.exp(m.log_dt)[:, None]
    dA, dB = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
    C = torch.complex(m.C_re, m.C_im)
    h = torch.zeros(2, 6, 4, dtype=torch.complex128)
    ys = []
    for t in range(25):
        h = dA * h + dB * x[:, t, :, None]
        y = 2 * (C * h).sum(-1).real + m.D * x[:, t]
        ys.append(F.glu(m.out_proj(F.gelu(y)), dim=-1))
    y, st = m(x)
    torch.testing.assert_close(y, torch.stack(ys, 1))
    torch.testing.assert_close(st.h, h)
    if init == "lin":
        torch.testing.assert_close(m.A_imag[0, :3].float(), torch.tensor([0.0, 3.14159265, 6.2831853]))
    else:
        torch.testing.assert_close((-torch.exp(m.log_A_real[0, :3])).float(), torch.tensor([-1.0, -2.0, -3.0]))
