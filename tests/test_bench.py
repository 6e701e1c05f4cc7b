"""The benchmark commands run and end with one JSON line (timings are not asserted)."""
import json
import time

import pytest
import torch

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


# -- rnnlab bench speed ------------------------------------------------------------------------------------
def _speed(argv, tmp_path, capsys, name="out"):
    """Run ``rnnlab bench speed`` through the command line; returns (final JSON line, JSON file)."""
    from rnnlab.cli import main as cli
    path = tmp_path / f"{name}.json"
    cli(["bench", "speed", *argv, "--json", str(path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "speed" and last["mode"] == argv[0] and "load_avg" in last and "others_running" in last
    saved = json.loads(path.read_text())
    assert saved["results"] == last["results"]
    png = path.with_suffix(".png")
    assert last["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return last, saved


def test_speed_layers(tmp_path, capsys):
    last, saved = _speed(["layers", "--quick", "--mixers", "mamba2", "--T", "32", "64"], tmp_path, capsys)
    rows = last["results"]
    assert [(r["mixer"], r["T"]) for r in rows] == [("attention", 32), ("mamba2", 32), ("attention", 64), ("mamba2", 64)]
    assert saved["mm_peak_flops"] > 0
    for r in rows:
        assert r["status"] == "ok" and r["fwd_s"] > 0 and r["fwdbwd_s"] > 0
        assert r["fwd_peak_bytes"] > 0 and r["fwdbwd_peak_bytes"] > r["fwd_peak_bytes"]  # backward keeps activations
        assert 0 < r["fwd_floor_s"] < r["fwdbwd_floor_s"] and r["mix_flops"] > 0
    assert rows[0]["options"] == {"num_heads": 2, "head_dim": 32} and rows[1]["options"] == {"head_dim": 32}
    assert rows[0]["fwdbwd_vs_attention"] == 1.0


@pytest.mark.parametrize("budget", [["--budget-s", "1e-9"], ["--budget-gb", "1e-12"]])
def test_speed_layers_over_budget(tmp_path, capsys, budget):
    """A mixer passing the budget at the first T keeps that row's measurement and is not run at larger T."""
    last, _ = _speed(["layers", "--quick", "--mixers", "mingru", "--T", "16", "32", *budget], tmp_path, capsys)
    first, second = last["results"][:2], last["results"][2:]
    for r in first:
        assert r["T"] == 16 and r["status"].startswith("budget passed here") and r["fwd_s"] > 0
        assert r["fwdbwd_s"] is None  # the forward already passed the budget
    for r, before in zip(second, first):
        assert r["mixer"] == before["mixer"] and r["T"] == 32
        assert r["status"] == "over budget (passed at T=16: " + before["status"].split("(", 1)[1]
        assert r["fwd_s"] is None and r["fwdbwd_s"] is None


def test_speed_models(tmp_path, capsys):
    last, _ = _speed(["models", "--quick", "--mixers", "mingru", "--T", "32"], tmp_path, capsys)
    att, mine = last["results"]
    assert (att["mixer"], mine["mixer"]) == ("attention", "mingru") and att["train_vs_attention"] == 1.0
    for r in (att, mine):
        assert r["train_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["params"] > 0 and r["train_peak_bytes"] > 0
        assert r["recompute"] is False
    assert last["backend"] == "torch"
    assert mine["train_vs_attention"] == pytest.approx(mine["train_tok_s"] / att["train_tok_s"])


def test_speed_models_recompute_keeps_less(tmp_path, capsys):
    """--recompute: every model keeps only its blocks' inputs, so a training step's peak memory is
    lower than without, and the rows say so."""
    peaks = {}
    for flag in ([], ["--recompute"]):
        last, _ = _speed(["models", "--quick", "--mixers", "gated_deltanet", "--T", "256", *flag], tmp_path, capsys)
        assert [r["recompute"] for r in last["results"]] == [bool(flag)] * 2
        peaks[bool(flag)] = {r["mixer"]: r["train_peak_bytes"] for r in last["results"]}
    for name in ("attention", "gated_deltanet"):
        assert peaks[True][name] < 0.8 * peaks[False][name], (name, peaks)


def test_speed_models_and_layers_under_autocast(tmp_path, capsys):
    """--autocast bf16 trains and prefills (models) and runs fwd / fwd+bwd (layers) under bfloat16
    autocast, for a mixer with a short convolution too, and says so in the JSON."""
    last, _ = _speed(["models", "--quick", "--mixers", "gated_deltanet", "--T", "32", "--autocast", "bf16"],
                     tmp_path, capsys)
    assert last["autocast"] == "bf16" and [r["mixer"] for r in last["results"]] == ["attention", "gated_deltanet"]
    assert all(r["status"] == "ok" and r["train_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in last["results"])
    last, _ = _speed(["layers", "--quick", "--mixers", "mamba2", "--T", "32", "--autocast", "bf16"], tmp_path, capsys, "l")
    assert last["autocast"] == "bf16" and all(r["status"] == "ok" and r["fwdbwd_s"] > 0 for r in last["results"])


def test_speed_models_same_params(tmp_path, capsys):
    """--same-params times, beside each mixer's model, the Transformer whose MLP makes its parameter
    count match (to within one step of 8 hidden units)."""
    last, _ = _speed(["models", "--quick", "--mixers", "gated_deltanet", "--T", "32", "--same-params"], tmp_path, capsys)
    att, mine = last["results"]
    twin = mine["same_params_attention"]
    assert twin["params"] != att["params"] and twin["d_ff"] % 8 == 0
    assert abs(twin["params"] - mine["params"]) <= 3 * 64 * 2 * 4  # d_model 64, 2 layers, d_ff off by <= 4
    assert twin["train_s"] > 0 and twin["prefill_s"] > 0
    assert mine["train_vs_attention_same_params"] == pytest.approx(twin["train_s"] / mine["train_s"])


def test_speed_decode(tmp_path, capsys):
    last, saved = _speed(["decode", "--quick", "--layouts", "mingru", "attention(num_heads=2)", "--contexts", "16",
                          "48", "--steps", "2", "--prefill-chunk", "16"], tmp_path, capsys)
    rows = {(r["model"], r["context"]): r for r in last["results"]}
    assert set(rows) == {("mingru", 16), ("mingru", 48), ("attention(num_heads=2)", 16), ("attention(num_heads=2)", 48)}
    assert all(r["ms_per_token"] > 0 and r["floor_weights_s"] > 0 and r["status"] == "ok" for r in rows.values())
    assert saved["bandwidth_bytes_s"] > 0
    # a recurrent state does not grow with the context, the KV cache does
    assert rows[("mingru", 16)]["state_bytes"] == rows[("mingru", 48)]["state_bytes"]
    assert rows[("attention(num_heads=2)", 48)]["state_bytes"] > rows[("attention(num_heads=2)", 16)]["state_bytes"]


def test_speed_ragged(tmp_path, capsys):
    last, _ = _speed(["ragged", "--quick", "--layouts", "mingru", "gla", "--prompts", "1", "3", "--T", "24",
                      "--repeats", "1"], tmp_path, capsys)
    rows = {(r["model"], r["prompts"]): r for r in last["results"]}
    assert set(rows) == {("mingru", 1), ("mingru", 3), ("gla", 1), ("gla", 3)}
    r = rows[("gla", 3)]
    assert r["tokens"] <= r["padded_tokens"] == 3 * max(0, r["padded_tokens"] // 3) and r["tokens"] >= 3
    assert all(r[k] > 0 for k in ("packed_ms", "padded_ms", "one_by_one_ms"))
    assert r["fastest"] in ("packed", "padded", "one_by_one")


def test_speed_efficiency(tmp_path, capsys):
    last, _ = _speed(["efficiency", "--quick", "--families", "delta_vector", "mlstm", "scan", "sdpa", "--T", "64"],
                     tmp_path, capsys)
    assert [r["case"] for r in last["results"]] == ["delta_vector", "mlstm", "scan", "sdpa"]
    assert all(r["fwd_s"] > 0 and r["flops"] > 0 and r["fraction_of_peak"] > 0 for r in last["results"])


def test_kernel_flops_match_the_kernels():
    """The FLOP formulas count what the chunked kernels do: torch's counter sees every matmul, the
    formula adds the triangular solve against I (delta, finite inputs) that the counter does not count."""
    from torch.utils.flop_counter import FlopCounterMode

    from rnnlab.bench.flops import kernel_flops
    B, T, H, K = 1, 200, 2, 16  # T not a multiple of the chunk: padded chunks count
    for case, solve in (("ssd", 0), ("delta", 4 * 2 * 64 ** 3)):
        x = registry.get_family(case).inputs(B, T, H, K)
        with FlopCounterMode(display=False) as counter:
            registry.get_family(case).form("chunked")(**x, chunk_size=64)
        assert kernel_flops(case, B, T, H, K, K, 64) == counter.get_total_flops() + solve
    # vector decays with factored scores (finite inputs in range): the counter misses the 2CK scalings
    x = registry.get_family("gla").inputs(B, T, H, K)
    with FlopCounterMode(display=False) as counter:
        registry.get_family("gla").form("chunked")(**x, chunk_size=32)
    assert kernel_flops("gla", B, T, H, K, K, 32, None) == counter.get_total_flops() + B * H * 7 * 2 * 32 * K  # 7 chunks


def test_layer_flops_attention():
    from rnnlab.bench.flops import attention_pairs, layer_flops
    from rnnlab.models.registry import build_mixer
    assert attention_pairs(5) == 15 and attention_pairs(5, window=2, sinks=1) == 1 + 2 + 3 + 3 + 3
    layer = build_mixer("attention", 32, num_heads=2)
    params = sum(p.numel() for p in layer.parameters())
    f = layer_flops(layer, "attention", 2, 10)
    assert f["proj"] == 2 * params * 2 * 10 and f["mix"] == 4 * 2 * 2 * 16 * 55


def test_speed_peers_missing_and_disagreeing(tmp_path, capsys, monkeypatch):
    """A peer that cannot be imported or disagrees is a row saying so; one that agrees is timed."""
    import sys
    import types

    from rnnlab.ops.delta import gated_delta_rule_recurrent
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # not importable, even where installed
    good = types.ModuleType("fla.ops.simple_gla.naive")  # a stand-in "peer": rnnlab's own reference loop
    good.naive_chunk_simple_gla = lambda q, k, v, g, initial_state, output_final_state, chunk_size: \
        gated_delta_rule_recurrent(q, k, v, log_g=g, initial_state=initial_state)
    bad = types.ModuleType("fla.ops.gla.naive")
    bad.naive_recurrent_gla = lambda q, k, v, gk, initial_state, output_final_state: (v + 1, None)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla.naive", good)
    monkeypatch.setitem(sys.modules, "fla.ops.gla.naive", bad)
    last, _ = _speed(["peers", "--quick", "--peers", "mamba_ssm:selective_scan", "fla:gla", "fla:simple_gla",
                      "transformers:mamba2", "--T", "32"], tmp_path, capsys)
    rows = {r["peer"]: r for r in last["results"]}
    assert rows["mamba_ssm:selective_scan"]["status"].startswith("missing: mamba_ssm")
    assert rows["fla:gla"]["status"].startswith("outputs differ") and rows["fla:gla"]["T"] is None
    for name in ("fla:simple_gla", "transformers:mamba2"):
        r = rows[name]
        assert r["status"] == "ok" and r["max_abs_diff"] < 1e-3 and r["T"] == 32
        assert all(r[k] > 0 for k in ("rnnlab_fwd_s", "peer_fwd_s", "rnnlab_fwdbwd_s", "peer_fwdbwd_s"))


def test_speed_bad_arguments(capsys):
    from rnnlab.bench import speed
    for argv, flag in ((["layers", "--T", "0"], "--T"), (["models", "--mixers", "nope"], "--mixers"),
                       (["efficiency", "--families", "nope"], "--families"), (["peers", "--peers", "x"], "--peers"),
                       (["layers", "--d-model", "48", "--head-dim", "32"], "--d-model"),
                       (["decode", "--autocast", "bf16"], "--autocast"), (["layers", "--recompute"], "--recompute"),
                       (["decode", "--same-params"], "--same-params"), (["decode", "--backend", "compile"], "--backend")):
        with pytest.raises(SystemExit):
            speed.main(argv)
        assert flag in capsys.readouterr().err


def test_stream_100k_tokens_in_bounded_memory(tmp_path, capsys):
    from rnnlab.bench import stream
    rows = stream.main(["--tokens", "100000", "--at", "10000", "--chunk", "10000", "--d-model", "16", "--n-layers", "2",
                        "--layouts", "mingru", "mingru,swa(window=64,sinks=4)", "attention", "--max-gb", "0.002",
                        "--json", str(tmp_path / "s.json")])
    by = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    for lay in ("mingru", "mingru,swa(window=64,sinks=4)"):
        first, last = by[lay]
        assert (first["tokens"], last["tokens"]) == (10_000, 100_000) and last["status"] == "ok"
        assert first["state_bytes"] == last["state_bytes"]  # a constant-size state
        assert last["rss_bytes"] - first["rss_bytes"] < 64 * 2**20  # and memory that does not grow with it
    att = by["attention"][-1]
    assert att["status"].startswith("over budget") and att["tokens"] < 100_000  # the KV cache grows until stopped
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "stream"


def test_timeit_runs_the_warmup_calls_untimed_and_stops_when_the_last_is_slow():
    from rnnlab.bench.measure import timeit
    calls = []
    t = timeit(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)
    assert len(calls) == 5 and t.repeats == 3 and not t.over
    calls.clear()
    t = timeit(lambda: calls.append(time.sleep(0.01)), torch.device("cpu"), repeats=3, budget_s=0.001, warmup=2)
    assert len(calls) == 2 and t.over  # the last warm-up call passed the budget: nothing more runs
    calls.clear()  # a slow first call (compiling) alone does not stop the timing
    t = timeit(lambda: calls.append(time.sleep(0.05 if not calls else 0)), torch.device("cpu"), repeats=3,
               budget_s=0.03, warmup=2)
    assert len(calls) == 5 and not t.over and t.seconds < 0.03
    with pytest.raises(ValueError, match="warmup"):
        timeit(lambda: None, torch.device("cpu"), repeats=1, warmup=0)
