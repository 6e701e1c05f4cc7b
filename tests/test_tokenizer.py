import pytest
import torch

from rnnlab import ByteTokenizer


def test_round_trip_unicode_and_specials():
    tok = ByteTokenizer()
    text = "naïve café — λx. x 🐍\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok(text).shape == (1, len(text.encode())) and tok(text).dtype == torch.long


def test_invalid_bytes_and_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 65]) == "\ufffdA"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
