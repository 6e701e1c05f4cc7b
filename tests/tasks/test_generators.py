"""Task generators: shapes, vocabularies, scored positions, and labels recomputed in plain Python."""
import itertools

import pytest
import torch

from rnnlab.tasks import (IGNORE, InductionConfig, MQARConfig, PasskeyConfig, SelectiveCopyConfig,
                          SetDisjointnessConfig, StateTrackingConfig, TaskBatches, accuracy, exact_match, generate)
from rnnlab.tasks.recall import STANDARD_SETTINGS
from rnnlab.tasks.tracking import GROUPS

CONFIGS = [
    MQARConfig(seq_len=64, kv_pairs=8, vocab_size=128),
    StateTrackingConfig("s5", 3, 20),
    PasskeyConfig(seq_len=40, key_len=4),
    SetDisjointnessConfig(3, 9, 16, short_first=False, jrt=True),
    SelectiveCopyConfig(region_len=30, n_tokens=6, n_symbols=5),
    InductionConfig(seq_len=25, n_symbols=7),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_shapes_ranges_and_seeds(config):
    x, y = generate(config, 50, 3)
    assert x.shape == y.shape == (50, config.seq_len) and x.dtype == y.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < config.vocab_size
    scored = y[y != IGNORE]
    assert scored.numel() > 0 and 0 <= int(scored.min()) and int(scored.max()) < config.vocab_size
    x2, y2 = generate(config, 50, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # an int seed and a Generator seeded alike agree
    x3, _ = generate(config, 50, 4)
    assert not torch.equal(x, x3)


def test_mqar_follows_zoology():
    c = MQARConfig(seq_len=128, kv_pairs=16, vocab_size=256)
    x, y = generate(c, 200, 0)
    P, half = c.kv_pairs, c.vocab_size // 2
    keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < c.vocab_size)).all()
    assert all(len(set(row)) == P for row in keys.tolist())
    assert all(len(set(row)) == P for row in values.tolist())
    assert (y[:, :2 * P] == IGNORE).all()
    for row_x, row_y, ks, vs in zip(x.tolist(), y.tolist(), keys.tolist(), values.tolist()):
        kv = dict(zip(ks, vs))
        scored = [t for t, target in enumerate(row_y) if target != IGNORE]
        assert len(scored) == P  # every key asked once
        assert sorted(row_x[t] for t in scored) == sorted(ks)
        assert all(row_y[t] == kv[row_x[t]] for t in scored)
        assert all((t - 2 * P) % 2 == 0 for t in scored)


def test_mqar_gaps_follow_the_power_law():
    """With alpha = 0.01 short gaps dominate; with alpha = 1 the gaps are uniform."""
    def mean_gap(alpha):
        c = MQARConfig(seq_len=256, kv_pairs=4, vocab_size=512, alpha=alpha)
        _, y = generate(c, 400, 0)
        pos = (y != IGNORE).nonzero()[:, 1]
        return ((pos - 2 * c.kv_pairs) / 2).float().mean().item()
    space = (256 - 8) // 2
    assert mean_gap(0.01) < 0.25 * space
    assert abs(mean_gap(1.0) - (space - 1) / 2) < 0.1 * space


def test_mqar_standard_settings_build():
    for T, P in STANDARD_SETTINGS:
        x, y = generate(MQARConfig(seq_len=T, kv_pairs=P), 2, 0)
        assert x.shape == (2, T) and int((y != IGNORE).sum()) == 2 * P


def _product(group, xs):
    """Running products recomputed with plain integers and tuples."""
    if group in ("parity", "mod3", "mod5"):
        m = {"parity": 2, "mod3": 3, "mod5": 5}[group]
        return [sum(xs[:t + 1]) % m for t in range(len(xs))]
    perms = list(itertools.permutations(range(int(group[1]))))
    y, out = perms[0], []
    for x in xs:
        y = tuple(perms[x][j] for j in y)  # first y, then x
        out.append(perms.index(y))
    return out


@pytest.mark.parametrize("group", GROUPS)
def test_state_tracking_labels(group):
    c = StateTrackingConfig(group, 3, 12)
    x, y = generate(c, 40, 1)
    G = c.num_elements
    assert G == {"parity": 2, "mod3": 3, "mod5": 5, "s3": 6, "s5": 120}[group]
    lengths = (x != G).sum(dim=1)
    assert int(lengths.min()) >= 3 and int(lengths.max()) <= 12 and len(set(lengths.tolist())) > 1
    for row_x, row_y, L in zip(x.tolist(), y.tolist(), lengths.tolist()):
        assert row_x[L:] == [G] * (12 - L) and row_y[L:] == [IGNORE] * (12 - L)
        assert row_y[:L] == _product(group, row_x[:L])


