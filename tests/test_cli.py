"""The command line: list, train (with resume), eval, generate (with state files), convert, errors."""
import json

import pytest
import torch

import rnnlab

from rnnlab.cli import main
from rnnlab.data.corpus import get_batch, load_corpus, stdlib_files
from rnnlab.models.registry import markdown_table


@pytest.fixture()
def text(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    return str(f)


def test_list(capsys):
    main(["list", "--d-model", "64"])
    out = capsys.readouterr().out
    assert "attention" in out and "swa" in out
    main(["list", "--markdown"])
    assert capsys.readouterr().out.strip() == markdown_table().strip()
    main(["list", "gla", "--d-model", "100000000"])  # sizes of a width no machine could allocate
    assert "at d_model=100000000" in capsys.readouterr().out


def test_train_resume_eval_generate(tmp_path, text, capsys):
    out = tmp_path / "run"
    args = ["train", "--layout", "attention,swa(window=16)", "--n-layers", "2", "--d-model", "32",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "10", "--data", text, "--out", str(out)]
    res = main(args + ["--steps", "20"])
    for f in ("checkpoints/latest", "metrics.jsonl", "loss.png", "run.json", "data/meta.json"):
        assert (out / f).is_file(), f
    assert res["step"] == 20 and res["val_bits"] < 8
    with pytest.raises(SystemExit):  # a run is there: continuing it must be asked for
        main(args + ["--steps", "30"])
    assert "--resume" in capsys.readouterr().err
    res2 = main(["train", "--out", str(out), "--steps", "30", "--resume"])  # the run's own settings
    assert res2["step"] == 30
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--steps", "40", "--resume", "--d-model", "64"])
    assert "d_model = 64 (the run has 32)" in capsys.readouterr().err
    capsys.readouterr()
    ev = main(["eval", "--model", str(out), "--windows", "2", "--lengths", "1", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["length"] for r in last["results"]] == [32, 64] == [r["length"] for r in ev["results"]]
    assert (out / "loss_by_position.png").stat().st_size > 1000 and (out / "eval.json").is_file()
    # generation with a state saved and resumed equals one uninterrupted greedy run
    gen = ["generate", "--model", str(out), "--temperature", "0", "--max-new-tokens"]
    whole = main(gen + ["12", "--prompt", "the quick"])
    first = main(gen + ["5", "--prompt", "the quick", "--state-out", str(tmp_path / "s.safetensors")])
    rest = main(gen + ["7", "--state-in", str(tmp_path / "s.safetensors")])
    assert first + rest == whole


def test_train_and_eval_with_bos(tmp_path, text):
    from rnnlab.train.run import make_sources
    from rnnlab.train.trainer import TrainConfig
    out = tmp_path / "run"
    main(["train", "--layout", "attention", "--n-layers", "1", "--d-model", "16", "--batch-size", "2",
          "--seq-len", "16", "--steps", "2", "--eval-every", "0", "--data", text, "--bos", "--out", str(out), "--quiet"])
    assert json.loads((out / "run.json").read_text())["data"]["bos"] is True
    data = rnnlab.data.TokenData.open(out / "data", "train")
    train_src, val = make_sources(data, data, TrainConfig(batch_size=2, seq_len=16), seed=0, bos_id=256)
    assert next(iter(train_src))[0][:, 0].tolist() == [256, 256]
    assert all(bool((x[:, 0] == 256).all()) for x, _ in val())
    ev = main(["eval", "--model", str(out), "--windows", "2", "--lengths", "1", "--quiet"])  # as trained: with BOS
    plain = main(["eval", "--model", str(out), "--windows", "2", "--lengths", "1", "--no-bos", "--quiet"])
    assert ev["results"][0]["bos"] is True and plain["results"][0]["bos"] is False
    assert ev["results"][0]["bits"] != plain["results"][0]["bits"]
    # a new generated stream opens with BOS too: greedy text equals a stream fed <bos> + prompt
    gen = ["generate", "--model", str(out), "--prompt", "the ", "--temperature", "0", "--max-new-tokens", "12"]
    stream = rnnlab.Stream(rnnlab.load_model(str(out)).eval())
    stream.feed(torch.tensor([[256] + list(b"the ")]))
    greedy = bytes(int(t[0]) for t in stream.sample(12, temperature=0) if int(t[0]) < 256).decode(errors="replace")
    assert main(gen) == greedy
    stream = rnnlab.Stream(rnnlab.load_model(str(out)).eval())
    stream.feed(torch.tensor([list(b"the ")]))
    greedy = bytes(int(t[0]) for t in stream.sample(12, temperature=0) if int(t[0]) < 256).decode(errors="replace")
    assert main(gen + ["--no-bos"]) == greedy


def test_train_config_file_preset_and_flags(tmp_path, text, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nlayout = "gated_deltanet,swa(window=8)"\nn_layers = 2\n'
                   '[train]\nsteps = 3\nseq_len = 16\nbatch_size = 2\nlr = 1e-3\n[data]\nmax_bytes = 5000\n')
    out = tmp_path / "run"
    main(["train", "--config", str(cfg), "--preset", "tiny", "--d-model", "48", "--lr", "2e-3", "--data", text,
          "--out", str(out)])
    m = rnnlab.load_model(out)
    assert (m.config.layout, m.config.n_layers, m.config.d_model) == ("gated_deltanet,swa(window=8)", 2, 48)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["lr"] < 2e-3  # warmup toward the flag's lr, not the file's
    import torch as _t
    saved = _t.load(out / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=False)["train_config"]
    assert saved["lr"] == 2e-3 and saved["seq_len"] == 16 and saved["batch_size"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--layout", "nosuch"], "unknown mixer 'nosuch'"),
    (["--layout", "attention(foo=1)"], "has no option"),
    (["--steps", "0"], "--steps must be"),
    (["--batch-size", "6", "--grad-accum", "4"], "multiple of --grad-accum"),
    (["--data", "/no/such/file"], "/no/such/file"),
    (["--config", "/no/such.toml"], "--config"),
])
def test_train_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "r"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_texts_come_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 0.003)" in out
    assert "model width D (default: 256)" in out
    assert "tokens per training sequence (default: 256)" in out


