"""The benchmark commands run and end with one JSON line (timings are not asserted)."""
import json

import pytest

from rnnlab.bench import ops
from rnnlab.ops import registry


def test_bench_ops_smoke(capsys):
    families = ["delta", "scan", "longhorn", "gsa", "memory", "lssl", "s4d"]
    rows = ops.main(["--T", "64", "--families", *families, "--ref-max-T", "64", "--repeats", "1", "--H", "2",
                     "--K", "8"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "ops" and len(last["results"]) == len(rows) == len(families)
    assert all(r["ref_fwdbwd_s"] > 0 and r["fast_fwdbwd_s"] > 0 for r in rows)


def test_bench_mixers_smoke(capsys):
    from rnnlab.bench import mixers
    rows = mixers.main(["--quick", "--mixers", "gla", "titans", "lstm"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "mixers" and [r["mixer"] for r in last["results"]] == ["gla", "titans", "lstm"]
    assert all(r["train_step_s"] > 0 and r["prefill_tok_s"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)


def test_bench_ops_reports_missing_backends(capsys, monkeypatch):
    """--backend fla on CPU: reported, and the rows say which form and backend ran (torch)."""
    monkeypatch.setattr(registry, "_reported", set())
    with pytest.warns(RuntimeWarning, match="'fla' is unavailable for 'ssd'"):
        rows = ops.main(["--T", "32", "--families", "ssd", "matrix_scan", "--backend", "fla", "--ref-max-T", "32",
                         "--repeats", "1", "--H", "2", "--K", "8"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["backend"] == "fla" and [r["family"] for r in rows] == ["ssd", "matrix_scan"]
    assert [(r["form"], r["backend"]) for r in rows] == [("chunked", "torch"), ("chunked", "torch")]
    assert rows[1]["fast_fwdbwd_s"] is None and rows[1]["fast_fwd_s"] > 0  # no autograd through matrix_scan
