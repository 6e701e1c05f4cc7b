"""The shared property suite: every registered mixer is checked here without new test code."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rnnlab
from rnnlab.layers.state import State, StateError
from rnnlab.models.registry import REGISTRY, build_mixer
from rnnlab.ops import tuning

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
@given(data=st.data())
def test_chunking_law_after_a_prefix(name, data):
    """With ``prefix_len`` (one per row) the prefix comes in the first piece; after it, feeding the
    rest in pieces equals one call. A mixer that does not read prefixes ignores ``prefix_len``."""
    m = tiny(name)
    P = data.draw(st.lists(st.integers(0, 20), min_size=2, max_size=2), label="prefix_len")
    first = data.draw(st.integers(max(1, *P), 30), label="first piece")
    T = first + data.draw(st.integers(1, 60), label="rest")
    cuts = sorted((data.draw(st.sets(st.integers(first + 1, T), max_size=3), label="cuts") | {first}) - {T})
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    x = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    y, s = m(x, prefix_len=torch.tensor(P))
    y1, s1 = m(x[:, :first], prefix_len=P)
    y2, s2 = _run_pieces(m, x[:, first:], sizes[1:], s1)
    _close(torch.cat([y1, y2], 1), y, 1e-8, f"{name} outputs after prefix_len={P}, pieces {sizes}")
    _states_close(s2, s, 1e-8)
    if not m.reads_prefix:
        y0, s0 = m(x)
        _close(y, y0, 0.0, f"{name} ignores prefix_len")
        _states_close(s, s0, 0.0)


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
    _, s0 = m(torch.randn(2, 5, D, dtype=torch.float64), prefix_len=3)  # a prompt (read as a prefix by jrt)
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
    # training under autocast: the backward runs (outside autocast, as the trainer runs it) and
    # every gradient is finite, in its parameter's dtype and near the float32 gradient
    m.zero_grad(set_to_none=True)
    y32.float().pow(2).mean().backward()
    g32 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x)
    y.float().pow(2).mean().backward()
    for n, p in m.named_parameters():
        if n not in g32:
            continue
        assert p.grad is not None and p.grad.dtype == p.dtype, f"{name}: {n} has no {p.dtype} gradient under autocast"
        assert torch.isfinite(p.grad).all(), f"{name}: {n}'s gradient is not finite under autocast"
        err = (p.grad - g32[n]).norm() / g32[n].norm().clamp_min(1e-12)
        assert err < 0.25, f"{name}: {n}'s gradient under autocast is {err:.3f} from float32's"


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
    assert st_.seen.tolist() == state.seen.tolist() == [33, 33]


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


# -- sequence boundaries: packed equals separate ---------------------------------------------------------
# Small chunks (as in tests/ops) so that the lengths below are: 1, shorter than a chunk, exactly one chunk
# (8 and 16), several chunks and not aligned (37), empty (0).
SMALL_CHUNKS = {"delta.chunk_size": 8, "gla.chunk_size": 16, "gla.sub_chunk": 8, "dplr.chunk_size": 16, "dplr.sub_chunk": 8, "mlstm.chunk_size": 8,
                "scan.chunk_size": 8, "matrix_scan.chunk_size": 8, "selective_scan.time_chunk": 16,
                "longhorn.time_chunk": 16, "gsa.chunk_size": 4, "gsa.block_size": 16, "lti.conv_chunk": 16,
                "lti.scan_time_chunk": 16}
LENGTHS = [3, 16, 1, 37, 8, 0, 5]
NAN_SEQ, NAN_AT = 3, 21  # a NaN in x at token 21 of the sequence of 37 tokens


@pytest.fixture
def small_chunks():
    with tuning.override(cpu=SMALL_CHUNKS):
        yield


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


def _state_rows(s: State, n: int) -> State:
    """Row n of a state (a state of batch 1)."""
    return s.select(slice(n, n + 1))


def _cat_states(states: list[State]) -> State:
    """States of batch 1 stacked into one state of len(states) rows (a ragged batch)."""
    return type(states[0]).cat(states)


def _initial_states(m, lengths, g):
    """One random initial state per sequence (each after its own random prefix), as a state of
    len(lengths) rows whose floating tensors are leaves requiring grad; and those leaves."""
    with torch.no_grad():
        rows = [m(torch.randn(1, 2 + 3 * n, D, dtype=torch.float64, generator=g))[1]
                for n in range(len(lengths))]
    s0 = _cat_states(rows)
    leaves = {k: t.detach().clone().requires_grad_() for k, t in s0.tensors().items()
              if t.is_floating_point() or t.is_complex()}
    return dataclasses.replace(s0, **leaves), list(leaves.values())


def _dot(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (t * c).real.sum() if t.is_complex() else (t * c).sum()


@pytest.mark.parametrize("name", NAMES)
def test_packed_equals_separate(name, small_chunks):
    """One packed row (cu_seqlens) equals each sequence run alone from its own initial state:
    outputs, final states (one row per sequence) and the gradients of the inputs and of the
    initial states, in float64."""
    m = tiny(name)
    lengths = LENGTHS
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, sum(lengths), D, dtype=torch.float64, generator=g, requires_grad=True)
    s0, leaves = _initial_states(m, lengths, g)
    y, s = m(x, s0, cu_seqlens=cu)
    ys, finals = [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if b == a:  # an empty sequence keeps its initial state
            finals.append(_state_rows(s0, n))
            continue
        y_n, s_n = m(x[:, a:b], _state_rows(s0, n))
        ys.append(y_n)
        finals.append(s_n)
    want_y, want_s = torch.cat(ys, dim=1), _cat_states(finals)
    _close(y, want_y, 1e-9, f"{name} packed outputs")
    _states_close(s, want_s, 1e-9)
    assert s.batch_size == len(lengths), "one final state per sequence"
    outs = [y, *(t for t in s.tensors().values() if t.is_floating_point() or t.is_complex())]
    want = [want_y, *(want_s.tensors()[k] for k, t in s.tensors().items() if t.is_floating_point() or t.is_complex())]
    cots = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in outs]
    grads = torch.autograd.grad(sum(_dot(t, c) for t, c in zip(outs, cots)), [x, *leaves], allow_unused=True)
    want_grads = torch.autograd.grad(sum(_dot(t, c) for t, c in zip(want, cots)), [x, *leaves], allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, want_grads)):
        assert (a is None) == (b is None), f"{name}: gradient {i} reached one run only"
        if a is not None:
            _close(a, b, 1e-9, f"{name} gradient {i} (0: x, then the initial state's tensors)")
    assert grads[0].abs().sum() > 0 and any(gr is not None and gr.abs().sum() > 0 for gr in grads[1:]), \
        f"{name}: the initial states had no effect"


def _run_with_nan(name):
    """The packed row with a NaN in x at token NAN_AT of sequence NAN_SEQ: (cu, position, clean
    outputs and state, outputs and state with the NaN)."""
    m = tiny(name)
    lengths = LENGTHS
    seq, at = NAN_SEQ, NAN_AT
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, sum(lengths), D, dtype=torch.float64, generator=g)
    s0, _ = _initial_states(m, lengths, g)
    with torch.no_grad():
        clean = m(x, s0, cu_seqlens=cu)
        bad = x.clone()
        bad[:, cu[seq] + at] = float("nan")
        dirty = m(bad, s0, cu_seqlens=cu)
    return cu.tolist(), seq, cu[seq].item() + at, clean, dirty


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_stays_in_its_sequence(name, small_chunks):
    """A NaN in one sequence of a packed row changes no other sequence's outputs or final state."""
    cu, seq, p, (y, s), (y2, s2) = _run_with_nan(name)
    other = torch.ones(cu[-1], dtype=torch.bool)
    other[cu[seq]:cu[seq + 1]] = False
    assert torch.isfinite(y2[:, other]).all(), f"{name}: a NaN reached another sequence"
    _close(y2[:, other], y[:, other], 1e-12, f"{name} other sequences' outputs")
    rows = [n for n in range(len(cu) - 1) if n != seq]
    for k, t in s2.tensors().items():
        if t.is_floating_point() or t.is_complex():
            assert not t[rows].isnan().any(), f"{name}: a NaN reached another sequence's final state.{k}"
            _close(t[rows], s.tensors()[k][rows], 1e-12, f"{name} other sequences' final state.{k}")
    assert not torch.isfinite(y2[:, p:cu[seq + 1]]).all(), f"{name}: the NaN had no effect on its own sequence"


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_does_not_reach_earlier_tokens(name, small_chunks):
    """A NaN at token p of a sequence leaves the tokens before p unchanged (causality)."""
    cu, seq, p, (y, _), (y2, _) = _run_with_nan(name)
    assert torch.isfinite(y2[:, cu[seq]:p]).all(), f"{name}: a NaN reached earlier tokens of its sequence"
    _close(y2[:, cu[seq]:p], y[:, cu[seq]:p], 1e-12, f"{name} earlier tokens")


