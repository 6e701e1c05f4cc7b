"""Bad invocations of every command, run through the real ``rnnlab`` console script.

Each must exit with status 2 and print one line on stderr that names the offending flag or file,
with no traceback, and leave no file behind: neither in its working directory nor among the
fixtures it was pointed at (which must come out unchanged).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnlab

BIN = Path(sys.executable).parent / "rnnlab"
COMMAND = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "rnnlab"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    """Files the bad invocations point at: a tiny trained run, broken and foreign files."""
    from rnnlab.cli import main
    d = tmp_path_factory.mktemp("fixtures")
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    (d / "short.txt").write_text("too short\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (d / "bindir").mkdir()
    (d / "bindir" / "blob.bin").write_bytes(b"\x00\x01\x02\xff" * 500)
    (d / "a_file").write_text("not a directory\n")
    (d / "bad.toml").write_text("[model\nd_model = 3\n")
    (d / "unknown.toml").write_text("[optimizer]\nlr = 1\n")
    (d / "wrongtype.toml").write_text("[train]\nsteps = 'many'\n")
    (d / "typo.toml").write_text("[model]\nd_modle = 64\n")
    run = d / "run"
    main(["train", "--layout", "gla", "--n-layers", "1", "--d-model", "16", "--seq-len", "16", "--batch-size", "2",
          "--steps", "1", "--eval-every", "0", "--data", str(d / "text.txt"), "--out", str(run), "--quiet"])
    model = rnnlab.load_model(run)
    model.save_pretrained(d / "model")
    for name, cut in (("truncated", 100), ("emptyweights", 0)):
        shutil.copytree(d / "model", d / name)
        w = d / name / "model.safetensors"
        w.write_bytes(w.read_bytes()[:cut])
    rnnlab.build_model(layout="gla", n_layers=2, d_model=32).save_pretrained(d / "other")
    shutil.copytree(d / "model", d / "foreign")  # another model's config beside these weights
    shutil.copyfile(d / "other" / "config.json", d / "foreign" / "config.json")
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{not json")
    (d / "emptydir").mkdir()
    _, st = model(torch.randint(0, 256, (1, 5)))
    rnnlab.save_state(st, d / "state.safetensors", model=model)
    other = rnnlab.load_model(d / "other")
    rnnlab.save_state(other(torch.randint(0, 256, (1, 5)))[1], d / "other_state.safetensors", model=other)
    (d / "cut_state.safetensors").write_bytes((d / "state.safetensors").read_bytes()[:64])
    files = {"text": "text.txt", "short": "short.txt", "empty": "empty.txt", "binary": "binary.bin",
             "bad_toml": "bad.toml", "unknown_toml": "unknown.toml", "wrongtype_toml": "wrongtype.toml",
             "typo_toml": "typo.toml", "state": "state.safetensors", "other_state": "other_state.safetensors",
             "cut_state": "cut_state.safetensors"}
    names = ("bindir", "a_file", "run", "model", "truncated", "emptyweights", "other", "foreign", "badjson", "emptydir")
    return ({k: str(d / v) for k, v in files.items()} | {k: str(d / k) for k in names} | {"dir": str(d)}
            | {"not_utf8": "\udcff"})  # the byte 0xff in argv, as Python decodes it


T = ["train", "--out", "r", "--steps", "1", "--n-layers", "1", "--d-model", "16", "--seq-len", "16",
     "--batch-size", "2", "--data", "{text}"]  # a good training command: each case spoils one thing
G = ["generate", "--model", "{run}", "--max-new-tokens", "2", "--prompt", "hi"]
E = ["eval", "--model", "{run}", "--windows", "1"]

# (argv, text the one-line message must contain)
CASES: list[tuple[list[str], str]] = [
    # the top level
    ([], "command"),
    (["nosuch"], "nosuch"),
    (["--nosuch"], "--nosuch"),
    (["list", "--d-model"], "--d-model"),
    # list
    (["list", "nosuch"], "nosuch"),
    (["list", "--d-model", "0"], "--d-model"),
    (["list", "--d-model", "abc"], "--d-model"),
    (["list", "--d-model", "-5"], "--d-model"),
    (["list", "gla", "--d-model", "7"], "d_model"),
    (["list", "--markdown", "--d-model", "100000000"], "out of memory"),  # the table runs attention's forward
    # train: the layout
    (T + ["--layout", "gla*0"], "--layout"),
    (T + ["--layout", "gla*99999999999"], "--layout"),
    (T + ["--layout", ""], "--layout"),
    (T + ["--layout", "gla(num_heads=abc)"], "num_heads"),
    (T + ["--layout", "gla("], "--layout"),
    (T + ["--layout", "nosuch"], "nosuch"),
    (T + ["--layout", "attention(foo=1)"], "foo"),
    (T + ["--layout", "gla,gla,gla", "--n-layers", "2"], "--n-layers"),
    # train: sizes
    (T + ["--n-layers", "0"], "--n-layers"),
    (T + ["--n-layers", "-1"], "--n-layers"),
    (T + ["--d-model", "0"], "--d-model"),
    (T + ["--d-model", "abc"], "--d-model"),
    (T + ["--d-model", "10000000"], "--d-model"),
    (T + ["--batch-size", "100000000"], "--batch-size"),
    (T + ["--batch-size", "0"], "--batch-size"),
    (T + ["--seq-len", "0"], "--seq-len"),
    (T + ["--seq-len", "-3"], "--seq-len"),
    (T + ["--seq-len", "100000"], "--seq-len"),
    (T + ["--steps", "0"], "--steps"),
    (T + ["--steps", "abc"], "--steps"),
    (T + ["--steps", "1.5"], "--steps"),
    (T + ["--grad-accum", "0"], "--grad-accum"),
    (T + ["--grad-accum", "3"], "--grad-accum"),
    (T + ["--warmup", "-1"], "--warmup"),
    (T + ["--eval-every", "-1"], "--eval-every"),
    (T + ["--save-every", "-2"], "--save-every"),
    (T + ["--keep-last", "-1"], "--keep-last"),
    (T + ["--max-seconds", "-1"], "--max-seconds"),
    (T + ["--max-seconds", "nan"], "--max-seconds"),
    # train: optimiser values
    (T + ["--lr", "nan"], "--lr"),
    (T + ["--lr", "-1"], "--lr"),
    (T + ["--lr", "inf"], "--lr"),
    (T + ["--min-lr", "nan"], "--min-lr"),
    (T + ["--weight-decay", "nan"], "--weight-decay"),
    (T + ["--beta1", "1.5"], "--beta1"),
    (T + ["--grad-clip", "-1"], "--grad-clip"),
    (T + ["--autocast", "fp16"], "--autocast"),
    (T + ["--parallel", "zero"], "--parallel"),
    (T + ["--seed", "abc"], "--seed"),
    (T + ["--seed", "-1"], "--seed"),
    (T + ["--init-std", "nan"], "--init-std"),
    (T + ["--mlp", "nosuch"], "--mlp"),
    # train: devices
    (T + ["--device", "foo"], "--device"),
    (T + ["--device", "cuda:abc"], "--device"),
    *([(T + ["--device", "cuda"], "--device")] if not torch.cuda.is_available() else []),
    # train: data
    (T + ["--data", "/no/such/file"], "/no/such/file"),
    (T + ["--data", "{empty}"], "empty.txt"),
    (T + ["--data", "{binary}"], "binary.bin"),
    (T + ["--data", "{bindir}"], "bindir"),
    (T + ["--data", "{short}"], "--seq-len"),
    (T + ["--max-bytes", "-1"], "--max-bytes"),
    (T + ["--eval-batches", "0"], "--eval-batches"),
    (T + ["--tokenizer", "/no/such/tokenizer.json"], "/no/such/tokenizer.json"),
    (T + ["--tokenizer", "{text}"], "text.txt"),
    # train: files
    (T + ["--config", "/no/such.toml"], "/no/such.toml"),
    (T + ["--config", "{bad_toml}"], "bad.toml"),
    (T + ["--config", "{unknown_toml}"], "optimizer"),
    (T + ["--config", "{wrongtype_toml}"], "steps"),
    (T + ["--config", "{typo_toml}"], "d_modle"),
    (T + ["--config", "{binary}"], "binary.bin"),
    (T + ["--config", "{bindir}"], "bindir"),
    (T + ["--d-ff", "100000000"], "--d-ff"),
    (T + ["--preset", "huge"], "--preset"),
    (["train", "--out", "{a_file}", "--steps", "1"], "a_file"),
    (["train", "--out", "{run}", "--steps", "1"], "--resume"),
    (["train", "--out", "{emptydir}", "--steps", "1", "--resume"], "emptydir"),
    (["train", "--out", "{run}", "--steps", "3", "--resume", "--d-model", "64"], "d_model"),
    (["train", "--steps", "1"], "--out"),
    # eval
    (["eval"], "--model"),
    (["eval", "--model", "/no/such/dir"], "/no/such/dir"),
    (["eval", "--model", "{emptydir}"], "emptydir"),
    (["eval", "--model", "{truncated}"], "truncated"),
    (["eval", "--model", "{emptyweights}"], "emptyweights"),
    (["eval", "--model", "{foreign}"], "foreign"),
    (["eval", "--model", "{badjson}"], "badjson"),
    (["eval", "--model", "{a_file}"], "a_file"),
    (E + ["--windows", "0"], "--windows"),
    (E + ["--batch-size", "0"], "--batch-size"),
    (E + ["--lengths", "0"], "--lengths"),
    (E + ["--lengths", "-1"], "--lengths"),
    (E + ["--seq-len", "0"], "--seq-len"),
    (E + ["--seq-len", "100000000"], "--lengths"),  # longer than the validation text at every length
    (E + ["--out", "{a_file}"], "a_file"),
    (E + ["--data", "/no/such/file"], "/no/such/file"),
    (E + ["--data", "{empty}"], "empty.txt"),
    (E + ["--device", "foo"], "--device"),
    (E + ["--max-bytes", "-1"], "--max-bytes"),
    # generate
    (["generate", "--model", "{run}"], "--prompt"),
    (["generate", "--prompt", "hi"], "--model"),
    (G + ["--temperature", "nan"], "--temperature"),
    (G + ["--temperature", "-1"], "--temperature"),
    (G + ["--top-k", "0"], "--top-k"),
    (G + ["--top-k", "-3"], "--top-k"),
    (G + ["--top-p", "0"], "--top-p"),
    (G + ["--top-p", "1.5"], "--top-p"),
    (G + ["--top-p", "nan"], "--top-p"),
    (G + ["--max-new-tokens", "-1"], "--max-new-tokens"),
    (G + ["--max-new-tokens", "abc"], "--max-new-tokens"),
    (G + ["--seed", "-1"], "--seed"),
    (G + ["--device", "foo"], "--device"),
    (G + ["--state-in", "/no/such/state.safetensors"], "/no/such/state.safetensors"),
    (G + ["--state-in", "{cut_state}"], "cut_state.safetensors"),
    (G + ["--state-in", "{text}"], "text.txt"),
    (G + ["--state-in", "{other_state}"], "other_state.safetensors"),
    (G + ["--state-out", "no/such/dir/s.safetensors"], "--state-out"),
    (G + ["--state-out", "{emptydir}"], "--state-out"),
    (G + ["--read-twice"], "--read-twice"),
    (G + ["--cache", "ring=3"], "--cache"),
    (E + ["--cache", "window=0"], "--cache"),
    (G + ["--prefix-cache", "pc"], "--prefix-cache"),
    (G + ["--prefix", "x", "--prefix-cache", "{a_file}"], "a_file"),
    (G + ["--state-dtype", "float16"], "--state-dtype"),
    (G + ["--escapes", "--prompt", "a\\x"], "--prompt"),
    (G + ["--escapes", "--prompt", "\\ud800"], "--prompt"),
    (G + ["--escapes", "--prefix", "\\N{{nosuch}}"], "--prefix"),
    (G + ["--prompt", "caf{not_utf8}"], "--prompt"),
    (["generate", "--model", "{truncated}", "--prompt", "hi"], "truncated"),
    (["generate", "--model", "{foreign}", "--prompt", "hi"], "foreign"),
    # data prepare
    (["data"], "prepare"),
    (["data", "prepare", "{text}"], "--out"),
    (["data", "prepare", "{text}", "--out", "{a_file}"], "a_file"),
    (["data", "prepare", "/no/such/file", "--out", "d"], "/no/such/file"),
    (["data", "prepare", "{empty}", "--out", "d"], "empty.txt"),
    (["data", "prepare", "{text}", "--out", "d", "--val-fraction", "1.5"], "--val-fraction"),
    (["data", "prepare", "{text}", "--out", "d", "--val-fraction", "-0.1"], "--val-fraction"),
    (["data", "prepare", "{text}", "--out", "d", "--shard-tokens", "0"], "--shard-tokens"),
    (["data", "prepare", "{text}", "--out", "d", "--max-bytes", "-1"], "--max-bytes"),
    (["data", "prepare", "{text}", "--out", "d", "--tokenizer", "/no/such"], "/no/such"),
    # convert
    (["convert", "--out", "x"], "--from-hf"),
    (["convert", "--from-hf", "/no/such/dir", "--out", "x"], "/no/such/dir"),
    (["convert", "--to-hf", "/no/such/dir", "--out", "x"], "/no/such/dir"),
    (["convert", "--from-hf", "{model}", "--out", "x"], "model"),
    (["convert", "--to-hf", "{model}", "--out", "{a_file}"], "a_file"),
    # bench
    (["bench", "nosuch"], "nosuch"),
    (["bench", "ops", "--nosuch"], "--nosuch"),
    (["bench", "ops", "--T", "abc"], "--T"),
    (["bench", "speed", "nosuch"], "nosuch"),
    (["bench", "speed", "layers", "--mixers", "nosuch"], "nosuch"),
    (["bench", "mixers", "--T", "0"], "--T"),
    # demo
    (["demo", "--seconds", "0"], "--seconds"),
    (["demo", "--seconds", "nan"], "--seconds"),
    (["demo", "--layout", "nosuch"], "nosuch"),
    (["demo", "--out", "{a_file}"], "a_file"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _case_id(argv: list[str]) -> str:
    for prefix in (T, G, E):
        if argv[:len(prefix)] == prefix:
            return f"{prefix[0]}+ " + " ".join(argv[len(prefix):])
    return " ".join(argv) or "(none)"


@pytest.mark.parametrize("argv, names", CASES, ids=[_case_id(a) for a, _ in CASES])
def test_bad_invocation(argv, names, fx, tmp_path):
    args = [a.format(**fx) for a in argv]
    before = _snapshot(Path(fx["dir"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    p = subprocess.run(COMMAND + args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2, f"exit {p.returncode}; stderr:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("rnnlab"), err
    assert names.format(**fx).split("/")[-1] in err, f"{names!r} not named in: {err}"
    left = [str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*") if q.is_file()]
    assert not left, f"files left behind: {left}"
    assert _snapshot(Path(fx["dir"])) == before, "a fixture was changed"