def test_data_prepare(tmp_path, text, capsys):
    main(["data", "prepare", text, "--out", str(tmp_path / "d")])
    from rnnlab.data import TokenData
    assert len(TokenData.open(tmp_path / "d", "train")) + len(TokenData.open(tmp_path / "d", "val")) > 17000
    assert "train" in capsys.readouterr().out


def test_convert_round_trip(tmp_path):
    pytest.importorskip("transformers")
    import rnnlab
    model = rnnlab.build_model(layout="attention", n_layers=2, d_model=32)
    model.save_pretrained(tmp_path / "m")
    main(["convert", "--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf")])
    main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back = rnnlab.load_model(tmp_path / "back")
    x = torch.randint(0, 260, (1, 9))
    torch.testing.assert_close(back(x)[0], model(x)[0])


@pytest.mark.parametrize("argv, match", [
    (["train", "--layout", "nosuch", "--out", "x", "--steps", "1"], "unknown mixer"),
    (["generate", "--model", "/nonexistent/dir", "--prompt", "x"], "config.json"),
    (["train", "--data", "/nonexistent/*.txt", "--out", "x"], "matches no file"),
])
def test_errors_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_corpus_split_is_deterministic_and_disjoint(text):
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    tr1, va1 = load_corpus(max_bytes=300_000)
    tr2, va2 = load_corpus(max_bytes=300_000)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2) and len(tr1) == 300_000 and len(va1) > 0
    x, y = get_batch(tr1, 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_demo_runs_end_to_end(tmp_path, capsys):
    main(["demo", "--seconds", "1", "--out", str(tmp_path / "demo"), "--layout", "swa(window=16)"])
    out = capsys.readouterr().out
    assert "reloaded from the file" in out
    assert any(line.startswith("hybrid ") for line in out.splitlines())
    assert any(line.startswith("transformer ") for line in out.splitlines())
    sizes = [line.split(":")[1] for line in out.splitlines() if line.strip().startswith("after ")]
    assert len(sizes) >= 3 and len(set(sizes)) == 1  # the stream's state does not grow
    for run in ("hybrid", "transformer"):
        assert (tmp_path / "demo" / run / "loss.png").is_file()
    assert (tmp_path / "demo" / "hybrid" / "stream.safetensors").is_file()


def test_list_one_mixer_shows_its_documented_options(capsys):
    main(["list", "titans", "--d-model", "64"])
    out = capsys.readouterr().out
    assert "Behrouz et al. 2024" in out and "max_lr = 0.03" in out and "forget_to_init = False" in out
    assert "d_inner" not in out and "head_dim" not in out  # derived fields are not options
    from rnnlab.models.registry import mixers, options_help
    for name in mixers():  # every option of every mixer says what it is
        assert all(note for _, _, note in options_help(name)), name


def test_console_command_exits_zero(tmp_path, text):
    """The installed `rnnlab` command exits 0 after a command whose Python function returns a value."""
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "rnnlab"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rnnlab"]
    p = subprocess.run(cmd + ["data", "prepare", text, "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _console(*args, cwd=None, env=None):
    import os
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "rnnlab"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rnnlab"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_console_script_exit_codes_json_and_logs(tmp_path, text):
    """Success exits 0 with results on stdout (--json: one JSON document); logs to a pipe have no
    carriage-return progress bars; --quiet prints no progress at all."""
    run = tmp_path / "run"
    p = _console("train", "--layout", "gla", "--n-layers", "1", "--d-model", "16", "--seq-len", "16",
                 "--batch-size", "2", "--steps", "20", "--eval-every", "10", "--data", text, "--out", str(run), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["step"] == 20 and res["val_bits"] > 0
    assert "\r" not in p.stderr and "step 2/20" in p.stderr and "bits per token" in p.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[-1]["bits"] - rows[-1]["loss"] / 0.6931471805599453) < 1e-9
    q = _console("eval", "--model", str(run), "--windows", "1", "--lengths", "1", "--quiet", "--json")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["train_seq_len"] == 16  # the run's own length and data, from run.json
    g = _console("generate", "--model", str(run), "--prompt", "the", "--max-new-tokens", "3", "--temperature", "0")
    assert g.returncode == 0 and g.stdout.startswith(g.stdout.strip()[:1]) and g.stderr == ""
    d = _console("data", "prepare", text, "--out", str(tmp_path / "prepared"))
    assert d.returncode == 0 and "\r" not in d.stderr and "train with" in d.stdout, d.stderr
    v = _console("--version")
    assert v.returncode == 0 and v.stdout.startswith(f"rnnlab {rnnlab.__version__}")
    h = _console("bench", "ops", "--help")
    assert h.returncode == 0 and "--quick" in h.stdout and "--families" in h.stdout


def test_a_diverging_run_is_one_line_and_keeps_its_checkpoint(tmp_path, text):
    run = tmp_path / "run"
    p = _console("train", "--layout", "gla", "--n-layers", "1", "--d-model", "16", "--seq-len", "16", "--batch-size",
                 "2", "--steps", "20", "--lr", "1e6", "--warmup", "0", "--eval-every", "0", "--data", text,
                 "--out", str(run), "--quiet")
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "the loss became" in err and "--lr" in err and (run / "checkpoints" / "latest").is_file()


def test_eval_reads_windows_a_batch_at_a_time(tmp_path, text, monkeypatch):
    from rnnlab.data.shards import TokenData
    run = tmp_path / "run"
    main(["train", "--layout", "gla", "--n-layers", "1", "--d-model", "16", "--seq-len", "8", "--batch-size", "2",
          "--steps", "1", "--eval-every", "0", "--data", text, "--out", str(run), "--quiet"])
    args = ["eval", "--model", str(run), "--lengths", "1", "2", "--quiet", "--out", str(tmp_path / "e")]
    whole = main(args + ["--windows", "6", "--batch-size", "6"])["results"]
    read, windows = [], TokenData.windows
    monkeypatch.setattr(TokenData, "windows",
                        lambda data, starts, n: read.append(len(starts)) or windows(data, starts, n))
    batched = main(args + ["--windows", "6", "--batch-size", "4"])["results"]
    assert read == [4, 2, 4, 2]  # never all 6 windows at once
    for w, b in zip(whole, batched):
        assert b["bits"] == pytest.approx(w["bits"], rel=1e-6)


def test_train_is_reproducible_with_a_seed(tmp_path, text):
    def weights(name, seed):
        main(["train", "--layout", "gated_deltanet,swa(window=8)", "--n-layers", "2", "--d-model", "16",
              "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--eval-every", "0", "--data", text,
              "--seed", str(seed), "--out", str(tmp_path / name), "--quiet"])
        return rnnlab.load_model(tmp_path / name).state_dict()
    a, b, c = weights("a", 7), weights("b", 7), weights("c", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_every_flag_has_help_and_its_default(capsys):
    from rnnlab.cli import build_parser
    import argparse

    def parsers(p, name="rnnlab"):
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")
    seen = 0
    for name, p in parsers(build_parser()):
        if name != "rnnlab" and name.count(" ") == 1 and name != "rnnlab data":
            assert p.epilog and "examples:" in p.epilog, f"{name} has no examples"
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            seen += 1
            assert action.help and len(action.help) > 8, f"{name} {action.option_strings or action.dest}: no help"
            shown = p.formatter_class(prog=name)._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown.lower(), f"{name} {action.option_strings}: no default in its help"
    assert seen > 60


def test_prompt_escapes_keep_non_ascii():
    from rnnlab.cli import _decode_escapes
    assert _decode_escapes("caf\u00e9 \u4e2d\\n\\tx") == "caf\u00e9 \u4e2d\n\tx"


def test_files_follow_the_umask_and_stale_temporaries_go(tmp_path, text):
    import os
    import stat
    run = tmp_path / "run"
    args = ["train", "--layout", "gla", "--n-layers", "1", "--d-model", "16", "--seq-len", "16", "--batch-size", "2",
            "--eval-every", "0", "--data", text, "--out", str(run), "--quiet"]
    old = os.umask(0o022)
    try:
        main(args + ["--steps", "2"])
        (run / ".tmp-killed-run.json").write_text("{")
        (run / "checkpoints" / ".tmp-step_00000003-x").mkdir()
        (run / ".tmpA1b2C3").write_bytes(b"")  # the safetensors writer's own temporary
        main(args + ["--steps", "3", "--resume"])
    finally:
        os.umask(old)
    assert not list(run.glob(".tmp*")) and not list((run / "checkpoints").glob(".tmp*"))
    for f in [run / "metrics.jsonl", run / "run.json", run / "loss.png", run / "checkpoints" / "latest",
              *(run / "checkpoints" / "step_00000003").iterdir(), *(run / "data").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((run / "checkpoints" / "step_00000003").stat().st_mode) == 0o755


def test_resume_in_another_process_and_prefix_cache(tmp_path, text):
    run = tmp_path / "run"
    main(["train", "--layout", "gated_deltanet,swa(window=8)", "--n-layers", "2", "--d-model", "16", "--seq-len", "16",
          "--batch-size", "2", "--steps", "2", "--eval-every", "0", "--data", text, "--out", str(run), "--quiet"])
    gen = ["generate", "--model", str(run), "--temperature", "0", "--max-new-tokens"]
    whole = _console(*gen, "12", "--prompt", "the quick")
    first = _console(*gen, "5", "--prompt", "the quick", "--state-out", str(tmp_path / "s.safetensors"))
    rest = _console(*gen, "7", "--state-in", str(tmp_path / "s.safetensors"))
    assert whole.returncode == first.returncode == rest.returncode == 0, rest.stderr
    assert first.stdout.rstrip("\n") + rest.stdout.rstrip("\n") == whole.stdout.rstrip("\n")
    cached = [_console(*gen, "6", "--prefix", "the quick brown", "--prefix-cache", str(tmp_path / "pc"),
                       "--prompt", " fox") for _ in range(2)]
    assert "stored in" in cached[0].stderr and "loaded from" in cached[1].stderr
    assert cached[0].stdout == cached[1].stdout and len(list((tmp_path / "pc").iterdir())) == 1
    policy = _console(*gen, "4", "--prompt", "the quick brown fox", "--cache", "sinks=2,window=4")
    assert policy.returncode == 0 and policy.stdout.strip()
