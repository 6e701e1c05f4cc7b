"""Training on packed documents: boundaries from end-of-document tokens, and a packed loss equal to
the losses of the documents run alone."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from rnnlab.data import RandomWindows, SequentialWindows, TokenData, document_bounds
from rnnlab.train.evaluate import batch_logits, evaluate

EOD = 9


def test_document_bounds():
    x = torch.tensor([[1, 2, EOD, 3, 4, EOD], [EOD, 5, 6, 7, 8, 1]])
    assert document_bounds(x, EOD).tolist() == [0, 3, 6, 7, 12]  # row starts and after each EOD
    assert document_bounds(torch.tensor([[1, 2]]), EOD).tolist() == [0, 2]


@pytest.mark.parametrize("layout", ["gated_deltanet,mamba2", "mlstm,swa(window=4)", "attention,gla"])
def test_packed_loss_equals_documents_alone(layout):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=layout, n_layers=2, d_model=32, vocab_size=16).double()
    x = torch.randint(0, 9, (3, 24))
    x[0, 5], x[0, 6], x[1, 11], x[2, 23] = EOD, EOD, EOD, EOD  # documents of 6, 1, 17 tokens; 12 + 12; 24
    y = torch.randint(0, 16, (3, 24))
    cu = document_bounds(x, EOD)
    packed = batch_logits(model, x, cu)  # (3, 24, V)
    flat, alone = x.reshape(1, -1), []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone.append(model(flat[:, a:b])[0])
    alone = torch.cat(alone, 1).reshape(3, 24, -1)
    torch.testing.assert_close(packed, alone)
    loss = F.cross_entropy(packed.flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, F.cross_entropy(alone.flatten(0, 1), y.flatten()))
    plain = batch_logits(model, x)  # without boundaries, documents run into each other
    assert not torch.allclose(plain, packed)


def test_samplers_yield_boundaries_and_evaluate_uses_them():
    data = TokenData.from_tensor(torch.tensor(([1, 2, 3, 4, EOD] * 40)), eod_id=EOD, vocab_size=16)
    x, y, cu = next(iter(RandomWindows(data, 2, 12, boundaries=True)))
    assert torch.equal(cu, document_bounds(x, EOD)) and x.shape == y.shape == (2, 12)
    val = SequentialWindows(data, 2, 12, max_batches=2, boundaries=True)
    assert all(len(batch) == 3 for batch in val)
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gla", n_layers=1, d_model=16, vocab_size=16)
    assert evaluate(model, SequentialWindows(data, 2, 12, boundaries=True))["tokens"] == len(data) - 1
    with pytest.raises(ValueError, match="eod_id"):
        RandomWindows(TokenData.from_tensor(torch.arange(10)), 2, 4, boundaries=True)


def test_trainer_trains_on_packed_documents(tmp_path):
    from rnnlab.cli import main
    text = tmp_path / "docs"
    text.mkdir()
    for i in range(12):
        (text / f"{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (5 + i))
    res = main(["train", "--layout", "gated_deltanet,swa(window=8)", "--n-layers", "2", "--d-model", "16",
                "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--eval-every", "0", "--data", str(text),
                "--packing", "documents", "--out", str(tmp_path / "run"), "--quiet"])
    assert res["step"] == 3 and res["val_bits"] > 0
