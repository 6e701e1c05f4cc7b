"""The benchmark commands run and end with one JSON line (timings are not asserted)."""
import json

from rnnlab.bench import ops


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
