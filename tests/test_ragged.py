"""Ragged batches: prompts of different lengths prefilled together (one packed row) and decoded as
one batch equal each prompt run alone, for every registered mixer; states split and join by rows."""
import pytest
import torch

import rnnlab
from rnnlab.models.registry import REGISTRY

NAMES = rnnlab.mixers()


def _model(name):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=f"{name}({','.join(f'{k}={v!r}' for k, v in REGISTRY[name].tiny.items())})"
                               if REGISTRY[name].tiny else name, n_layers=2, d_model=32, vocab_size=64)
    return model.double().eval()


@pytest.mark.parametrize("name", NAMES)
def test_ragged_prefill_and_batched_decode_equal_one_by_one(name):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (7, 1, 12)]
    batch = rnnlab.Stream(model)
    batch.feed(prompts)
    steps = [batch.sample(1, temperature=0).__next__() for _ in range(4)]  # (3,) each: greedy, batched
    together = torch.stack(steps, 1)  # (3, 4)
    for i, p in enumerate(prompts):
        alone = rnnlab.Stream(model)
        alone.feed(p)
        mine = torch.stack([alone.sample(1, temperature=0).__next__() for _ in range(4)], 1)  # (1, 4)
        assert torch.equal(mine[0], together[i]), f"prompt {i}"
        for block, a, b in zip(model.blocks, alone.state.layers, batch.state.select([i]).layers):
            if block.mixer.recurrent:  # a KV cache is padded to the batch's longest row: its decoding is compared
                for k, t in a.tensors().items():
                    torch.testing.assert_close(b.tensors()[k], t, msg=f"prompt {i} state {k}")


def test_state_rows_split_select_and_join():
    model = _model("gated_deltanet")
    _, st = model(torch.randint(0, 64, (4, 6)))
    parts = st.split([1, 3])
    assert [p.layers[0].batch_size for p in parts] == [1, 3]
    back = rnnlab.ModelState.cat(parts)
    for a, b in zip(back.layers, st.layers):
        assert all(torch.equal(a.tensors()[k], t) for k, t in b.tensors().items())
    picked = st.select([3, 0])
    for k, t in st.layers[0].tensors().items():
        assert torch.equal(picked.layers[0].tensors()[k], t[[3, 0]]), k
    with pytest.raises(rnnlab.StateError, match="add up"):
        st.split([1, 1])
    with pytest.raises(ValueError, match="tokens"):
        rnnlab.Stream(model).feed([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)])


def test_model_state_keeps_a_position_per_row():
    """ModelState.seen is (B,) int64: ragged prefill gives each row its own prompt's length, decoding
    adds one to every row, and select / split / cat carry the positions with the rows."""
    model = _model("gated_deltanet")
    s = rnnlab.Stream(model)
    s.feed([torch.randint(0, 64, (n,)) for n in (7, 1, 12)])
    assert s.state.seen.dtype == torch.int64 and s.state.seen.tolist() == [7, 1, 12]
    next(s.sample(1, temperature=0))
    st = s.state
    assert st.seen.tolist() == [8, 2, 13]
    assert st.select([2, 0]).seen.tolist() == [13, 8] and st.select(slice(1, 3)).seen.tolist() == [2, 13]
    assert [p.seen.tolist() for p in st.split([2, 1])] == [[8, 2], [13]]
    assert rnnlab.ModelState.cat([st.select([1]), st.select([0])]).seen.tolist() == [2, 8]
    assert rnnlab.ModelState(st.layers, 5).seen.tolist() == [5, 5, 5]  # an int: every row's
    with pytest.raises(rnnlab.StateError, match="seen has 2 rows, its layer states 3"):
        rnnlab.ModelState(st.layers, torch.tensor([1, 2]))
    with pytest.raises(rnnlab.StateError, match=r"seen must be a \(B,\) int64 tensor"):
        rnnlab.ModelState(st.layers, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(rnnlab.StateError, match="add up"):
        st.split([1, 1])
