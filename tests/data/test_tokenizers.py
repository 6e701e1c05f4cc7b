import json
import sys

import pytest
import torch

from rnnlab.data import ByteTokenizer, HFTokenizer, load_tokenizer
from rnnlab.models.hf import load_tokenizer as hf_load_tokenizer


def test_byte_tokenizer_spec_and_eos_reload():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.spec == "bytes" and tok.eos_id == 257
    again = load_tokenizer(tok.spec)
    assert isinstance(again, ByteTokenizer) and again.encode("abc é") == tok.encode("abc é")
    assert tok.decode(torch.tensor([[104, 105, 257]])) == "hi"
    assert load_tokenizer(tok) is tok  # a tokenizer object passes through


def test_hf_round_trip_and_interface(bpe_json, texts):
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(bpe_json))
    for spec in (bpe_json, bpe_json.parent, str(bpe_json)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == raw.get_vocab_size() > 256
        for text in texts + ["unseen wörds ∑ and emoji 🐍🐍"]:
            ids = tok.encode(text)
            assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text
            assert tok.decode(torch.tensor(ids)) == text
            t = tok(text)
            assert t.dtype == torch.int64 and t.shape == (1, len(ids)) and t[0].tolist() == ids
        assert tok.eos_id == raw.token_to_id("<|endoftext|>") and tok.eos_token == "<|endoftext|>"
    # the spec is enough to load the same tokenizer again
    again = load_tokenizer(tok.spec)
    assert again.spec == tok.spec and again.encode(texts[1]) == tok.encode(texts[1])
    assert again.eos_id == tok.eos_id


def test_hf_errors(bpe_json):
    tok = load_tokenizer(bpe_json)
    with pytest.raises(ValueError, match=r"token id 100000 is outside"):
        tok.decode([1, 100000])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="integers"):
        tok.decode(torch.tensor([1.0]))


def test_eos_from_tokenizer_config_then_candidates_then_error(tmp_path, make_wordlevel):
    words = {"[UNK]": 0, "a": 1, "b": 2, "</s>": 3, "<end>": 4}
    d = tmp_path / "wl"
    d.mkdir()
    make_wordlevel(d / "tokenizer.json", words)
    assert load_tokenizer(d).eos_id == 3  # "</s>" is a known end-of-document name
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>", "special": True}}))
    assert load_tokenizer(d).eos_id == 4  # tokenizer_config.json's eos_token wins
    assert load_tokenizer(d, eos_token="a").eos_id == 1  # an explicit eos_token wins over both

    bare = tmp_path / "bare.json"
    make_wordlevel(bare, {"[UNK]": 0, "x": 1, "y": 2})
    tok = load_tokenizer(bare)  # loads: encode/decode need no end-of-document token
    assert tok.encode("x y x") == [1, 2, 1] and tok.decode([2, 1]) == "y x"
    with pytest.raises(ValueError, match=r"no end-of-document token.*eos_token="):
        tok.eos_id
    with pytest.raises(ValueError, match="eos_token 'nope' is not in the vocabulary"):
        HFTokenizer(bare, eos_token="nope")


def test_bos_from_tokenizer_config_then_candidates_then_error(tmp_path, make_wordlevel):
    d = tmp_path / "wl"
    d.mkdir()
    make_wordlevel(d / "tokenizer.json", {"[UNK]": 0, "a": 1, "<s>": 2, "<start>": 3, "</s>": 4})
    assert load_tokenizer(d).bos_id == 2  # "<s>" is a known beginning-of-sequence name
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<start>", "special": True}}))
    assert load_tokenizer(d).bos_id == 3 and load_tokenizer(d).eos_id == 4  # the config's bos_token wins
    bare = tmp_path / "bare.json"
    make_wordlevel(bare, {"[UNK]": 0, "x": 1, "</s>": 2})
    with pytest.raises(ValueError, match="no beginning-of-sequence token"):
        load_tokenizer(bare).bos_id
    assert ByteTokenizer().bos_id == 256


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="neither 'bytes' nor an existing tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neither 'bytes'"):
        load_tokenizer("byte")  # a typo is not silently a path
    with pytest.raises(FileNotFoundError, match="directory without a tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(TypeError, match="tokenizer spec must be"):
        load_tokenizer(3)


def test_missing_tokenizers_package_is_a_clear_error(bpe_json, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(bpe_json)


def test_models_hf_load_tokenizer_uses_the_data_tokenizer(bpe_json, tmp_path):
    assert isinstance(hf_load_tokenizer(bpe_json.parent), HFTokenizer)
    assert isinstance(hf_load_tokenizer(tmp_path / "nothing"), ByteTokenizer)