def test_passkey_layout():
    c = PasskeyConfig(seq_len=30, key_len=3, n_digits=10, n_filler=5)
    x, y = generate(c, 100, 2)
    starts = []
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x.count(c.key_token) == 1 and row_x.count(c.ask_token) == 1
        s = row_x.index(c.key_token)
        starts.append(s)
        key = row_x[s + 1:s + 4]
        assert s + 3 < 30 - 3  # the key block ends before the question
        assert row_x[27:] == [c.ask_token] + key[:2] and row_y[27:] == key and row_y[:27] == [IGNORE] * 27
        filler = [t for i, t in enumerate(row_x[:27]) if not s <= i <= s + 3]
        assert all(12 <= t < 17 for t in filler)
    assert min(starts) == 0 and max(starts) == 30 - 2 * 3 - 1  # every depth can occur


@pytest.mark.parametrize("short_first", [True, False])
@pytest.mark.parametrize("jrt", [False, True])
def test_set_disjointness_one_shared_element(short_first, jrt):
    c = SetDisjointnessConfig(4, 7, 20, short_first=short_first, jrt=jrt)
    x, y = generate(c, 60, 5)
    E = c.n_elements
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        once = row_x[:(c.seq_len - 1) // (2 if jrt else 1)]  # [1] A [2] B, the context read once
        if jrt:
            assert row_x[len(once):-1] == once
        assert once[0] == E and row_x[-1] == E + 2
        sep = once.index(E + 1)
        first, second = once[1:sep], once[sep + 1:]
        assert (len(first), len(second)) == ((4, 7) if short_first else (7, 4))
        assert len(set(first)) == len(first) and len(set(second)) == len(second)
        common = set(first) & set(second)
        assert len(common) == 1 and row_y[-1] == common.pop()
        assert row_y[:-1] == [IGNORE] * (len(row_y) - 1)


def test_selective_copy_targets_are_the_data_in_order():
    c = SelectiveCopyConfig(region_len=20, n_tokens=5, n_symbols=4)
    x, y = generate(c, 50, 0)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        data = [t for t in row_x[:20] if t != c.n_symbols]
        assert len(data) == 5 and row_x[20:] == [c.n_symbols + 1] * 5
        assert row_y[20:] == data and row_y[:20] == [IGNORE] * 20


def test_induction_heads_answer_follows_the_trigger():
    c = InductionConfig(seq_len=16, n_symbols=6)
    x, y = generate(c, 80, 0)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x.count(c.trigger_token) == 2 and row_x[-1] == c.trigger_token
        first = row_x.index(c.trigger_token)
        assert first <= 13 and row_y[-1] == row_x[first + 1] and row_y[:-1] == [IGNORE] * 15


@pytest.mark.parametrize("make, field", [
    (lambda: MQARConfig(seq_len=15, kv_pairs=4), "seq_len"),
    (lambda: MQARConfig(kv_pairs=0), "kv_pairs"),
    (lambda: MQARConfig(alpha=0.0), "alpha"),
    (lambda: StateTrackingConfig("s4"), "group"),
    (lambda: StateTrackingConfig("parity", 10, 5), "max_len"),
    (lambda: PasskeyConfig(seq_len=8, key_len=4), "seq_len"),
    (lambda: SetDisjointnessConfig(4, 8, 10), "n_elements"),
    (lambda: SetDisjointnessConfig(jrt="yes"), "jrt"),
    (lambda: SelectiveCopyConfig(region_len=3, n_tokens=4), "region_len"),
    (lambda: InductionConfig(seq_len=2), "seq_len"),
])
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n must be"):
        generate(MQARConfig(), 0)
    with pytest.raises(ValueError, match="generator"):
        generate(MQARConfig(), 2, -1)
    with pytest.raises(ValueError, match="config must be"):
        generate("mqar", 2)


def test_scoring():
    targets = torch.tensor([[IGNORE, 3, IGNORE, 4], [IGNORE, IGNORE, 5, IGNORE]])
    preds = torch.tensor([[9, 3, 9, 0], [1, 1, 5, 1]])
    assert accuracy(preds, targets) == pytest.approx(2 / 3)
    assert exact_match(preds, targets).tolist() == [False, True]
    with pytest.raises(ValueError, match="same shape"):
        accuracy(preds[:, :3], targets)


def test_task_batches_resume_where_they_stopped():
    c = MQARConfig(seq_len=16, kv_pairs=2, vocab_size=32)
    a = TaskBatches(c, 4, seed=1)
    first = [next(a) for _ in range(3)]
    b = TaskBatches(c, 4, seed=1)
    b.load_state_dict({"index": 2})
    assert torch.equal(next(b)[0], first[2][0])
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(next(TaskBatches(c, 4, seed=2))[0], first[0][0])
