import pathlib

import pytest
import torch

from rnnlab.data import load_corpus, stdlib_files
from rnnlab.data.corpus import _is_val


@pytest.fixture()
def count_reads(monkeypatch):
    """Records every file ``load_corpus`` reads (it reads with Path.read_bytes)."""
    reads: list[pathlib.Path] = []
    original = pathlib.Path.read_bytes

    def counting(self):
        reads.append(self)
        return original(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", counting)
    return reads


def _files(tmp_path, n=40, size=1000):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_bytes(bytes([65 + i % 26]) * size)
    return d, sorted(d.iterdir())


def _reference(files, max_bytes, val_fraction):
    """The caps' rule applied after reading every file: what load_corpus must still return."""
    train, val = [], []
    for f in files:
        data = f.read_bytes()
        side, n = (val, sum(map(len, val))) if _is_val(f, val_fraction) else (train, sum(map(len, train)))
        if n < (max_bytes / 10 if side is val else max_bytes):
            side.append(data)
    return b"".join(train)[:max_bytes], b"".join(val)


def test_cap_stops_reading_once_both_sides_are_full(tmp_path, count_reads):
    d, files = _files(tmp_path)
    vf = 0.3
    val_files = [f for f in files if _is_val(f, vf)]
    assert 3 <= len(val_files) <= 30  # the hash puts some files on each side
    tr, va = load_corpus([str(d)], max_bytes=3000, val_fraction=vf)
    # 3 training files fill the training cap, 1 validation file fills a tenth of it; nothing else is read
    assert len(count_reads) == 4 and len(set(count_reads)) == 4
    assert len(tr) == 3000 and len(va) == 1000
    read_train = [f for f in count_reads if not _is_val(f, vf)]
    assert read_train == [f for f in files if not _is_val(f, vf)][:3]  # the first training files, in order
    count_reads.clear()
    ref_tr, ref_va = _reference(files, 3000, vf)
    assert bytes(tr.tolist()) == ref_tr and bytes(va.tolist()) == ref_va  # same output as before the fix


def test_side_that_is_full_is_not_read_but_the_other_still_is(tmp_path, count_reads):
    d, files = _files(tmp_path, n=40, size=500)
    vf = 0.3
    # a training cap of 1000 is full after 2 files; the validation cap (100) after 1 file
    tr, va = load_corpus([str(d)], max_bytes=1000, val_fraction=vf)
    assert len(tr) == 1000 and len(va) == 500 and len(count_reads) == 3
    count_reads.clear()
    tr_all, va_all = load_corpus([str(d)], val_fraction=vf)  # no cap: every file is read
    assert len(count_reads) == len(files) and len(tr_all) + len(va_all) == 40 * 500


def test_stdlib_cap_reads_few_files(count_reads):
    n_files = len(stdlib_files())
    tr, va = load_corpus(max_bytes=200_000)
    assert len(tr) == 200_000 and 0 < len(va) and tr.dtype == torch.uint8
    assert len(count_reads) < n_files / 4  # reading stopped long before the end of the stdlib
