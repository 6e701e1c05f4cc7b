"""Mamba-2's inference-time mitigations of state collapse: state normalisation and a scaled decay."""
import dataclasses

import pytest
import torch

import rnnlab
from rnnlab.tasks.extrapolation import state_norm


def _pair(**options):
    """The same weights without and with ``options``; a random input and initial state."""
    torch.manual_seed(0)
    plain = rnnlab.build_mixer("mamba2", d_model=32, d_state=8, head_dim=16)
    other = rnnlab.build_mixer("mamba2", d_model=32, d_state=8, head_dim=16, **options)
    other.load_state_dict(plain.state_dict())
    x = torch.randn(2, 40, 32)
    s0 = dataclasses.replace(plain.init_state(2), S=torch.randn(2, 4, 8, 16))
    return plain, other, x, s0


@pytest.mark.parametrize("options", [dict(decay_scale=1.0), dict(state_norm_max=1e9), dict()])
def test_identity_where_it_should_be(options):
    plain, other, x, s0 = _pair(**options)
    y, s = plain(x, s0)
    y2, s2 = other(x, s0)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2.S, s.S, atol=1e-5, rtol=1e-5)


def test_state_normalisation_bounds_the_state():
    plain, other, x, s0 = _pair(state_norm_max=2.0)
    y, s = plain(x, s0)
    assert (state_norm(s) > 3.0).all()  # the plain state is past the bound
    y2, s2 = other(x, s0)
    assert torch.isfinite(y2).all() and (y2 - y).abs().max() > 1e-3
    assert (state_norm(s2) <= 2.0 + 1e-5).all()
    # every prefix's state is bounded, and the chunking law holds
    ya, sa = other(x[:, :17], s0)
    yb, sb = other(x[:, 17:], sa)
    assert (state_norm(sa) <= 2.0 + 1e-5).all()
    torch.testing.assert_close(torch.cat([ya, yb], 1), y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sb.S, s2.S, atol=1e-5, rtol=1e-5)


def test_a_larger_decay_scale_forgets_faster():
    plain, other, x, s0 = _pair(decay_scale=4.0)
    zeros = torch.zeros_like(x)  # no input: the state only decays (the conv bias still writes a little)
    _, s = plain(zeros, s0)
    y2, s2 = other(zeros, s0)
    assert torch.isfinite(y2).all()
    assert (state_norm(s2) < 0.9 * state_norm(s)).all()
    _, s3 = other(x, s0)
    assert torch.isfinite(s3.S).all()


@pytest.mark.parametrize("field, value", [("state_norm_max", -1.0), ("decay_scale", 0.0), ("decay_scale", -2.0),
                                          ("state_norm_max", True)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        rnnlab.build_mixer("mamba2", d_model=32, **{field: value})
