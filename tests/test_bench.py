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
