"""Tiny tokenizer.json files built in the test with the ``tokenizers`` library (nothing is downloaded)."""
from pathlib import Path

import pytest

TEXTS = ["hello world, hello rnnlab", "héllo wörld 🐍 tokens", "the quick brown fox jumps over the lazy dog"]


def bpe_tokenizer_json(path: Path, eos: str | None = "<|endoftext|>", vocab_size: int = 320) -> Path:
    """Train a byte-level BPE on TEXTS and save it to ``path`` (specials: ``eos`` if given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(path))
    return path


def wordlevel_tokenizer_json(path: Path, words: dict[str, int], eos: str | None = None) -> Path:
    """A whitespace WordLevel tokenizer with vocabulary ``words`` (``eos`` added as a special)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos is not None:
        tok.add_special_tokens([AddedToken(eos, special=True)])
    tok.save(str(path))
    return path


@pytest.fixture()
def bpe_json(tmp_path) -> Path:
    """A byte-level BPE tokenizer.json with an <|endoftext|> special, in its own directory."""
    d = tmp_path / "bpe"
    d.mkdir()
    return bpe_tokenizer_json(d / "tokenizer.json")


@pytest.fixture()
def texts() -> list[str]:
    """The strings the test tokenizers are trained on."""
    return list(TEXTS)


@pytest.fixture()
def make_wordlevel():
    """The WordLevel builder, ``make_wordlevel(path, words, eos=None) -> path``."""
    return wordlevel_tokenizer_json


@pytest.fixture()
def make_bpe():
    """The BPE builder, ``make_bpe(path, eos="<|endoftext|>") -> path``."""
    return bpe_tokenizer_json
