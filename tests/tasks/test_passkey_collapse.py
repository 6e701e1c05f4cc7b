"""Passkey's state collapse: the state norm against position, the mitigations, the benchmark's new
outputs, and the set-disjointness preset where the long set overflows a small state."""
import csv
import json

import pytest
import torch

import rnnlab
from rnnlab.bench import tasks as bench
from rnnlab.inference import with_mixer_options
from rnnlab.tasks import IGNORE, PasskeyConfig, after_filler, generate, state_norm, state_norms


def _model():
    torch.manual_seed(0)
    return rnnlab.build_model(layout="mamba2(d_state=8,head_dim=16),attention,gated_deltanet(num_heads=2)",
                              n_layers=3, d_model=32, vocab_size=28)


def test_state_norms_match_a_whole_forward_at_each_position():
    model = _model()
    x, _ = generate(PasskeyConfig(seq_len=45), 3, 0)
    positions, norms = state_norms(model, x, 16)
    assert positions.tolist() == [16, 32, 45]
    assert sorted(norms) == [0, 2]  # the recurrent blocks; attention's cache is left out
    for i, values in norms.items():
        assert values.shape == (3, 3)  # (positions, examples)
        for p, t in enumerate(positions.tolist()):
            with torch.no_grad():
                _, state = model(x[:, :t])
            torch.testing.assert_close(values[p], state_norm(state.layers[i]), atol=1e-5, rtol=1e-5)
            expected = state.layers[i].S.flatten(1).norm(dim=1)  # conv buffers are not memory
            torch.testing.assert_close(values[p], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every"):
        state_norms(model, x, 0)
    with pytest.raises(ValueError, match="inputs"):
        state_norms(model, x.float(), 4)


def test_after_filler_keeps_the_example_at_the_end():
    c = PasskeyConfig(seq_len=12, key_len=2)
    x, y = generate(c, 5, 0)
    px, py = after_filler(c, x, y, 40, 1)
    assert px.shape == py.shape == (5, 40)
    assert torch.equal(px[:, 28:], x) and torch.equal(py[:, 28:], y) and (py[:, :28] == IGNORE).all()
    assert ((px[:, :28] >= c.n_digits + 2) & (px[:, :28] < c.vocab_size)).all()  # filler only
    with pytest.raises(ValueError, match="seq_len"):
        after_filler(c, x, y, 11)


def test_with_mixer_options_shares_the_weights_and_names_bad_options():
    model = _model()
    view = with_mixer_options(model, {0: {"decay_scale": 2.0, "state_norm_max": 0.05}})
    assert view.blocks[0].mixer.config.decay_scale == 2.0 and view.blocks[0].mixer.config.state_norm_max == 0.05
    assert view.embed.weight.data_ptr() == model.embed.weight.data_ptr()
    assert view.blocks[0].mixer.A_log.data_ptr() == model.blocks[0].mixer.A_log.data_ptr()
    x, _ = generate(PasskeyConfig(seq_len=40), 2, 0)
    with torch.no_grad():
        (y, s), (y2, s2) = model(x), view(x)
    assert torch.isfinite(y2).all() and (y2 - y).abs().max() > 1e-4
    assert (state_norm(s2.layers[0]) <= 0.05 + 1e-6).all() and (state_norm(s.layers[0]) > 0.05).all()
    torch.testing.assert_close(with_mixer_options(model, {})(x)[0], y)  # no option: the same model
    with pytest.raises(ValueError, match="block indices"):
        with_mixer_options(model, {3: {"decay_scale": 2.0}})
    with pytest.raises((KeyError, TypeError, ValueError), match="decay_scale"):
        with_mixer_options(model, {1: {"decay_scale": 2.0}})  # attention has no decay
    with pytest.raises(ValueError, match="decay_scale"):
        with_mixer_options(model, {0: {"decay_scale": -1.0}})


def test_tiny_passkey_sweep_writes_mitigations_and_state_norms(tmp_path, capsys):
    out = tmp_path / "sweep"
    best = bench.main(["--preset", "tiny", "--tasks", "passkey", "--mixers", "mamba2", "gated_deltanet",
                       "--out", str(out)])
    text = capsys.readouterr().out
    assert {b["mixer"] for b in best} == {"mamba2", "mamba2 +state-norm", "mamba2 +forget", "gated_deltanet"}
    assert all(set(b["tests"]) == {"1x", "2x"} for b in best)
    cells = {r["mixer"]: r for r in json.loads((out / "results.json").read_text())["cells"]}
    norms = cells["mamba2"]["state_norms"]
    assert set(norms) == {"", "state-norm", "forget"} and set(cells["gated_deltanet"]["state_norms"]) == {""}
    assert norms[""]["positions"] == [3, 6, 9, 12, 15, 18, 21, 24]  # every quarter of 12 tokens, up to 2x
    assert set(norms[""]["layers"]) == {"0", "1"} and all(len(v) == 8 for v in norms[""]["layers"].values())
    bound = max(norms["state-norm"]["layers"]["0"])
    assert all(v > 0 for v in norms[""]["layers"]["0"]) and bound <= max(norms[""]["layers"]["0"]) + 1e-6
    assert "passkey state norm" in text and "mamba2 +forget" in text and "key in the last 12 of 24" in text
    assert set(cells["mamba2"]["after_filler"]) == {"", "state-norm", "forget"}
    assert all(0 <= v <= 1 for v in cells["mamba2"]["after_filler"].values())
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # (plain, two mitigations) x 2 tests for mamba2, 2 tests for gated deltanet
    assert (out / "passkey_state.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mixer", bench.PRESETS["cpu-jrt"].mixers)
def test_cpu_jrt_settings_train_a_step(mixer, tmp_path):
    preset = bench.replace(bench.PRESETS["cpu-jrt"], batch_size=4, val_examples=4, test_examples=4, warmup=1)
    setting = next(s for s in preset.settings if s.name == "setdisj-long-first-jrt")
    assert (setting.train.short_len, setting.train.long_len, setting.train.seq_len) == (4, 32, 77)
    row = bench.run_cell(bench.Cell(setting, mixer, 32, 3e-3, 0, 1, preset.target), preset, tmp_path / "run",
                         torch.device("cpu"), keep_checkpoints=False)
    assert row["steps"] == 1 and 0 <= row["tests"]["test"]["accuracy"] <= 1 and row["loss"] > 0


@pytest.mark.parametrize("kwargs, message", [(dict(option="dt_scale"), "option"), (dict(value=0.0), "value"),
                                             (dict(blocks=(-1,)), "blocks"), (dict(blocks=(True,)), "blocks")])
def test_a_bad_mitigation_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.Mitigation(**{**dict(name="m", option="decay_scale", value=1.2), **kwargs})


def test_a_setting_scores_its_own_mitigations_on_the_blocks_it_names(tmp_path):
    preset = bench.PRESETS["tiny"]
    own = (bench.Mitigation("forget-0", "decay_scale", 1.5, (0,)),
           bench.Mitigation("norm-0", "state_norm_max", 0.5, (0,)))
    setting = bench.replace(bench.passkey_settings(12, (1, 2), key_len=2)[0], mitigations=own)
    cell = bench.Cell(setting, "mamba2,attention", 32, 3e-3, 0, 2, None)
    row = bench.run_cell(cell, preset, tmp_path / "run", torch.device("cpu"), keep_checkpoints=False)
    assert set(row["mitigations"]) == {"forget-0", "norm-0"} and set(row["after_filler"]) == {"", "forget-0", "norm-0"}
    norms = row["state_norms"]
    assert set(norms[""]["layers"]) == {"0"}  # the attention block has no recurrent state
    assert norms["forget-0"]["layers"]["0"] != norms[""]["layers"]["0"]
    # the bound is half the largest norm block 0 reached on the validation examples, far below the
    # plain model's norms at 2x
    assert max(norms["norm-0"]["layers"]["0"]) < max(norms[""]["layers"]["0"])
    plain = bench.replace(setting, mitigations=bench.MITIGATIONS)
    assert cell.key(preset) != bench.replace(cell, setting=plain).key(preset)
    assert "mitigations" not in json.loads(bench.replace(cell, setting=plain).key(preset))  # default: earlier keys
    wrong = bench.replace(setting, mitigations=(bench.Mitigation("forget-1", "decay_scale", 1.5, (1,)),))
    with pytest.raises(ValueError, match="forget-1.*blocks \\[1\\]"):
        bench.run_cell(bench.replace(cell, setting=wrong), preset, tmp_path / "run2", torch.device("cpu"),
                       keep_checkpoints=False)


def test_cpu_passkey_preset_tests_both_training_lengths_at_the_same_lengths():
    settings = {s.name: s for s in bench.PRESETS["cpu-passkey"].settings}
    assert set(settings) == {"passkey-T64", "passkey-T128"}
    short, long = settings["passkey-T64"], settings["passkey-T128"]
    assert (short.train.seq_len, long.train.seq_len) == (64, 128)
    for s in (short, long):
        lengths = [(label, x, c.seq_len) for label, x, c in s.tests]
        assert lengths == [(f"{m}x", 64 * m, 64 * m) for m in (1, 2, 4, 8, 16)]
    assert {m.name for m in short.mitigations} == {"state-norm", "forget", "forget-0 x1.2", "forget-0 x1.5"}
    assert all(m.blocks == (0,) for m in short.mitigations if m.name.startswith("forget-0"))
    assert long.mitigations == ()
    with pytest.raises(ValueError, match="base"):
        bench.passkey_settings(64, base=-1)


def test_cpu_jrt_small_state_settings():
    settings = {s.name: s for s in bench.PRESETS["cpu-jrt"].settings if s.name.startswith("setdisj-2x16")}
    assert len(settings) == 4 and all(s.mixers == bench.JRT_SMALL_STATE and s.steps == 1500 for s in settings.values())
    c = settings["setdisj-2x16-long-first-jrt"].train
    assert (c.short_len, c.long_len, c.n_elements, c.short_first, c.jrt) == (2, 16, 32, False, True)
    model = rnnlab.build_model(layout=bench.JRT_SMALL_STATE[0], n_layers=2, d_model=32, vocab_size=c.vocab_size)
    _, state = model(generate(c, 3, 0)[0])
    assert [tuple(s.S.shape) for s in state.layers] == [(3, 1, 4, 8)] * 2  # one head, 4 keys x 8 values per layer
