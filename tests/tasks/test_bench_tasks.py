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
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--list", *argv])
    assert message in capsys.readouterr().err


def test_presets_list_their_cells(capsys):
    for preset in bench.PRESETS:
        bench.main(["--preset", preset, "--list"])
        text = capsys.readouterr().out
        assert text.strip().endswith("cells") and "mqar" in text


def test_a_hybrid_layout_is_one_mixer_item(capsys):
    """A layout pattern of several blocks (cycled over the preset's n_layers) is a --mixers item."""
    bench.main(["--preset", "tiny", "--tasks", "mqar", "--mixers", "swa(window=2),attention", "--list"])
    assert "mqar-T16-kv2__swa_window=2_attention__d32" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # three blocks do not fit the tiny preset's two
        bench.main(["--preset", "tiny", "--tasks", "mqar", "--mixers", "swa(window=2),attention*2", "--list"])
    assert "more blocks than n_layers" in capsys.readouterr().err
