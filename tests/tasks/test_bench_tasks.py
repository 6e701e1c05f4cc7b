"""``rnnlab bench tasks``: the tiny preset writes its results, and a rerun skips finished cells."""
import csv
import json

import pytest

from rnnlab.bench import tasks as bench
from rnnlab.cli import main as cli


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_tiny_preset_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["bench", "tasks", "--preset", "tiny", "--out", str(out)]
    cli(argv)
    first = _last_json(capsys.readouterr().out)
    assert first["bench"] == "tasks" and first["preset"] == "tiny"
    best = first["results"]
    settings = ("mqar-T16-kv2", "state-parity", "passkey-T12", "setdisj-short-first", "setdisj-long-first",
                "copy-R8-N2", "induction-T8")
    mixers = ("attention", "gated_deltanet")
    assert {(b["setting"], b["mixer"]) for b in best} == ({(s, m) for s in settings for m in mixers}
                                                          | {("state-parity", "gated_deltaproduct")})
    for b in best:
        assert b["best_lr"] == 3e-3 and 0 <= b["score"] <= 1 and b["state_bytes"] > 0
        assert all(0 <= t["accuracy"] <= 1 for t in b["tests"].values())
    state = {(b["mixer"], b["setting"]): b["state_bytes"] for b in best}
    assert len({v for (m, _), v in state.items() if m == "gated_deltanet"}) == 1  # fixed size
    assert state["attention", "mqar-T16-kv2"] > state["attention", "passkey-T12"]  # the KV cache grows with T
    parity = [b for b in best if b["setting"] == "state-parity"]
    assert all(set(b["tests"]) == {"2-8", "9-16"} for b in parity)  # state tracking: training and longer lengths

    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 15
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 22  # one row per (cell, test set): parity, passkey and induction have two each
    assert json.loads((out / "results.json").read_text())["best"] == best
    assert (out / "tasks.png").read_bytes()[:4] == b"\x89PNG"
    assert not any((out / "runs").glob("*/checkpoints"))  # removed once each cell was scored

    # A rerun trains nothing and reports the same; a new learning rate adds only its cells.
    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: pytest.fail("a finished cell was run again"))
    cli(argv)
    assert _last_json(capsys.readouterr().out)["results"] == best
    trained = []
    monkeypatch.setattr(bench, "run_cell", lambda cell, *a, **k: trained.append(cell) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        cli(argv + ["--lr", "3e-3", "1e-2"])
    assert trained[0].lr == 1e-2


def test_interrupted_cell_continues_from_its_checkpoint(tmp_path, capsys):
    """A cell stopped after its first round resumes from that round's checkpoint."""
    preset, cells = bench.resolve(bench.build_parser(), bench.build_parser().parse_args(
        ["--preset", "tiny", "--tasks", "copy", "--mixers", "attention"]))
    cell = cells[0]
    run_dir = tmp_path / "run"
    first, second = [], []
    bench.run_cell(bench.replace(cell, steps=4), preset, run_dir, bench.torch.device("cpu"), keep_checkpoints=True,
                   progress=first.append)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    row = bench.run_cell(cell, preset, run_dir, bench.torch.device("cpu"), keep_checkpoints=False,
                         progress=second.append)
    assert row["steps"] == cell.steps == 8
    assert sum(first) == 4 and second[0] == 4 and sum(second) == 8  # the progress bar counts resumed steps once
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step once, across the two calls


def test_best_rows_pick_the_learning_rate_per_width_by_the_seed_mean():
    """Each (setting, mixer, d_model) gets its own learning rate: the one whose seeds score best on
    average, not the one with the single best seed."""
    def row(d_model, lr, seed, accuracy):
        return dict(setting="mqar-T64-kv8", family="mqar", mixer="attention", d_model=d_model, lr=lr, seed=seed,
                    steps=100, state_bytes=d_model, params=1, tests={"test": dict(x=64, accuracy=accuracy,
                                                                                  exact_match=0.0)})
    rows = [row(32, 1e-3, 0, 0.6), row(32, 1e-3, 1, 0.6), row(32, 1e-2, 0, 0.9), row(32, 1e-2, 1, 0.1),
            row(64, 1e-3, 0, 0.5), row(64, 1e-3, 1, 0.5), row(64, 1e-2, 0, 0.7), row(64, 1e-2, 1, 0.5)]
    best = {b["d_model"]: b for b in bench.best_rows(rows)}
    assert (best[32]["best_lr"], best[64]["best_lr"]) == (1e-3, 1e-2)
    assert best[32]["score"] == pytest.approx(0.6) and best[64]["tests"]["test"]["accuracy"] == pytest.approx(0.6)
    assert best[32]["seeds"] == 2 and best[32]["lrs_tried"] == [1e-3, 1e-2]


@pytest.mark.parametrize("argv, message", [
    (["--mixers", "nosuchmixer"], "--mixers"),
    (["--tasks", "nosuchtask"], "--tasks"),
    (["--lr", "0"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--target", "1.5"], "--target"),
    (["--lr-floor", "1.5"], "--lr-floor"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--list", *argv])
    assert message in capsys.readouterr().err


def test_presets_list_their_cells(capsys):
    for preset in bench.PRESETS:
        bench.main(["--preset", preset, "--list"])
        text = capsys.readouterr().out
        assert text.strip().endswith("cells")
        assert all(f"{s.name}__" in text for s in bench.PRESETS[preset].settings)  # every setting has cells


def _cells(*argv):
    parser = bench.build_parser()
    return bench.resolve(parser, parser.parse_args(["--list", *argv]))


def test_state_tracking_cells_train_their_whole_budget():
    """cpu-small's parity cells have no early stop (stopping once the training lengths are solved
    costs extrapolation) while the other settings keep the preset's target; --target brings the
    stop back and --steps overrides every budget."""
    preset, cells = _cells("--preset", "cpu-small")
    parity = [c for c in cells if c.setting.family == "state"]
    assert {c.mixer for c in parity} == {"deltanet", "deltanet(allow_neg_eigval=True)", "mamba",
                                         "mamba(allow_neg_eigval=True)"}
    assert {(c.target, c.steps, c.d_model) for c in parity} == {(None, 500, 32)}
    assert {c.target for c in cells if c.setting.family != "state"} == {preset.target} and preset.target < 1.0
    assert json.loads(parity[0].key(preset))["target"] is None
    _, cells = _cells("--preset", "cpu-small", "--tasks", "state", "--target", "0.9", "--steps", "7")
    assert {(c.target, c.steps) for c in cells} == {(0.9, 7)}


@pytest.mark.parametrize("target, steps", [(0.5, 4), (None, 8)])
def test_a_cell_without_target_runs_its_whole_budget(target, steps, tmp_path, monkeypatch):
    preset, cells = _cells("--preset", "tiny", "--tasks", "copy", "--mixers", "attention")
    monkeypatch.setattr(bench, "evaluate_task", lambda *a: dict(accuracy=1.0, exact_match=1.0))
    row = bench.run_cell(bench.replace(cells[0], target=target), preset, tmp_path / "run", bench.torch.device("cpu"),
                         keep_checkpoints=False)
    assert (row["steps"], row["early_stop"]) == (steps, target is not None)  # eval_every 4 of a budget of 8
    assert row["val_curve"] == [[steps, 1.0]]  # one round each: the validation accuracy after it


def test_the_validation_accuracy_of_every_round_is_kept(tmp_path, monkeypatch):
    """A cell with an early stop records its validation accuracy after each round of eval_every
    steps, so a reader can tell a plateau from a cell still learning."""
    preset, cells = _cells("--preset", "tiny", "--tasks", "copy", "--mixers", "attention")
    accuracies = iter([0.1, 0.3])
    monkeypatch.setattr(bench, "evaluate_task", lambda *a: dict(accuracy=next(accuracies, 1.0), exact_match=0.0))
    row = bench.run_cell(bench.replace(cells[0], target=0.99), preset, tmp_path / "run", bench.torch.device("cpu"),
                         keep_checkpoints=False)
    assert row["val_curve"] == [[4, 0.1], [8, 0.3]] and row["val_accuracy"] == 0.3


@pytest.mark.parametrize("target", [None, 0.5])
def test_only_a_cell_without_target_decays_its_learning_rate(target, tmp_path, monkeypatch):
    """With no early stop the learning rate decays (cosine) over the whole budget to lr_floor * lr;
    with one it stays constant after warmup, so that stopping early is the same run cut short."""
    preset, cells = _cells("--preset", "tiny", "--tasks", "copy", "--mixers", "attention", "--lr-floor", "0.1")
    assert preset.lr_floor == 0.1
    cell = bench.replace(cells[0], target=target)
    monkeypatch.setattr(bench, "evaluate_task", lambda *a: dict(accuracy=0.0, exact_match=0.0))
    bench.run_cell(cell, preset, tmp_path / "run", bench.torch.device("cpu"), keep_checkpoints=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after_warmup = lrs[preset.warmup:]  # from the first step of the cosine (or constant) phase
    assert len(lrs) == cell.steps and after_warmup[0] == pytest.approx(cell.lr)
    if target is None:
        assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))
        assert lrs[-1] < 0.2 * cell.lr and lrs[-1] >= 0.1 * cell.lr
    else:
        assert after_warmup == pytest.approx([cell.lr] * len(after_warmup))
    assert json.loads(cell.key(preset))["min_lr"] == pytest.approx(0.1 * cell.lr if target is None else cell.lr)


def test_cpu_parity_preset_trains_every_seed_to_the_end_of_a_decaying_schedule():
    """cpu-parity: DeltaNet and Mamba with and without negative eigenvalues on parity, three seeds,
    each cell its whole budget (no early stop) with the learning rate decaying to a tenth."""
    preset, cells = _cells("--preset", "cpu-parity")
    assert [(c.setting.name, c.mixer, c.seed) for c in cells] == [
        ("state-parity", m, s) for m in ("deltanet", "deltanet(allow_neg_eigval=True)", "mamba",
                                         "mamba(allow_neg_eigval=True)") for s in (0, 1, 2)]
    assert [label for label, _, _ in cells[0].setting.tests] == ["3-40", "41-64", "65-128", "129-256"]
    assert {(c.target, c.steps, c.d_model, c.lr) for c in cells} == {(None, 500, 32, 1e-2)}
    assert [c.min_lr(preset) for c in cells] == pytest.approx([1e-3] * len(cells))
    _, cells = _cells("--preset", "cpu-parity", "--target", "0.99")  # an early stop brings the constant rate back
    assert {c.min_lr(preset) for c in cells} == {1e-2}


def test_lr_floor_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="lr_floor"):
        bench.replace(bench.PRESETS["tiny"], lr_floor=-0.1)


def test_cpu_tracking_preset_compares_householder_steps_on_s3(tmp_path):
    """cpu-tracking: one layer of Gated DeltaNet with negative eigenvalues (one reflection per
    token) against Gated DeltaProduct (two), on S3 trained at 3-24 and tested up to 128."""
    preset, cells = _cells("--preset", "cpu-tracking")
    assert preset.n_layers == 1
    assert [(c.setting.name, c.mixer, c.seed) for c in cells] == [
        ("state-s3", m, s) for m in ("gated_deltanet(allow_neg_eigval=True)", "gated_deltaproduct") for s in (0, 1)]
    assert [label for label, _, _ in cells[0].setting.tests] == ["3-24", "25-64", "65-128"]
    assert cells[0].setting.train.group == "s3" and {(c.target, c.steps) for c in cells} == {(1.0, 600)}
    small = bench.replace(preset, val_examples=4, test_examples=4, warmup=1)
    row = bench.run_cell(bench.replace(cells[-1], steps=1), small, tmp_path / "run", bench.torch.device("cpu"),
                         keep_checkpoints=False)
    assert row["steps"] == 1 and set(row["tests"]) == {"3-24", "25-64", "65-128"}
    model = bench.build_model(layout=bench.layout_for(cells[-1].mixer, preset), n_layers=1, d_model=32,
                              vocab_size=7)
    mixer = model.blocks[0].mixer
    assert mixer.config.num_householder == 2 and mixer.config.allow_neg_eigval


def test_a_hybrid_layout_is_one_mixer_item(capsys):
    """A layout pattern of several blocks (cycled over the preset's n_layers) is a --mixers item."""
    bench.main(["--preset", "tiny", "--tasks", "mqar", "--mixers", "swa(window=2),attention", "--list"])
    assert "mqar-T16-kv2__swa_window=2_attention__d32" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # three blocks do not fit the tiny preset's two
        bench.main(["--preset", "tiny", "--tasks", "mqar", "--mixers", "swa(window=2),attention*2", "--list"])
    assert "more blocks than n_layers" in capsys.readouterr().err


def test_cpu_mqar_preset_compares_mixers_at_equal_recurrent_state(capsys):
    """cpu-mqar: attention and, at each state size, one delta-rule mixer and three decay mixers,
    each the second block after swa(window=2), at d_model 64; the mixers of a size hold that many
    floats of recurrent state per layer (the matrix S; short-convolution taps aside)."""
    preset, cells = _cells("--preset", "cpu-mqar")
    assert {c.d_model for c in cells} == {64} and [s.name for s in preset.settings] == ["mqar-T64-kv8"]
    assert preset.settings[0].train.vocab_size == 256 and {(c.steps, c.target) for c in cells} == {(2000, 0.99)}
    assert all(c.mixer.startswith("swa(window=2),") for c in cells)
    mixers = [c.mixer.removeprefix("swa(window=2),") for c in cells]
    assert mixers == ["attention", *bench.CPU_MQAR_STATES[512], *bench.CPU_MQAR_STATES[2048]]
    for floats, items in bench.CPU_MQAR_STATES.items():
        assert sum(m.startswith("gated_deltanet") for m in items) == 1 and len(items) == 4
        for item in items:
            model = bench.build_model(layout=f"swa(window=2),{item}", n_layers=2, d_model=64, vocab_size=256)
            with bench.torch.no_grad():
                _, state = model(bench.torch.zeros(1, 4, dtype=bench.torch.long))
            assert state.layers[1].S[0].numel() == floats, item
