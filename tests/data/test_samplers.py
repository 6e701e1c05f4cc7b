import io
import pickle

import pytest
import torch

from rnnlab.data import BatchSource, RandomWindows, SequentialWindows, TokenData, get_batch, prepare_corpus


def _arange(n=1000, vocab=None):
    """Tokens 0, 1, ..., n-1: a window's first token is its start."""
    return TokenData.from_tensor(torch.arange(n), vocab_size=vocab or n)


def _take(source, n):
    it = iter(source)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_shifted_windows_of_the_data():
    data = _arange()
    rw = RandomWindows(data, batch_size=8, seq_len=16, seed=3)
    assert isinstance(rw, BatchSource)
    for x, y in _take(rw, 5):
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        starts = x[:, 0]
        assert torch.equal(x, starts[:, None] + torch.arange(16)) and torch.equal(y, x + 1)
        assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 17
    assert rw.batches == 5


def test_determinism_by_seed_and_global_rng_untouched():
    data = _arange()
    before = torch.random.get_rng_state()
    a, b = _take(RandomWindows(data, 4, 8, seed=1), 6), _take(RandomWindows(data, 4, 8, seed=1), 6)
    c = _take(RandomWindows(data, 4, 8, seed=2), 6)
    assert _same(a, b) and not _same(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_every_start_is_reachable_including_the_last():
    data = _arange(20)
    rw = RandomWindows(data, batch_size=64, seq_len=5, seed=0)
    seen = set()
    for x, _ in _take(rw, 10):
        seen |= set(x[:, 0].tolist())
    assert seen == set(range(20 - 5))  # starts 0..14: the window [14, 20) ends at the last token
    exact = RandomWindows(_arange(6), batch_size=2, seq_len=5)  # seq_len + 1 tokens: one window only
    x, y = next(iter(exact))
    assert x.tolist() == [[0, 1, 2, 3, 4]] * 2 and y.tolist() == [[1, 2, 3, 4, 5]] * 2


@pytest.mark.parametrize("on_disk", [False, True])
def test_state_dict_resume_is_bit_identical(tmp_path, on_disk):
    if on_disk:
        src = tmp_path / "src"
        src.mkdir()
        for i in range(5):
            (src / f"f{i}.txt").write_text(f"text number {i} " * 50)
        prepare_corpus([str(src)], tmp_path / "out", shard_tokens=100, val_fraction=0.0, progress=False)
        data = TokenData.open(tmp_path / "out")
    else:
        data = _arange(5000)
    full = _take(RandomWindows(data, 6, 32, seed=7), 12)
    first = RandomWindows(data, 6, 32, seed=7)
    part = _take(first, 5)
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # checkpoints hold it: small, and loadable with weights_only
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert len(buf.getvalue()) < 20_000 and len(pickle.dumps(state)) < 20_000
    _take(first, 3)  # the original keeps going; the saved state is not affected
    second = RandomWindows(data, 6, 32, seed=7)
    second.load_state_dict(loaded)
    assert second.batches == 5
    assert _same(part + _take(second, 7), full)


@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_rank_slices_union_is_the_single_process_batch(world_size):
    data = _arange(3000)
    single = _take(RandomWindows(data, 6, 10, seed=5), 4)
    ranks = [_take(RandomWindows(data, 6, 10, seed=5, rank=r, world_size=world_size), 4) for r in range(world_size)]
    for step in range(4):
        xs = [ranks[r][step][0] for r in range(world_size)]
        ys = [ranks[r][step][1] for r in range(world_size)]
        assert all(x.shape == (6 // world_size, 10) for x in xs)
        assert torch.equal(torch.cat(xs), single[step][0]) and torch.equal(torch.cat(ys), single[step][1])


def test_resume_under_a_different_world_size():
    data = _arange(3000)
    one = RandomWindows(data, 4, 10, seed=9)
    full = _take(one, 6)
    one = RandomWindows(data, 4, 10, seed=9)
    _take(one, 2)
    state = one.state_dict()
    halves = []
    for r in range(2):
        s = RandomWindows(data, 4, 10, seed=9, rank=r, world_size=2)
        s.load_state_dict(state)
        halves.append(_take(s, 4))
    for step in range(4):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), full[2 + step][0])


def test_random_windows_errors():
    data = _arange(100)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by world_size \(4\)"):
        RandomWindows(data, 6, 8, world_size=4)
    with pytest.raises(ValueError, match=r"100 tokens, fewer than seq_len \+ 1 = 101"):
        RandomWindows(data, 2, 100)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        RandomWindows(data, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        RandomWindows(data, 0, 8)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        RandomWindows(data, 2, 2.5)
    with pytest.raises(TypeError, match="data must be a TokenData"):
        RandomWindows([1, 2, 3], 2, 1)
    state = RandomWindows(data, 2, 8).state_dict()
    with pytest.raises(ValueError, match="saved with seq_len=8 but this RandomWindows has seq_len=9"):
        RandomWindows(data, 2, 9).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with data_tokens=100"):
        RandomWindows(_arange(200), 2, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="not a RandomWindows state"):
        RandomWindows(data, 2, 8).load_state_dict(SequentialWindows(data, 2, 8).state_dict())
    with pytest.raises(ValueError, match="uint8 tensor"):
        RandomWindows(data, 2, 8).load_state_dict({**state, "generator": [1, 2]})


def test_a_raw_tensor_is_accepted_and_get_batch_still_works():
    t = torch.arange(50, dtype=torch.int32)
    x, y = next(iter(RandomWindows(t, 2, 4)))
    assert torch.equal(y, x + 1) and x.dtype == torch.int64
    gx, gy = get_batch(t, 3, 4, torch.Generator().manual_seed(0))
    assert gx.shape == (3, 4) and torch.equal(gy, gx + 1)


def _scored(batches):
    """(input, target) pairs of every scored position, in order."""
    out = []
    for x, y in batches:
        for row in range(x.shape[0]):
            keep = y[row] != -100
            out += list(zip(x[row][keep].tolist(), y[row][keep].tolist()))
    return out


@pytest.mark.parametrize("n,bs,T", [(101, 3, 10), (100, 4, 7), (12, 5, 11), (2, 1, 4)])
def test_sequential_windows_score_every_token_once_in_order(n, bs, T):
    data = TokenData.from_tensor(torch.arange(n) * 2, eod_id=1, vocab_size=2 * n)
    sw = SequentialWindows(data, bs, T)
    batches = list(sw)
    assert isinstance(sw, BatchSource) and len(batches) == len(sw) == -(-((n - 1 + T - 1) // T) // bs)
    assert _scored(batches) == [(2 * i, 2 * i + 2) for i in range(n - 1)]
    assert sw.scored_tokens == n - 1
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == T and 1 <= x.shape[0] <= bs and x.dtype == torch.int64
        assert torch.all(x[y == -100] == 1)  # inputs padded with the end-of-document id
    assert _same(list(sw), batches)  # a finished pass rewinds: the next iter() is the same pass


def test_sequential_windows_max_batches_ranks_and_resume():
    data = _arange(1000)
    full = list(SequentialWindows(data, 4, 16))
    capped = SequentialWindows(data, 4, 16, max_batches=3)
    assert _same(list(capped), full[:3]) and capped.scored_tokens == 3 * 4 * 16
    ranks = [list(SequentialWindows(data, 4, 16, rank=r, world_size=3)) for r in range(3)]
    assert _same([ranks[k % 3][k // 3] for k in range(len(full))], full)
    sw = SequentialWindows(data, 4, 16)
    it = iter(sw)
    head = [next(it) for _ in range(5)]
    state = sw.state_dict()
    again = SequentialWindows(data, 4, 16)
    again.load_state_dict(state)
    assert _same(head + list(again), full)
    with pytest.raises(ValueError, match="saved with batch_size=4"):
        SequentialWindows(data, 2, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        again.load_state_dict({**state, "batches": 10_000})


def test_sequential_windows_errors():
    with pytest.raises(ValueError, match="at least 2"):
        SequentialWindows(_arange(1), 2, 4)
    with pytest.raises(ValueError, match="max_batches must be an int >= 1"):
        SequentialWindows(_arange(10), 2, 4, max_batches=0)
    with pytest.raises(IndexError, match="batch index 9"):
        SequentialWindows(_arange(10), 2, 4).batch(9)


def test_bos_opens_every_window():
    data = _arange(40, vocab=64)
    rw = RandomWindows(data, batch_size=64, seq_len=5, seed=0, bos_id=63)
    starts = set()
    for x, y in _take(rw, 10):
        assert x.shape == y.shape == (64, 5) and torch.all(x[:, 0] == 63)
        first = y[:, 0]  # the first data token, predicted from the BOS alone
        assert torch.equal(y, first[:, None] + torch.arange(5)) and torch.equal(x[:, 1:], y[:, :-1])
        starts |= set(first.tolist())
    assert starts == set(range(40 - 5 + 1))  # T data tokens per window: the last start is 35
    exact = RandomWindows(_arange(5, vocab=64), batch_size=1, seq_len=5, bos_id=63)  # seq_len tokens suffice
    assert next(iter(exact))[0].tolist() == [[63, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"4 tokens, fewer than seq_len = 5"):
        RandomWindows(_arange(4, vocab=64), 1, 5, bos_id=63)
    with pytest.raises(ValueError, match=r"bos_id must be None or a token id in \[0, vocab_size=64\), got 64"):
        RandomWindows(data, 2, 5, bos_id=64)
    with pytest.raises(ValueError, match="saved with bos_id=None but this RandomWindows has bos_id=63"):
        RandomWindows(data, 2, 5, bos_id=63).load_state_dict(RandomWindows(data, 2, 5).state_dict())


@pytest.mark.parametrize("n,bs,T", [(101, 3, 10), (100, 4, 7), (12, 5, 11), (2, 1, 4)])
def test_sequential_windows_with_bos_score_every_token_after_a_bos(n, bs, T):
    data = TokenData.from_tensor(torch.arange(n) * 2, eod_id=1, vocab_size=2 * n + 1)
    bos = 2 * n
    sw = SequentialWindows(data, bs, T, bos_id=bos)
    batches = list(sw)
    assert len(batches) == len(sw) == -(-(-(-n // T)) // bs) and sw.scored_tokens == n
    for x, y in batches:
        assert torch.all(x[:, 0] == bos) and torch.all(x[:, 1:] != bos)
    pairs = _scored(batches)
    assert [t for _, t in pairs] == [2 * i for i in range(n)]  # every token scored once, the first too
    assert [i for i, _ in pairs] == [bos if k % T == 0 else 2 * (k - 1) for k in range(n)]
