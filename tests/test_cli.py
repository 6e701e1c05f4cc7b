"""The command line: list, train (with resume), eval, generate (with state files), convert, errors."""
import json

import pytest
import torch

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


def test_train_resume_eval_generate(tmp_path, text, capsys):
    out = tmp_path / "run"
    args = ["train", "--layout", "attention,swa(window=16)", "--n-layers", "2", "--d-model", "32",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "10", "--data", text, "--out", str(out)]
    res = main(args + ["--steps", "20"])
    for f in ("config.json", "model.safetensors", "metrics.jsonl", "loss.png", "trainer_state.pt"):
        assert (out / f).is_file(), f
    assert res["step"] == 20
    res2 = main(args + ["--steps", "30", "--resume"])
    assert res2["step"] == 30
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    capsys.readouterr()
    ev = main(["eval", "--model", str(out), "--data", text, "--seq-len", "32", "--batches", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"] == ev["bits_per_byte"]
    # generation with a state saved and resumed equals one uninterrupted greedy run
    gen = ["generate", "--model", str(out), "--temperature", "0", "--max-new-tokens"]
    whole = main(gen + ["12", "--prompt", "the quick"])
    first = main(gen + ["5", "--prompt", "the quick", "--state-out", str(tmp_path / "s.safetensors")])
    rest = main(gen + ["7", "--state-in", str(tmp_path / "s.safetensors")])
    assert first + rest == whole


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
    (["generate", "--model", "/nonexistent/dir"], "config.json"),
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
    assert "bits per byte before training" in out and "resumed from the file" in out
    assert (tmp_path / "demo" / "loss.png").is_file() and (tmp_path / "demo" / "stream.safetensors").is_file()


def test_list_one_mixer_shows_its_documented_options(capsys):
    main(["list", "titans", "--d-model", "64"])
    out = capsys.readouterr().out
    assert "Behrouz et al. 2024" in out and "max_lr = 0.03" in out and "forget_to_init = False" in out
    assert "d_inner" not in out and "head_dim" not in out  # derived fields are not options
    from rnnlab.models.registry import mixers, options_help
    for name in mixers():  # every option of every mixer says what it is
        assert all(note for _, _, note in options_help(name)), name
