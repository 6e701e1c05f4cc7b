import json

import numpy as np
import pytest
import torch

import rnnlab.data.shards as shards
from rnnlab.data import ByteTokenizer, TokenData, load_tokenizer, prepare_corpus
from rnnlab.data.corpus import _is_val

EOD = ByteTokenizer.eos_id


def _corpus(tmp_path, n=12):
    """Text files of different lengths (some multi-byte UTF-8, one invalid byte) -> (dir, {path: bytes})."""
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    docs = {}
    for i in range(n):
        p = d / ("sub" if i % 3 == 0 else "") / f"file{i:02d}.txt"
        data = (f"document {i}: héllo wörld 🐍 " * (i + 1)).encode() + (b"\xff" if i == 5 else b"")
        p.write_bytes(data)
        docs[p] = data
    return d, docs


def _expected(docs, val_fraction, encode=lambda b: list(b), eod=EOD):
    """The tokens of each split: its documents in sorted path order, each followed by eod."""
    out = {"train": [], "val": []}
    for p in sorted(docs):
        out["val" if _is_val(p, val_fraction) else "train"] += encode(docs[p]) + [eod]
    return out


def _all(td: TokenData) -> list[int]:
    return td.window(0, len(td)).tolist()


def test_bytes_round_trip_across_many_shards(tmp_path):
    d, docs = _corpus(tmp_path)
    vf = 0.3
    meta = prepare_corpus([str(d)], tmp_path / "out", shard_tokens=97, val_fraction=vf, progress=False)
    exp = _expected(docs, vf)
    assert exp["val"] and exp["train"]  # the hash puts files on both sides
    for split in ("train", "val"):
        td = TokenData.open(tmp_path / "out", split, verify=True)
        assert _all(td) == exp[split] and len(td) == len(exp[split])
        assert td.eod_id == EOD and td.vocab_size == 260 and td.split == split
        info = meta["splits"][split]
        assert info["tokens"] == len(exp[split]) and info["documents"] == exp[split].count(EOD)
        assert info["bytes"] == len(exp[split]) - info["documents"] == td.num_bytes
        assert td.num_documents == info["documents"]
        assert td.bytes_per_token == pytest.approx(info["bytes"] / info["tokens"]) and td.bytes_per_token < 1
        names = [s["name"] for s in info["shards"]]
        assert names == [f"{split}_{i:05d}.bin" for i in range(len(names))] and len(names) == -(-len(td) // 97)
        for s in info["shards"]:  # uint16 on disk, sizes as recorded
            assert (tmp_path / "out" / s["name"]).stat().st_size == 2 * s["tokens"]
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta and meta["dtype"] == "uint16" and meta["tokenizer"] == "bytes"
    assert meta["format"] == "rnnlab-tokens" and meta["version"] == 1 and len(meta["sha256"]) == 64
    assert isinstance(TokenData.open(tmp_path / "out").tokenizer(), ByteTokenizer)
    # the same input gives the same content hash; a changed file changes it
    again = prepare_corpus([str(d)], tmp_path / "out2", shard_tokens=97, val_fraction=vf, progress=False)
    assert again["sha256"] == meta["sha256"]
    next(iter(docs)).write_bytes(b"changed")
    assert prepare_corpus([str(d)], tmp_path / "out3", shard_tokens=97, val_fraction=vf,
                          progress=False)["sha256"] != meta["sha256"]


def test_windows_across_shard_ends_match_the_joined_tokens(tmp_path):
    d, docs = _corpus(tmp_path, n=4)
    prepare_corpus([str(d)], tmp_path / "out", shard_tokens=5, val_fraction=0.0, progress=False)
    td = TokenData.open(tmp_path / "out")
    full = torch.tensor(_all(td))
    assert len(td.meta["splits"]["train"]["shards"]) > 10
    for start in range(0, 40):
        for n in range(0, 13):
            w = td.window(start, n)
            assert w.dtype == torch.int64 and torch.equal(w, full[start:start + n])
    assert torch.equal(td.window(len(td) - 7, 7), full[-7:])
    starts = torch.tensor([0, 3, 9])
    assert torch.equal(td.windows(starts, 6), torch.stack([full[s:s + 6] for s in starts.tolist()]))
    for bad in [(-1, 2), (len(td) - 1, 2), (0, -1)]:
        with pytest.raises(IndexError, match="outside the data"):
            td.window(*bad)


def test_hf_tokenizer_uint16_and_tokenizer_copy(tmp_path, bpe_json):
    d, docs = _corpus(tmp_path, n=6)
    tok = load_tokenizer(bpe_json)
    meta = prepare_corpus([str(d)], tmp_path / "out", tokenizer=str(bpe_json), shard_tokens=50,
                          val_fraction=0.3, progress=False)
    enc = lambda b: tok.encode(b.decode("utf-8", errors="replace"))  # noqa: E731
    exp = _expected(docs, 0.3, enc, tok.eos_id)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["eod_id"] == tok.eos_id
    assert meta["tokenizer"] == tok.spec and meta["tokenizer_file"] == "tokenizer.json"
    td = TokenData.open(tmp_path / "out")
    assert _all(td) == exp["train"] and _all(TokenData.open(tmp_path / "out", "val")) == exp["val"]
    copy = td.tokenizer()  # the directory's own copy of the tokenizer
    assert copy.file.parent == (tmp_path / "out").resolve() and copy.eos_id == tok.eos_id
    first_doc = td.window(0, exp["train"].index(tok.eos_id)).tolist()
    first_path = next(p for p in sorted(docs) if not _is_val(p, 0.3))
    assert copy.decode(first_doc) == docs[first_path].decode("utf-8", errors="replace")


def test_uint32_when_the_vocabulary_is_large(tmp_path, make_wordlevel):
    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tj = make_wordlevel(tmp_path / "big.json", words, eos="<|endoftext|>")
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text("w1 w65535 w65536 w69999")
    (d / "b.txt").write_text("w2 w66000")
    meta = prepare_corpus([str(d)], tmp_path / "out", tokenizer=tj, shard_tokens=3, val_fraction=0.0,
                          progress=False)
    eod = meta["eod_id"]
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and eod == 70_000
    sizes = [(tmp_path / "out" / s["name"]).stat().st_size for s in meta["splits"]["train"]["shards"]]
    assert sizes == [4 * s["tokens"] for s in meta["splits"]["train"]["shards"]]
    # two files, no validation file: the last 10% of the training bytes are held out (split in two docs)
    train, val = _all(TokenData.open(tmp_path / "out")), _all(TokenData.open(tmp_path / "out", "val"))
    assert train[:5] == [1, 65535, 65536, 69999, eod] and train[-1] == eod and val[-1] == eod
    # 32 bytes in all, cut at int(0.9 * 32) = 28: inside b.txt, after "w2 w6" ("6000" is unknown: id 0)
    assert train[5:] == [2, 6, eod] and val == [0, eod]
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len("w1 w65535 w65536 w69999") + 9


def test_tiny_corpus_without_validation_file_holds_out_the_last_tenth(tmp_path):
    f = tmp_path / "only.txt"
    data = bytes(range(32, 127)) * 3
    f.write_bytes(data)
    meta = prepare_corpus([str(f)], tmp_path / "out", val_fraction=0.0, progress=False)
    cut = int(len(data) * 0.9)
    assert _all(TokenData.open(tmp_path / "out")) == list(data[:cut]) + [EOD]
    assert _all(TokenData.open(tmp_path / "out", "val")) == list(data[cut:]) + [EOD]
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_max_bytes_caps_what_is_read(tmp_path):
    d, docs = _corpus(tmp_path)
    meta = prepare_corpus([str(d)], tmp_path / "out", val_fraction=0.3, max_bytes=1000, progress=False)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["bytes"] == 1000 and 0 < va["bytes"] <= 100
    train = _all(TokenData.open(tmp_path / "out"))
    train_docs = [docs[p] for p in sorted(docs) if not _is_val(p, 0.3)]
    joined = b"".join(train_docs)[:1000]
    assert [t for t in train if t != EOD] == list(joined) and train[-1] == EOD


def test_progress_bar_over_files(tmp_path, capsys):
    d, docs = _corpus(tmp_path, n=5)
    prepare_corpus([str(d)], tmp_path / "out", val_fraction=0.3, progress=True)
    err = capsys.readouterr().err
    assert "file" in err and "5/5" in err


def test_output_inside_an_input_directory_is_not_read(tmp_path):
    d, docs = _corpus(tmp_path, n=5)
    prepare_corpus([str(d)], d / "prepared", val_fraction=0.3, progress=False)
    meta = prepare_corpus([str(d)], d / "prepared", val_fraction=0.3, progress=False)  # again, over itself
    assert meta["source"]["files"] == 5
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == 5


def test_interrupted_prepare_leaves_no_meta_json(tmp_path, monkeypatch):
    d, docs = _corpus(tmp_path)
    out = tmp_path / "out"
    prepare_corpus([str(d)], out, shard_tokens=40, val_fraction=0.3, progress=False)  # a complete directory
    assert (out / "meta.json").is_file()
    calls = []
    real = shards._encode

    def failing(tok, data):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated interruption")
        return real(tok, data)

    monkeypatch.setattr(shards, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(d)], out, shard_tokens=40, val_fraction=0.3, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in names and not any(n.startswith(".tmp-") for n in names)
    assert any(n.startswith("train_") for n in names)  # some shards were finished before the interruption
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TokenData.open(out)
    # running again finishes the job, and leaves no shard of the earlier runs behind
    monkeypatch.setattr(shards, "_encode", real)
    meta = prepare_corpus([str(d)], out, shard_tokens=10_000, val_fraction=0.3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_00000.bin", "val_00000.bin"]
    assert _all(TokenData.open(out)) == _expected(docs, 0.3)["train"] and meta["splits"]["train"]["shards"]


def test_failure_while_writing_meta_leaves_no_meta_json(tmp_path, monkeypatch):
    d, _ = _corpus(tmp_path, n=3)
    real = shards.os.replace

    def no_meta(src, dst):
        if str(dst).endswith("meta.json"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(shards.os, "replace", no_meta)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus([str(d)], tmp_path / "out", progress=False)
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert "meta.json" not in names and not any(n.startswith(".tmp-") for n in names)


def test_open_errors(tmp_path):
    d, _ = _corpus(tmp_path, n=4)
    out = tmp_path / "out"
    meta = prepare_corpus([str(d)], out, shard_tokens=30, val_fraction=0.0, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenData.open(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no meta.json: not a corpus"):
        TokenData.open(d)
    with pytest.raises(ValueError, match="split must be one of"):
        TokenData.open(out, "test")
    shard = out / meta["splits"]["train"]["shards"][1]["name"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(ValueError, match="has 58 bytes but meta.json says 30 tokens"):
        TokenData.open(out)
    shard.write_bytes(good[:-2] + b"\x00\x01")  # same size, different content
    assert len(TokenData.open(out)) == meta["splits"]["train"]["tokens"]  # sizes are checked on open...
    with pytest.raises(ValueError, match="sha256"):
        TokenData.open(out, verify=True)  # ...content with verify=True
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        TokenData.open(out)
    for change, msg in [({"version": 99}, "format version 99, newer than"), ({"format": "other"}, "not an rnnlab"),
                        ({"dtype": "float32"}, "dtype 'float32'")]:
        (out / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=msg):
            TokenData.open(out)


def test_prepare_errors(tmp_path, make_wordlevel):
    d, _ = _corpus(tmp_path, n=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare_corpus([str(d)], tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    no_eos = make_wordlevel(tmp_path / "tok.json", {"[UNK]": 0, "a": 1})
    with pytest.raises(ValueError, match="no end-of-document token"):
        prepare_corpus([str(d)], tmp_path / "o1", tokenizer=str(no_eos), progress=False)
    assert not (tmp_path / "o1").exists()  # nothing is written before the inputs are checked
    with pytest.raises(ValueError, match="shard_tokens must be a positive int"):
        prepare_corpus([str(d)], tmp_path / "o2", shard_tokens=0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare_corpus([str(d)], tmp_path / "o2", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_corpus([str(tmp_path / "*.nothing")], tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="the corpus is empty"):
        prepare_corpus([str(tmp_path / "empty")], tmp_path / "o3", progress=False)


def test_from_tensor(tmp_path):
    t = torch.tensor([5, 1, 257, 3, 0], dtype=torch.int16)
    td = TokenData.from_tensor(t, eod_id=257, vocab_size=260)
    assert len(td) == 5 and td.eod_id == 257 and td.vocab_size == 260 and td.num_documents is None
    assert td.bytes_per_token is None and TokenData.from_tensor(t, num_bytes=10).bytes_per_token == 2.0
    w = td.window(1, 3)
    assert w.dtype == torch.int64 and w.tolist() == [1, 257, 3]
    w[0] = 99
    assert int(t[1]) == 1  # windows are copies
    assert TokenData.from_tensor(torch.tensor([3, 9], dtype=torch.uint8)).vocab_size == 10
    for bad, err, msg in [(torch.zeros(2, 3, dtype=torch.long), ValueError, "1-D"),
                          (torch.zeros(3), TypeError, "integer dtype"),
                          (np.zeros(3, dtype=np.int64), TypeError, "torch.Tensor")]:
        with pytest.raises(err, match=msg):
            TokenData.from_tensor(bad)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=8\)"):
        TokenData.from_tensor(torch.tensor([1, 8]), vocab_size=8)
    with pytest.raises(ValueError, match="eod_id 9 is outside"):
        TokenData.from_tensor(torch.tensor([1, 2]), eod_id=9, vocab_size=8)
    with pytest.raises(ValueError, match="num_bytes must be a non-negative int"):
        TokenData.from_tensor(torch.tensor([1, 2]), num_bytes=-1)
    with pytest.raises(ValueError, match="made from a tensor"):
        td.tokenizer()
