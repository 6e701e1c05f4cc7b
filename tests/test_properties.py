"""The shared property suite: every registered mixer is checked here without new test code."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rnnlab
from rnnlab.layers.state import State, StateError
from rnnlab.models.registry import REGISTRY, build_mixer

NAMES = rnnlab.mixers()
D = 32


@lru_cache(maxsize=None)
def tiny(name: str, dtype: torch.dtype = torch.float64):
    """A tiny instance of mixer ``name`` (cached: hypothesis calls many times)."""
    torch.manual_seed(1)
    m = build_mixer(name, d_model=D, **REGISTRY[name].tiny).to(dtype)
    _randomise(m)
    return m


def _randomise(m: torch.nn.Module) -> None:
    """Perturb every parameter a little, so zero-initialised parts are exercised too."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * (1 + b.abs().max().item() if b.numel() else 1), f"{what}: max abs diff {err:.3g}"


def _states_close(s1: State, s2: State, tol: float) -> None:
    t1, t2 = s1.tensors(), s2.tensors()
    assert t1.keys() == t2.keys()
    for k in t1:
        _close(t1[k], t2[k], tol, f"state.{k}")
    assert s1.scalars() == s2.scalars()


def _run_pieces(m, x, sizes, state=None):
    ys = []
    for piece in torch.split(x, sizes, dim=1):
        y, state = m(piece, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_chunking_law(name, data):
    """Feeding pieces one after another with the state equals one call (outputs and final state)."""
    m = tiny(name)
    T = data.draw(st.integers(2, 150), label="T")
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=4), label="cuts"))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, D, dtype=torch.float64, generator=g)
    s0 = None
    if data.draw(st.booleans(), label="from a non-initial state"):
        _, s0 = m(torch.randn(2, 7, D, dtype=torch.float64, generator=g))
    y, s = m(x, s0)
    y2, s2 = _run_pieces(m, x, sizes, s0)
    _close(y2, y, 1e-8, f"{name} outputs, pieces {sizes}")
    _states_close(s2, s, 1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_streaming(name):
    """T=1 steps from the start equal the full pass (prefill-vs-decode parity)."""
    m = tiny(name)
    x = torch.randn(2, 70, D, dtype=torch.float64)
    y, s = m(x)
    y2, s2 = _run_pieces(m, x, [1] * 70)
    _close(y2, y, 1e-8, f"{name} streamed outputs")
    _states_close(s2, s, 1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_state_size(name):
    """Recurrent mixers: state size independent of T. Others: bounded if windowed."""
    m = tiny(name)
    sizes = [m(torch.randn(1, T, D, dtype=torch.float64))[1].nbytes for T in (3, 40, 200)]
    if m.recurrent:
        assert sizes[0] == sizes[1] == sizes[2], f"{name}: recurrent state grew {sizes}"
        assert sizes[0] == m.state_size(1, torch.float64) or sizes[0] > 0
    elif getattr(m.config, "window", None) is not None:
        assert sizes[1] == sizes[2], f"{name}: windowed state not bounded {sizes}"
    else:
        assert sizes[0] < sizes[1] < sizes[2], f"{name}: a KV cache should grow {sizes}"


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name):
    """A sequence's outputs do not depend on the other sequences of the batch."""
    m = tiny(name)
    x = torch.randn(3, 20, D, dtype=torch.float64)
    y, _ = m(x)
    y1, _ = m(x[1:2])
    _close(y[1:2], y1, 1e-10, f"{name} batch independence")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    m = build_mixer(name, d_model=D, **REGISTRY[name].tiny).double()
    _randomise(m)
    x = torch.randn(2, 24, D, dtype=torch.float64, requires_grad=True)
    _, s0 = m(torch.randn(2, 5, D, dtype=torch.float64))
    y, s = m(x, s0)
    loss = (y * torch.randn_like(y)).sum()
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast(name):
    """Under bfloat16 autocast the mixer runs, stays finite and near the float32 answer."""
    m = tiny(name, torch.float32)
    x = torch.randn(2, 80, D)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
        y2, _ = m(x[:, :1], s)
    assert torch.isfinite(y.float()).all() and torch.isfinite(y2.float()).all()
    rel = (y.float() - y32).norm() / y32.norm()
    assert rel < 0.1, f"{name}: bf16 autocast relative error {rel:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_model_teacher_forced_decoding(name):
    """A 2-layer model of this mixer: token-by-token decoding equals the full forward."""
    torch.manual_seed(2)
    opts = ",".join(f"{k}={v!r}" for k, v in REGISTRY[name].tiny.items())
    model = rnnlab.build_model(layout=f"{name}({opts})", n_layers=2, d_model=D).double()
    _randomise(model)
    tokens = torch.randint(0, 260, (2, 33))
    logits, state = model(tokens)
    st_, outs = None, []
    for t in range(tokens.shape[1]):
        out, st_ = model(tokens[:, t:t + 1], st_)
        outs.append(out)
    _close(torch.cat(outs, 1), logits, 1e-8, f"{name} model decoding")
    assert st_.seen == state.seen == 33


@dataclass(frozen=True)
class ForeignState(State):
    h: torch.Tensor


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    m = tiny(name)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(2, 5, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        m(torch.randn(5, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.float())
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 5, D, dtype=torch.long))
    _, s = m(x)
    with pytest.raises(StateError, match="batch size"):
        m(torch.randn(3, 5, D, dtype=torch.float64), s)
    with pytest.raises(StateError, match="another mixer"):
        m(x, ForeignState(h=torch.zeros(2, 3)))
    wider = build_mixer(name, d_model=2 * D, **REGISTRY[name].tiny).double()
    _, s_wide = wider(torch.randn(2, 5, 2 * D, dtype=torch.float64))
    same_shapes = s_wide.tensors().keys() == s.tensors().keys() and all(
        a.shape == b.shape for a, b in zip(s_wide.tensors().values(), s.tensors().values()))
    if not same_shapes:  # a state of the same mixer at another width must not be accepted
        with pytest.raises(StateError):
            m(x, s_wide)