@pytest.mark.parametrize("name", NAMES)
def test_bad_cu_seqlens_name_the_argument(name):
    m = tiny(name)
    x = torch.randn(1, 7, D, dtype=torch.float64)
    bad = {"int64": torch.tensor([0, 3, 7], dtype=torch.int32), "start at 0": torch.tensor([1, 3, 7]),
           "non-decreasing": torch.tensor([0, 5, 3, 7]), "end at T = 7": torch.tensor([0, 3, 6]),
           "1-D": torch.tensor([[0, 3, 7]])}
    for why, cu in bad.items():
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{why}"):
            m(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens needs one packed row \\(B = 1\\), got B = 2"):
        m(torch.cat([x, x]), cu_seqlens=torch.tensor([0, 3, 7]))
    _, s = m(torch.randn(3, 4, D, dtype=torch.float64))
    with pytest.raises(StateError, match="3 rows, but cu_seqlens holds N = 2 sequences"):
        m(x, s, cu_seqlens=torch.tensor([0, 3, 7]))


def _number_options(name: str) -> list[str]:
    """The options of mixer ``name`` that hold an int or a float (or None)."""
    from rnnlab.configs import _base_type
    from rnnlab.models.registry import options_help
    return [opt for opt, _, _ in options_help(name) if _base_type(REGISTRY[name].config, opt) in (int, float)]


@pytest.mark.parametrize("name", NAMES)
def test_every_number_option_works_or_names_the_field(name):
    """Every int and float option of every config, set to 0, -1, -1.0, NaN or infinity, either
    gives a working layer (finite outputs) or a ValueError naming the option: never a traceback
    from inside the layer, never a NaN."""
    x = torch.randn(1, 6, D)
    for opt in _number_options(name):
        for value in (0, -1, -1.0, float("nan"), float("inf")):
            torch.manual_seed(0)
            try:
                layer = build_mixer(name, D, **{**REGISTRY[name].tiny, opt: value})
            except ValueError as e:
                assert opt in str(e), f"{name}({opt}={value}): the error does not name {opt}: {e}"
                continue
            with torch.no_grad():
                y, _ = layer(x)
            assert torch.isfinite(y).all(), f"{name}({opt}={value}) gives non-finite outputs"


def test_subclassed_configs_keep_their_fields_ranges():
    """A config that re-declares an inherited field (a new default) keeps the range the base
    declared (e.g. norm_eps > 0)."""
    for spec in REGISTRY.values():
        for base in spec.config.__mro__[1:]:
            if not dataclasses.is_dataclass(base):
                continue
            ranges = {f.name: f.metadata.get("range") for f in dataclasses.fields(spec.config)}
            for f in dataclasses.fields(base):
                assert f.metadata.get("range") == ranges[f.name], \
                    f"{spec.config.__name__}.{f.name} lost the range {base.__name__} declares"
